"""Is encoder A better than encoder B on the same test faces? A paired bootstrap over the test rows.

    python scripts/paired_compare.py runs/curves/test_mefem_s0 runs/curves/test_random_s0 \
        --targets=age:regression,gender:classification,race:classification --features=cls

Both folders are `python -m mefem_jax.evaluate` outputs on the same train/test specs. The probes
are refitted from the embeddings those runs cached (same penalty search, same seed, so the same
predictions as their reports), and for each target the difference A - B of the per-face score
(absolute age error; 0/1 correctness) gets a 95 % interval from resampling the faces jointly
(`evaluation.bootstrap.paired_difference`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from mefem_jax.evaluation.bootstrap import paired_difference
from mefem_jax.evaluation.embeddings import Embeddings
from mefem_jax.evaluation.probes import blas_threads
from mefem_jax.evaluation.targets import parse_targets, probe_target

_TARGETS = flags.DEFINE_string("targets", "age:regression,gender:classification", "as for evaluate")
_FEATURES = flags.DEFINE_list("features", ["cls"], "readouts to compare")


def _embeddings(folder: Path) -> tuple[Embeddings, Embeddings]:
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {folder} is not an evaluate output folder ({err})") from None
    caches = [report.get("data", {}).get(split, {}).get("cache") for split in ("train", "test")]
    if not all(caches) or not all(Path(c).is_file() for c in caches):
        raise SystemExit(f"error: {folder} has no cached embeddings to refit from (run evaluate with its cache)")
    return Embeddings.load(Path(caches[0])), Embeddings.load(Path(caches[1]))


def _per_row(target, train, test, feature) -> np.ndarray:
    _, result = probe_target(target, train, test, feature)
    if target.kind == "regression":
        return np.abs(result.y_pred - result.y_true)
    return (result.y_pred == result.y_true).astype(np.float64)


def main(argv) -> None:
    if len(argv) != 3:
        raise app.UsageError("give two evaluate output folders: A B")
    (a_train, a_test), (b_train, b_test) = _embeddings(Path(argv[1])), _embeddings(Path(argv[2]))
    if a_test.ids.tolist() != b_test.ids.tolist():
        raise SystemExit("error: the two evaluations scored different test faces")
    print(f"A = {argv[1]}, B = {argv[2]}, {len(a_test)} test faces; A - B with a paired 95 % interval")
    print("| target | readout | score | A | B | A - B [95 % interval] |\n|---|---|---|---:|---:|---:|")
    with blas_threads(1):
        for target in parse_targets(_TARGETS.value):
            for feature in _FEATURES.value:
                ra, rb = _per_row(target, a_train, a_test, feature), _per_row(target, b_train, b_test, feature)
                d = paired_difference(ra, rb)
                score = "abs. error" if target.kind == "regression" else "accuracy"
                print(f"| {target.name} | {feature} | {score} | {ra.mean():.3f} | {rb.mean():.3f} | "
                      f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] |")


if __name__ == "__main__":
    sys.exit(app.run(main))
