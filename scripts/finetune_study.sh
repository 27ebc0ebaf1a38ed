#!/usr/bin/env bash
# What does pretraining buy when labels are few? Fine-tune the pretrained `:cpu` encoder and the same ViT at
# random init on 500, 2,000 and all UTKFace train labels (age and gender, two heads of one model), beside the
# linear probes of both encoders on the same labels; score each once on the test split. Table and
# plot: scripts/summarize_finetune.py, into OUT (docs/RESULTS.md quotes them).
#
#   bash scripts/finetune_study.sh [OUT]                      # OUT defaults to runs/finetune
#   PRETRAINED=runs/long/mefem_s0 bash scripts/finetune_study.sh
#   INITS=random RUNS="500:0 500:1" bash scripts/finetune_study.sh   # a part; the rest later
#
# PRETRAINED is a pretraining workdir (its last step; RUN@STEP for another), made by
#   PHASE=train RUNS=mefem:0 STEPS=1500 EVAL_EVERY=500 bash scripts/learning_curves.sh runs/long
# whose carved labels (runs/long/labels.csv: UTKFace's train split less a 10 % validation split) are used
# here too, so no fine-tune sees a validation or test face, and the validation split picks each kept step.
# Every fine-tune gets the same budget, STEPS updates of batch 64 (15 epochs of 500 labels, half an epoch of
# all; 12-17 min each on one core), warm-up 10 % of it; the validation split is scored every EVAL_EVERY steps.
# The recipe is configs/finetune.py:cpu (its values were chosen on the validation split: docs/RESULTS.md).
# A fine-tune that finished (test/report.json) is skipped; an interrupted one resumes. INITS= runs no
# fine-tune, PROBES= no probe.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/finetune}
PRETRAINED=${PRETRAINED:-runs/long/mefem_s0}
RANDOM_INIT=${RANDOM_INIT:-"random:vits@112:patch=8,width=128,depth=4,heads=4,seed=0"}
LABELS=${LABELS:-runs/long/labels.csv}
IMAGES=${IMAGES:-../shared/data/utkface/images}
INITS=${INITS-"pretrained random"}
RUNS=${RUNS:-"500:0 500:1 2000:0 2000:1 all:0"}
PROBES=${PROBES-"500 2000 all"}
STEPS=${STEPS:-120}
EVAL_EVERY=${EVAL_EVERY:-30}
WARMUP=${WARMUP:-$((STEPS / 10))}
LR=${LR:-1e-4}                     # per 256 images; the :cpu recipe's
HEAD_INIT=${HEAD_INIT:-zero}       # zero (MAE's near-zero head) | probe (LP-FT); see docs/RESULTS.md
STANDARDIZE=${STANDARDIZE:-batch}  # batch | fixed | none: the head's input standardisation (finetuning/model.py)
HEAD_LR_SCALE=${HEAD_LR_SCALE:-400}
EXTRA=${EXTRA:-}  # more --config.KEY=VALUE flags for every fine-tune, e.g. "--config.drop_path=0.1"
TARGETS=age:regression,gender:classification
VAL="$LABELS:images=$IMAGES,split=val"
# SCORE_TEST=0: validation only (choosing knobs), no test scoring and no probes
SCORE_TEST=${SCORE_TEST:-1}
TEST="$LABELS:images=$IMAGES,split=test"
if [[ $SCORE_TEST == 0 ]]; then TEST="" PROBES=""; fi
mkdir -p "$OUT"

train_spec() {  # labels: a count or "all"
  if [[ $1 == all ]]; then echo "$LABELS:images=$IMAGES,split=train"; else echo "$LABELS:images=$IMAGES,split=train,sample=$1"; fi
}

for init in $INITS; do
  spec=$PRETRAINED
  [[ $init == random ]] && spec=$RANDOM_INIT
  for run in $RUNS; do
    n=${run%%:*} seed=${run##*:}
    workdir="$OUT/${init}_n${n}_s${seed}"
    [[ -f "$workdir/test/report.json" ]] && continue  # a finished validation-only run just returns
    python -m mefem_jax.finetune --config=configs/finetune.py:cpu --workdir="$workdir" --config.init="$spec" \
      --config.seed="$seed" --config.target="$TARGETS" --config.total_steps="$STEPS" --config.optim.warmup_steps="$WARMUP" --config.optim.lr="$LR" --config.head.init="$HEAD_INIT" \
      --config.head.standardize="$STANDARDIZE" --config.head.lr_scale="$HEAD_LR_SCALE" $EXTRA \
      --config.eval.every_steps="$EVAL_EVERY" --config.data.train="$(train_spec "$n")" \
      --config.data.val="$VAL" --config.data.test="$TEST"
  done
done

for n in $PROBES; do  # the linear probes of both encoders on the same labels (evaluate's ridge / logistic, paired)
  out="$OUT/probe_n${n}"
  [[ -f "$out/report.json" ]] && continue
  python -m mefem_jax.evaluate --model="$PRETRAINED" --model="$RANDOM_INIT" --out="$out" --train="$(train_spec "$n")" \
    --test="$TEST" --targets="$TARGETS" --features=cls
done

if [[ $SCORE_TEST == 1 ]]; then python scripts/summarize_finetune.py "$OUT"; fi
