#!/usr/bin/env bash
# docs/RESULTS.md "Face alignment from frozen features": 68-point landmarks on UTKFace, scored by NME as
# FaRL scores 300-W. build_shards --landmark_labels fits the points on 3,000 faces of the pretraining split
# and 1,000 test faces (fixed samples; UTKFace's crops are not re-aligned, so the points are in the frame of
# the image files and landmark_labels.csv reads them with the images in place), then one `evaluate` puts
# the :cpu encoder (RUN) beside its random init, a timm ViT-S at random init and the pixels, with the patch
# tokens pooled to 7x7 (the timm ViT's own grid; ours is 14x14) as the `grid` readout.
#
#   bash scripts/landmarks_utkface.sh [OUT]        # OUT defaults to runs/landmarks; ~10 min on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/landmarks}
RUN=${RUN:-runs/long/mefem_s0}
LABELS=${LABELS:-runs/long/labels.csv}
IMAGES=${IMAGES:-../shared/data/utkface/images}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
mkdir -p "$OUT"

python - "$LABELS" "$OUT/labels.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
keep = {"train": 3000, "test": 1000}
picked = []
for split, n in keep.items():
    these = [r for r in rows if r["split"] == split]
    picked += these[:: len(these) // n][:n]  # spread over the name-sorted (so age-sorted) file
with open(sys.argv[2], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(picked)
PY
for split in train test; do
  [[ -f "$OUT/shards_$split/landmark_labels.csv" ]] || python -m mefem_jax.data.build_shards --images="$IMAGES" \
    --labels="$OUT/labels.csv" --split="$split" --out="$OUT/shards_$split" --landmark_labels --num_shards=2 --workers=2
done
python -m mefem_jax.evaluate --out="$OUT/eval" --model="$RUN" \
  --model="random:vits@112:patch=8,width=128,depth=4,heads=4,seed=0" \
  --model="timm:vit_small_patch16_224:img_size=112" \
  --train="$OUT/shards_train/landmark_labels.csv:images=$IMAGES" \
  --test="$OUT/shards_test/landmark_labels.csv:images=$IMAGES" \
  --targets=landmarks --features=cls,mean,grid,pixels --grid_size=7 --batch_size=64
