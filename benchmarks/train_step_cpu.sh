#!/usr/bin/env bash
# The "Train step" table of benchmarks/RESULTS.md: ViT-Ti and ViT-S at 224 px, multiblock and stripes
# masking, fp32; the JAX step (blocks scanned, the default, then unrolled) next to the PyTorch reference,
# both sides in one process per row.
#
#   bash benchmarks/train_step_cpu.sh [OUT]      # OUT defaults to runs/bench_train_step; ~35 min on 2 cores
#
# Run it on an otherwise idle machine: every row shares the cores with nothing but its own two sides.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench_train_step}
mkdir -p "$OUT"
COMMON=(--image_size=224 --batch=16 --steps=2 --repeats=5 --warmup=1 --dtype=float32)
ROWS=()

row() {  # name, extra args...
  local name=$1; shift
  echo "== $name (load $(cut -d' ' -f1 /proc/loadavg))"
  python benchmarks/train_step.py "${COMMON[@]}" "$@" --json="$OUT/$name.json"
  ROWS+=("$OUT/$name.json")
}

for layers in scan unrolled; do
  for variant in Ti S; do
    for strategy in multiblock stripes; do
      row "${variant,,}_${strategy}_${layers}" --variant="$variant" --strategy="$strategy" --layers="$layers"
    done
  done
done

python benchmarks/train_step.py --report "${ROWS[@]}" | tee "$OUT/table.md"
