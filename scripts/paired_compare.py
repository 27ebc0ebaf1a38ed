"""Is encoder A better than encoder B on the same test faces? A paired bootstrap over the test rows.

    python scripts/paired_compare.py runs/curves/test_mefem_s0 runs/curves/test_random_s0 \
        --targets=age:regression,gender:classification,race:classification --features=cls

Both folders are `python -m mefem_jax.evaluate` outputs on the same train/test specs. Each probe's
per-face test score (absolute error; 0/1 correctness) is read from the folder's per_face.csv, which
evaluate writes; a folder from before that file existed has its probes refitted from the embeddings it
cached (same penalty search, same seed, so the same predictions as its report). For each target and
readout the difference A - B of the per-face score, over the faces both scored, gets a 95 % interval
from resampling the faces jointly (`evaluation.bootstrap.paired_difference`).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from mefem_jax.evaluation.bootstrap import paired_difference
from mefem_jax.evaluation.compare import per_face_scores
from mefem_jax.evaluation.embeddings import Embeddings
from mefem_jax.evaluation.probes import blas_threads
from mefem_jax.evaluation.targets import parse_targets, probe_target

_TARGETS = flags.DEFINE_string("targets", "age:regression,gender:classification", "as for evaluate")
_FEATURES = flags.DEFINE_list("features", ["cls"], "readouts to compare")


def _report(folder: Path) -> dict:
    try:
        return json.loads((folder / "report.json").read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {folder} is not an evaluate output folder ({err})") from None


def _from_per_face(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(target, readout) -> {test face id: score} of the linear probes in evaluate's per_face.csv."""
    scores: dict[tuple[str, str], dict[str, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["protocol"] == "linear" and not row["k"]:
                scores.setdefault((row["target"], row["features"]), {})[row["id"]] = float(row["score"])
    return scores


def _refitted(folder: Path, report: dict, targets, features) -> dict[tuple[str, str], dict[str, float]]:
    """The same mapping from probes refitted on the embeddings an older evaluate cached."""
    caches = [report.get("data", {}).get(split, {}).get("cache") for split in ("train", "test")]
    if not all(caches) or not all(Path(c).is_file() for c in caches):
        raise SystemExit(f"error: {folder} has neither per_face.csv nor cached embeddings to refit from")
    train, test = Embeddings.load(Path(caches[0])), Embeddings.load(Path(caches[1]))
    scores = {}
    with blas_threads(1):
        for target in targets:
            for feature in features:
                _, result = probe_target(target, train, test, feature)
                per_row = per_face_scores(target.kind, result)  # what evaluate writes to per_face.csv
                scores[(target.name, feature)] = dict(zip(test.ids.tolist(), per_row.tolist()))
    return scores


def per_face(folder: Path, targets, features) -> dict[tuple[str, str], dict[str, float]]:
    report = _report(folder)  # an evaluate output folder, or one line saying it is not
    path = folder / "per_face.csv"
    return _from_per_face(path) if path.is_file() else _refitted(folder, report, targets, features)


def main(argv) -> None:
    if len(argv) != 3:
        raise app.UsageError("give two evaluate output folders: A B")
    targets = parse_targets(_TARGETS.value)
    a, b = (per_face(Path(folder), targets, _FEATURES.value) for folder in argv[1:])
    print(f"A = {argv[1]}, B = {argv[2]}; A - B over the test faces both scored, with a paired 95 % interval")
    print("| target | readout | score | faces | A | B | A - B [95 % interval] |\n|---|---|---|---:|---:|---:|---:|")
    for target in targets:
        for feature in _FEATURES.value:
            sa, sb = a.get((target.name, feature)), b.get((target.name, feature))
            if not sa or not sb:
                print(f"| {target.name} | {feature} | - | 0 | - | - | not probed in both folders |")
                continue
            shared = sorted(set(sa) & set(sb))
            ra, rb = np.array([sa[i] for i in shared]), np.array([sb[i] for i in shared])
            d = paired_difference(ra, rb)
            score = "abs. error" if target.kind == "regression" else "accuracy"
            print(f"| {target.name} | {feature} | {score} | {len(shared)} | {ra.mean():.3f} | {rb.mean():.3f} | "
                  f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] |")


if __name__ == "__main__":
    sys.exit(app.run(main))
