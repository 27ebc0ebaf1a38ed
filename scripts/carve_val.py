"""Carve a validation split out of a labels CSV's train rows, deterministically, without touching the images.

    python scripts/carve_val.py --labels=../shared/data/utkface/labels.csv --out=runs/curves/labels.csv

Writes a copy of the CSV whose `split` column reads `val` for about `--percent` % of the `train` rows
(chosen by a CRC32 of the file name, so the same faces land in val on every machine and in every
run) and is unchanged otherwise. Pretraining shards and probe fits read `split=train`, knob choices
read `split=val`, and `split=test` is scored once at the end. The output holds labels only; point
`images=` at the original folder when reading it.
"""
from __future__ import annotations

import argparse
import csv
import sys
import zlib
from collections import Counter
from pathlib import Path


def carve(rows: list[dict], id_column: str, percent: int) -> list[dict]:
    out = []
    for row in rows:
        row = dict(row)
        if row["split"] == "train" and zlib.crc32(row[id_column].encode()) % 100 < percent:
            row["split"] = "val"
        out.append(row)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True, help="labels CSV with a `split` column")
    parser.add_argument("--out", required=True, help="where to write the carved CSV")
    parser.add_argument("--percent", type=int, default=10, help="percent of the train rows moved to val")
    parser.add_argument("--id_column", default="file")
    parser.add_argument("--overwrite", action="store_true", help="replace a different file at --out")
    args = parser.parse_args(argv)
    src = Path(args.labels)
    if not src.is_file():
        print(f"carve_val: no labels CSV at {src}", file=sys.stderr)
        return 2
    with src.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    missing = {"split", args.id_column} - set(fields)
    if missing:
        print(f"carve_val: {src} has no column(s) {sorted(missing)}", file=sys.stderr)
        return 2
    if not 0 < args.percent < 100:
        print(f"carve_val: --percent must be in 1..99, got {args.percent}", file=sys.stderr)
        return 2
    rows = carve(rows, args.id_column, args.percent)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    # Re-running with the same inputs rewrites the same bytes; any other file at --out is the user's.
    if out.exists() and out.read_bytes() != tmp.read_bytes() and not args.overwrite:
        tmp.unlink()
        print(f"carve_val: {out} exists and holds something else; pass --overwrite to replace it", file=sys.stderr)
        return 2
    tmp.replace(out)
    print(f"{out}: " + ", ".join(f"{k} {v}" for k, v in sorted(Counter(r['split'] for r in rows).items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
