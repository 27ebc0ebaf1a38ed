"""The data a lent GPU machine pretrains and probes on, built here: shards of a labelled face set, and wheels.

    python benchmarks/gpu_data.py                                     # UTKFace -> runs/gpu_data, wheels -> .whl
    python benchmarks/gpu_data.py --out=runs/gpu_data_tiny --train_faces=300 --val_faces=100 \
        --test_faces=100 --num_shards=2 --wheels=                     # a few hundred faces, for --cpu dry runs

The GPU machine has no network, and what travels there (the repository, its untracked files and the
carried paths) must stay under 64 MiB, so the faces go as small JPEG shards that both the training
pipeline and the probes read (a shard folder is a data spec: mefem_jax/evaluation/data.py):

1. `scripts/carve_val.py` moves --val_percent of the train rows to a `val` split (a CRC of the file
   name decides, the same faces on every machine), so the probes during pretraining are scored on
   faces that are neither pretrained on nor the test split.
2. Each split's rows are shuffled with a fixed seed and cut to --{train,val,test}_faces (0: all), and
   written in that order to OUT_labels.csv beside OUT (it need not travel: the shards hold the labels).
   The shards keep the CSV's order, so the first N records of a shard folder are a random sample:
   `limit=N` (what the probes use to cap a split) draws evenly over ages, where UTKFace's own file
   order is sorted by age.
3. `python -m mefem_jax.data.build_shards` writes OUT/train, OUT/val and OUT/test at --image_size
   (the model's 112 px: the crops are taken from what is stored) and --jpeg_quality.
4. `pip download --no-deps` fills --wheels with the packages the machine lacks (grain, array-record,
   ml_collections, simplejpeg, cloudpickle, portpicker, and tensorboardX, which the training entry
   point's metric writer imports) for its Python: 3.12 (3.12.3 as the device notes list it; its pip
   refuses wheels of another Python, and gpu_pretrain.py records the version it found). .gitignore
   ignores .whl/, so the device tool's `carry` must name it, as it names the bundle.
5. The sizes are measured and written to OUT/bundle.md, with what the working tree adds; a bundle that
   would take the whole transfer over 64 MiB is refused (exit 2) after being measured.

Why the default subset (measured on UTKFace, 23,704 faces): at 112 px and JPEG quality 75 a face costs
~2.8 kB in a shard (2.6 kB of JPEG, the rest labels and fingerprints), so the whole set is ~64 MiB and
does not fit beside the repository (~3 MiB) and the wheels (~5 MiB). Quality 60 saves only 17 %. What
goes: all 4,728 test faces (the test split that docs/RESULTS.md scores on; 4,714 once build_shards has
dropped exact duplicates), 1,000 of the validation faces (the probes during training read at most 2,000)
and 13,000 of the 17,093 train faces (12,882 without duplicates): 50.8 MiB, 58.3 MiB with the rest.
Re-running is safe: carve_val and build_shards leave finished outputs as they are. The whole build takes
~1.5 minutes of one core (--workers=1, so a training job on the other core keeps its pace).
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
# What the GPU machine's image lacks (benchmarks/gpu_pipeline.sh), at the versions this repository runs.
WHEELS = ("grain==0.2.18", "array-record==0.8.6", "ml_collections==1.1.0", "simplejpeg==1.9.0",
          "cloudpickle==3.1.3", "portpicker==1.6.0", "tensorboardX==2.6.5")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
CARRY_LIMIT_MIB = 64


class BundleError(Exception):
    """Input that makes no bundle: one line for the user."""


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise BundleError(f"this command failed: {' '.join(cmd)}")


def choose_rows(carved: Path, sizes: dict[str, int], seed: int) -> list[dict]:
    """Each split's rows in a seeded random order, cut to its size (0: all)."""
    with carved.open(newline="") as f:
        rows = list(csv.DictReader(f))
    chosen = []
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        random.Random(f"{seed}:{split}").shuffle(part)
        chosen += part[:sizes[split] or None]
    return chosen


