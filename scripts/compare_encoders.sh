#!/usr/bin/env bash
# The worked comparison of docs/RESULTS.md "Comparing encoders": one `evaluate` run that puts the `:cpu`
# encoder pretrained by scripts/learning_curves.sh (RUN, default runs/long/mefem_s0, 1,000 steps) beside
# its own random init, a timm ViT-S at random init (timm's init, 112 px, 16 px patches) and raw pixels,
# on UTKFace: linear probes, DINO's kNN, label efficiency (10, 100, 1,000 labels, 3 draws), subgroups
# by sex, race and age band, and saliency maps over 64 test faces. The probes are fitted on the same
# fixed 5,000-face sample of the pretraining split as docs/RESULTS.md's other tables and scored once on
# the 4,728 test faces. About 40 minutes on 2 idle cores.
#
#   bash scripts/compare_encoders.sh [OUT]        # OUT defaults to runs/compare
#   STEP=saliency bash scripts/compare_encoders.sh  # only the saliency figures (OUT/saliency, ~10 min)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/compare}
RUN=${RUN:-runs/long/mefem_s0}
LABELS=${LABELS:-runs/long/labels.csv}  # scripts/carve_val.py's split of UTKFace (train / val / test)
IMAGES=${IMAGES:-../shared/data/utkface/images}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

STEP=${STEP:-all}  # compare | saliency | all

[[ $STEP == saliency ]] || python -m mefem_jax.evaluate --out="$OUT" \
  --model="$RUN" \
  --model="random:vits@112:patch=8,width=128,depth=4,heads=4,seed=0" \
  --model="timm:vit_small_patch16_224:img_size=112" \
  --train="$LABELS:images=$IMAGES,split=train,sample=5000" --test="$LABELS:images=$IMAGES,split=test" \
  --targets=age:regression,gender:classification,race:classification --features=cls,mean,grid,pixels \
  --grid_size=2 --protocols=linear,knn,fewshot --shots=10,100,1000 --fewshot_seeds=3 \
  --groups=gender,race,age_bin=0,20,40,60,120 --saliency=64 --batch_size=64

# The saliency figures of docs/RESULTS.md alone (cache hits for the embeddings above): age and gender, the
# CLS and 2x2-grid readouts of the pretrained encoder and its random init, over 64 test faces.
if [[ $STEP != compare ]]; then
  python -m mefem_jax.evaluate --out="$OUT/saliency" --model="$RUN" \
    --model="random:vits@112:patch=8,width=128,depth=4,heads=4,seed=0" \
    --train="$LABELS:images=$IMAGES,split=train,sample=5000" --test="$LABELS:images=$IMAGES,split=test" \
    --targets=age:regression,gender:classification --features=cls,grid --grid_size=2 --saliency=64 --batch_size=64
fi
