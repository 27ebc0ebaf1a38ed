#!/usr/bin/env bash
# Does pretraining learn? Pretrain the `:cpu` recipe on the UTKFace train split in several settings,
# probe a validation split carved from train every EVAL_EVERY steps (age, gender, race on CLS, mean-pool
# and 2x2-grid readouts, plus RankMe), then score each final encoder, and the same ViT at random init,
# once on the test split. Tables and curves: scripts/summarize_curves.py, into OUT (docs/RESULTS.md).
#
#   bash scripts/learning_curves.sh [OUT]                  # OUT defaults to runs/curves
#   RUNS="mefem:0 mefem:1" STEPS=800 bash scripts/learning_curves.sh
#   PHASE=train RUNS=mefem:2 bash scripts/learning_curves.sh   # pretrain + validation curves only
#   PHASE=test bash scripts/learning_curves.sh                 # then the test split, once, for all
#   UPDATE_DOCS=1 bash scripts/learning_curves.sh              # also replace the committed curves and table
#
# docs/learning_curves.png and docs/learning_curves_table.md are the committed results of the whole study
# (docs/RESULTS.md); they are rewritten only with UPDATE_DOCS=1, so that a partial run (one PHASE, a few
# RUNS) cannot replace them with its own. The summary of every run goes to OUT/learning_curves.png and
# OUT/learning_curves_table.md.
#
# Each RUNS entry is SETTING:SEED. Settings (all on configs/vits.py:cpu):
#   mefem         MeFEm-full: axial stripes + circular loss weights + CLS reassignment (p 0.5)
#   stripes       axial stripes only (uniform weights, CLS always in the context)
#   multiblock    I-JEPA multiblock masking (uniform weights, CLS always in the context)
#   mefem_sigreg  MeFEm-full at 4x the recipe's lr + the optional SIGReg anti-collapse term at weight
#                 SIGREG (losses.sigreg)
#   mefem_lr4x    MeFEm-full at 4x the recipe's learning rate (4e-3 at batch 2048); docs/RESULTS.md ran
#                 it with STEPS=800 EVAL_EVERY=100
#   lr4x_cls_context  mefem_lr4x with CLS always in the context (no CLS reassignment): does predicting
#                 the target CLS narrow it? (docs/RESULTS.md, "Where the CLS narrowing comes from")
# Warm-up is 10 % of STEPS (WARMUP overrides it), as in the recipe at its 600 steps.
# The last two are the knob trials of docs/RESULTS.md, judged on the validation split.
# A run that finished is skipped; an interrupted one resumes from its last checkpoint. About 20 min a
# run on a 2-core CPU (600 steps of batch 64, probes at 0, 200, 400, 600), 3-4 min per test evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/curves}
RUNS=${RUNS:-"mefem:0 mefem:1 stripes:0 multiblock:0"}
RANDOM_SEEDS=${RANDOM_SEEDS:-"0 1"}
PHASE=${PHASE:-all}  # train | test | all
STEPS=${STEPS:-600}
EVAL_EVERY=${EVAL_EVERY:-200}
WARMUP=${WARMUP:-$((STEPS / 10))}  # the recipe's 10 % of the run (60 of 600 steps)
SIGREG=${SIGREG:-0.05}
# Each run keeps the target encoder of its best validation step by this probe metric in WORKDIR/selected/
# (a fine-tune's init); the test phase still scores each run's last step, as the studies report.
SELECT=${SELECT:-probe_age_mae}
FACES=${FACES:-../shared/data/utkface}
LABELS="$OUT/labels.csv"
IMAGES="$FACES/images"
TARGETS=age:regression,gender:classification,race:classification
# Probes are fitted on 2,000 train faces (a fixed sample) and scored on the validation split during
# training; at the end they are fitted on 5,000 train faces (a fixed sample, so a model costs ~3 min
# on 2 cores) and scored on all 4,728 test faces.
VAL_TRAIN="$LABELS:images=$IMAGES,split=train,sample=2000"
VAL="$LABELS:images=$IMAGES,split=val"
TEST_TRAIN="$LABELS:images=$IMAGES,split=train,sample=5000"
TEST="$LABELS:images=$IMAGES,split=test"
mkdir -p "$OUT"

python scripts/carve_val.py --labels="$FACES/labels.csv" --out="$LABELS" --percent=10
if [[ ! -f "$OUT/shards_train/manifest.json" ]]; then
  python -m mefem_jax.data.build_shards --images="$IMAGES" --labels="$LABELS" --split=train \
    --out="$OUT/shards_train" --image_size=128 --num_shards=8 --workers=2
fi

setting_flags() {  # the flags that make a setting, on top of configs/vits.py:cpu
  case $1 in
    mefem) echo "" ;;
    stripes) echo "--config.loss.circular.enabled=False --config.loss.cls.p_target=0" ;;
    multiblock) echo "--config.mask.strategy=multiblock --config.loss.circular.enabled=False --config.loss.cls.p_target=0" ;;
    mefem_sigreg) echo "--config.loss.sigreg.weight=$SIGREG --config.optim.lr=4e-3 --config.optim.final_lr=1e-5" ;;
    mefem_lr4x) echo "--config.optim.lr=4e-3 --config.optim.final_lr=1e-5" ;;
    lr4x_cls_context) echo "--config.optim.lr=4e-3 --config.optim.final_lr=1e-5 --config.loss.cls.p_target=0" ;;
    *) echo "unknown setting $1" >&2; return 1 ;;
  esac
}

evaluate() {  # model spec, output folder, train spec, test spec, features
  [[ -f "$2/report.json" ]] && return 0
  python -m mefem_jax.evaluate --model="$1" --out="$2" --train="$3" --test="$4" --targets="$TARGETS" \
    --features="$5" --grid_size=2
}

for run in $RUNS; do
  setting=${run%%:*} seed=${run##*:}
  workdir="$OUT/${setting}_s${seed}"
  if [[ $PHASE != test ]]; then
    # shellcheck disable=SC2046  # setting_flags prints several flags on purpose
    python -m mefem_jax.train --config=configs/vits.py:cpu --workdir="$workdir" --config.seed="$seed" \
      --config.total_steps="$STEPS" --config.optim.warmup_steps="$WARMUP" --config.eval.every_steps="$EVAL_EVERY" \
      --config.data.train="$OUT/shards_train" --config.data.workers=1 \
      --config.eval.train="$VAL_TRAIN" --config.eval.test="$VAL" --config.eval.max_images=2000 \
      --config.eval.targets="$TARGETS" --config.eval.select="$SELECT" $(setting_flags "$setting")
  fi
  if [[ $PHASE != train ]]; then
    evaluate "$workdir" "$OUT/test_${setting}_s${seed}" "$TEST_TRAIN" "$TEST" cls,mean,grid
  fi
done

if [[ $PHASE != train ]]; then
  for seed in $RANDOM_SEEDS; do  # the same ViT at random init; the raw-pixel baseline rides along
    evaluate "random:vits@112:patch=8,width=128,depth=4,heads=4,seed=$seed" "$OUT/test_random_s${seed}" \
      "$TEST_TRAIN" "$TEST" cls,mean,grid,pixels
  done
fi

python scripts/summarize_curves.py "$OUT" "$OUT"
if [[ ${UPDATE_DOCS:-0} == 1 ]]; then
  cp "$OUT/learning_curves.png" "$OUT/learning_curves_table.md" docs/
  echo "updated docs/learning_curves.png and docs/learning_curves_table.md from $OUT"
else
  echo "docs/ left as committed; UPDATE_DOCS=1 (or: python scripts/summarize_curves.py $OUT docs/) replaces them"
fi