def write_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def download_wheels(folder: Path, python_version: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         python_version, "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS])
    # Two versions of one package stop the machine's `pip install *.whl` altogether.
    names = [w.name.split("-")[0].lower().replace("_", "-") for w in folder.glob("*.whl")]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BundleError(f"{folder} holds more than one wheel of {', '.join(twice)}; keep one of each")


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def working_tree_bytes(skip: list[Path]) -> int:
    """Bytes of the files that travel without being carried: tracked, and untracked but not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = [REPO / name for name in listed if name]
    return sum(f.stat().st_size for f in files
               if f.is_file() and not any(f.is_relative_to(s) for s in skip))


def report(out: Path, wheels: Path | None, counts: dict[str, int], args: argparse.Namespace) -> tuple[str, float]:
    """bundle.md's table of sizes, and the MiB that would travel to the GPU machine in all."""
    mib = 2 ** 20
    parts = {split: size_of(out / split) for split in SPLITS}
    data = size_of(out)
    wheel_bytes = size_of(wheels) if wheels else 0
    tree = working_tree_bytes([p.resolve() for p in (out, wheels) if p])
    total = data + wheel_bytes + tree
    lines = [f"# GPU data bundle: {out}", "",
             f"{args.faces}, {args.image_size} px, JPEG quality {args.jpeg_quality}, seed {args.seed}, "
             f"{args.val_percent} % of train carved to val.", "",
             "| part | faces | MiB |", "|---|---:|---:|"]
    lines += [f"| {split} shards | {counts[split]:,} | {parts[split] / mib:.1f} |" for split in SPLITS]
    lines += [f"| **bundle** | {sum(counts.values()):,} | **{data / mib:.1f}** |",
              f"| wheels ({wheels or 'none'}) | | {wheel_bytes / mib:.1f} |",
              f"| working tree (tracked + untracked, not ignored) | | {tree / mib:.1f} |",
              f"| **all that travels** | | **{total / mib:.1f}** of {CARRY_LIMIT_MIB} |"]
    if data:
        lines.append(f"\n{data / max(1, sum(counts.values())):.0f} bytes a face in the shards.")
    return "\n".join(lines) + "\n", total / mib


def shard_count(folder: Path) -> int:
    return int(json.loads((folder / "manifest.json").read_text())["num_records"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", default="../shared/data/utkface",
                   help="folder with labels.csv (with a split column) and images/")
    p.add_argument("--out", default="runs/gpu_data", help="bundle folder (under an ignored path: runs/)")
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--jpeg_quality", type=int, default=75)
    p.add_argument("--train_faces", type=int, default=13000, help="0: all")
    p.add_argument("--val_faces", type=int, default=1000, help="0: all")
    p.add_argument("--test_faces", type=int, default=0, help="0: all")
    p.add_argument("--val_percent", type=int, default=10, help="of the train rows, moved to val")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_shards", type=int, default=16, help="train shards; val and test get a quarter")
    p.add_argument("--workers", type=int, default=1, help="build_shards processes")
    p.add_argument("--wheels", default=".whl", help="folder for the machine's wheels; empty: none")
    p.add_argument("--python_version", default="3.12", help="the GPU machine's Python (3.12.3 there)")
    p.add_argument("--overwrite", action="store_true", help="replace shard folders built with other options")
    args = p.parse_args(argv)
    faces = (REPO / args.faces).resolve()
    out = (REPO / args.out).resolve()
    wheels = (REPO / args.wheels).resolve() if args.wheels else None
    sizes = {"train": args.train_faces, "val": args.val_faces, "test": args.test_faces}
    if not (faces / "labels.csv").is_file() or not (faces / "images").is_dir():
        raise BundleError(f"no labels.csv and images/ in {faces}")
    if min(sizes.values()) < 0 or not 32 <= args.image_size <= 1024 or not 1 <= args.jpeg_quality <= 100:
        raise BundleError("face counts must be >= 0, --image_size 32..1024, --jpeg_quality 1..100")

    out.mkdir(parents=True, exist_ok=True)
    carved = out.with_name(out.name + "_carved.csv")
    labels = out.with_name(out.name + "_labels.csv")
    run([sys.executable, "scripts/carve_val.py", f"--labels={faces / 'labels.csv'}", f"--out={carved}",
         f"--percent={args.val_percent}"])
    rows = choose_rows(carved, sizes, args.seed)
    carved.unlink()  # the chosen rows are in `labels`
    write_csv(rows, labels)
    for split in SPLITS:
        shards = args.num_shards if split == "train" else max(1, args.num_shards // 4)
        run([sys.executable, "-m", "mefem_jax.data.build_shards", f"--images={faces / 'images'}",
             f"--labels={labels}", f"--split={split}", f"--out={out / split}",
             f"--image_size={args.image_size}", f"--jpeg_quality={args.jpeg_quality}", f"--num_shards={shards}",
             f"--workers={args.workers}"] + ["--overwrite"] * args.overwrite)
    if wheels:
        download_wheels(wheels, args.python_version)

    counts = {split: shard_count(out / split) for split in SPLITS}
    text, total_mib = report(out, wheels, counts, args)
    (out / "bundle.md").write_text(text)
    print(text)
    if total_mib > CARRY_LIMIT_MIB:
        raise BundleError(f"{total_mib:.1f} MiB would travel, over the device tool's {CARRY_LIMIT_MIB} MiB: "
                          "fewer faces (--train_faces) or a lower --jpeg_quality")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BundleError as err:
        print(f"gpu_data: {err}", file=sys.stderr)
        sys.exit(2)
