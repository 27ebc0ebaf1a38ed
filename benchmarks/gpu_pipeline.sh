#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md in one run of under 9 minutes, compiles included:
#   1. benchmarks/train_step.py: ViT-B/16 at 224 px, bf16, batch 64: img/s and MFU against the bf16
#      matmul peak measured in the same run (a 16384^2 jitted matmul).
#   2. benchmarks/train_feed.py: training img/s with the real pipeline (15 Grain workers on the 16
#      cores) feeding the real step, host against device augmentation, ViT-S/16 then ViT-B/16 at 224.
#
#   OUT=/some/dir bash benchmarks/gpu_pipeline.sh SHARDS          # on the GPU machine
#   OUT=/tmp/gpu_check bash benchmarks/gpu_pipeline.sh SHARDS --cpu   # tiny settings, this CPU
#
# SHARDS: a folder made by `python -m mefem_jax.data.build_shards` (UTKFace faces, 200 px; device
# mode reads them at data.source_size=$SOURCE_SIZE, default 200, so the host never resamples).
# Wheels in .whl/ (grain, array-record, ml_collections, simplejpeg, cloudpickle, portpicker) are
# installed into /tmp/site first when present; the machine has no network.
# Everything goes to $OUT: one log and one JSON per phase, and summary.md with the tables.
# Each phase has its own time limit and is skipped when too little of the budget is left.
set -uo pipefail

SHARDS=${1:?usage: OUT=DIR bash benchmarks/gpu_pipeline.sh SHARDS [--cpu]}
MODE=${2:-gpu}
OUT=${OUT:?set OUT to the folder for the results}
SOURCE_SIZE=${SOURCE_SIZE:-200}
BUDGET_S=${BUDGET_S:-530}
START=$(date +%s)
mkdir -p "$OUT" || exit 2
OUT=$(realpath "$OUT")
SHARDS=$(realpath -m "$SHARDS")
cd "$(dirname "$0")/.." || exit 2
if [ ! -f "$SHARDS/manifest.json" ]; then
  echo "no shard folder at $SHARDS (expected its manifest.json)" | tee "$OUT/summary.md"; exit 2
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if ! python3 -c "import grain, array_record, ml_collections, simplejpeg, jax" 2> "$OUT/imports.log"; then
  echo "missing module: $(tail -1 "$OUT/imports.log")" | tee "$OUT/summary.md"; exit 2
fi

if [ "$MODE" = "--cpu" ]; then
  export JAX_PLATFORMS=cpu
  STEP_ARGS=(--variant=Ti --image_size=112 --strategy=multiblock --batch=4 --dtype=float32
             --steps=1 --repeats=1 --warmup=1 --peak_size=256 --peak_per_round=1)
  FEED_S=(--train_configs=smoke --train_batch=8 --train_steps=1 --train_rounds=1
          --train_warmup=1 --train_workers=2)
  FEED_B=("${FEED_S[@]}")
  LIMITS=(240 240 240)
else
  STEP_ARGS=(--variant=B --image_size=224 --batch=64 --dtype=bfloat16 --steps=5 --repeats=5
             --warmup=2 --peak_size=16384 --peak_per_round=3)
  FEED_S=(--train_configs=S --dtype=bfloat16 --train_batch=256 --train_steps=4 --train_rounds=3
          --train_warmup=2 --train_workers=15)
  FEED_B=(--train_configs=B --dtype=bfloat16 --train_batch=128 --train_steps=4 --train_rounds=3
          --train_warmup=2 --train_workers=15)
  LIMITS=(170 170 170)
fi

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
phase() {  # name, limit_s, command...
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt 60 ]; then echo "$name: skipped, $(left) s of the budget left" >> "$OUT/summary.md"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && echo "$name: exit $rc after $(( $(date +%s) - START )) s total (see $name.log): $(grep -v '^[IW][0-9]' "$OUT/$name.log" | tail -1)" >> "$OUT/summary.md"
  return 0
}

{ echo "# GPU pipeline run $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"; nproc
  df -h /dev/shm | tail -1; } > "$OUT/summary.md" 2>&1  # Grain workers hand batches over in /dev/shm

phase train_step "${LIMITS[0]}" python3 benchmarks/train_step.py "${STEP_ARGS[@]}" --skip_torch --json="$OUT/train_step.json"
phase feed_S "${LIMITS[1]}" python3 benchmarks/train_feed.py --shards="$SHARDS" --train_source_size="$SOURCE_SIZE" \
  "${FEED_S[@]}" --json="$OUT/feed_S.json" --markdown="$OUT/feed_S.md"
phase feed_B "${LIMITS[2]}" python3 benchmarks/train_feed.py --shards="$SHARDS" --train_source_size="$SOURCE_SIZE" \
  "${FEED_B[@]}" --json="$OUT/feed_B.json" --markdown="$OUT/feed_B.md"

{ echo; echo "## benchmarks/train_step.py ${STEP_ARGS[*]} --skip_torch"
  [ -f "$OUT/train_step.json" ] && python3 benchmarks/train_step.py --report "$OUT/train_step.json"
  grep -h "^JAX compile" "$OUT/train_step.log" 2>/dev/null
  echo; echo "## benchmarks/train_feed.py (source_size $SOURCE_SIZE): ${FEED_S[*]} / ${FEED_B[*]}"
  cat "$OUT"/feed_S.md "$OUT"/feed_B.md 2>/dev/null | awk 'NR <= 2 || !/^\| model|^\|---/'
  echo; echo "total $(( $(date +%s) - START )) s"; } >> "$OUT/summary.md"
cat "$OUT/summary.md"
