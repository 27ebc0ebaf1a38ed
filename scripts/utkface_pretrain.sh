#!/usr/bin/env bash
# Pretrain a small MeFEm encoder on the UTKFace train split in three settings, then linear-probe each
# (and the same architecture at random init, and raw pixels) on the test split.
#
#   bash scripts/utkface_pretrain.sh [OUT]            # OUT defaults to runs/utkface
#   STEPS=1500 BATCH=64 bash scripts/utkface_pretrain.sh
#
# Settings (the three rows of docs/RESULTS.md):
#   multiblock        I-JEPA masking, uniform loss weights, CLS always in the context
#   stripes           axial-stripe masking, uniform loss weights, CLS always in the context
#   stripes_full      axial stripes + circular loss weighting + probabilistic CLS reassignment (MeFEm)
# The model is the smoke-sized ViT (width 128, depth 4, 112 px) so each run fits ~20 min on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/utkface}
STEPS=${STEPS:-1500}
BATCH=${BATCH:-64}
FACES=${FACES:-../shared/data/utkface}
SHARDS="$OUT/shards_train"
mkdir -p "$OUT"

if [[ ! -f "$SHARDS/manifest.json" ]]; then
  python -m mefem_jax.data.build_shards --images="$FACES/images" --labels="$FACES/labels.csv" \
    --out="$SHARDS" --split=train --image_size=128 --num_shards=8 --workers=2
fi

COMMON=(--config=configs/vits.py:smoke --config.data.train="$SHARDS" --config.total_steps="$STEPS"
        --config.data.batch_size="$BATCH" --config.optim.ref_batch="$BATCH"
        --config.optim.warmup_steps=$((STEPS / 10)) --config.log_every=25
        --config.checkpoint.every_steps=500 --config.data.workers=1)
ARCH="width=128,depth=4,heads=4"

run() {  # name, extra train flags...
  local name=$1; shift
  python -m mefem_jax.train "${COMMON[@]}" --workdir="$OUT/$name" "$@"
}

run multiblock --config.mask.strategy=multiblock --config.loss.circular.enabled=False --config.loss.cls.p_target=0.0
run stripes --config.mask.strategy=stripes --config.loss.circular.enabled=False --config.loss.cls.p_target=0.0
run stripes_full --config.mask.strategy=stripes

for model in multiblock stripes stripes_full random; do
  spec="$OUT/$model" features=cls,mean
  # The raw-pixel baseline does not depend on the model: fit it once, beside the random-init encoder.
  [[ $model == random ]] && spec="random:vits@112:$ARCH" features=cls,mean,pixels
  [[ -f "$OUT/eval_$model/report.json" ]] && continue  # finished earlier
  python -m mefem_jax.evaluate --model="$spec" --train="$FACES:split=train" --test="$FACES:split=test" \
    --targets=age:regression,gender:classification,race:classification --features="$features" \
    --out="$OUT/eval_$model"
done
echo "reports: $OUT/eval_*/report.md"
