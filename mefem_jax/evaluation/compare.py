"""Several encoders on the same faces: each one's probe against the first encoder's, row by row.

`evaluate --model=A --model=B --model=C` fits the same probes on every encoder's embeddings of the same
train and test images. Two test scores whose intervals overlap can still differ reliably, because
most of the test-set noise (which faces are hard) is shared: the paired bootstrap of
`bootstrap.paired_difference` resamples the test faces jointly and gives the interval of the
difference itself. The per-face score is the absolute error for a regression (MAE), correctness for
a classification (accuracy) and the per-face NME for landmarks; a negative difference in MAE or NME is
better, a positive one in accuracy is better.

Faces are paired by id, over the faces both encoders scored: an encoder that could not read an image
(or a label left out) drops only that face from its pairs, and the count is in the row.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Any

import numpy as np

from mefem_jax.evaluation import bootstrap

# kind -> (headline metric, whether lower is better)
HEADLINE = {"regression": ("mae", True), "classification": ("accuracy", False), "landmarks": ("nme", True)}


@dataclass
class Scored:
    """One probe's test predictions, reduced to what pairing needs."""
    row: dict[str, Any]       # the report row (target, kind, features, protocol, model, metrics)
    ids: np.ndarray           # test image ids, in the order of `per_face`
    per_face: np.ndarray      # the per-face score whose mean is the headline metric


def per_face_scores(kind: str, result) -> np.ndarray | None:
    """The per-face score of a probe result (module docstring); None for kinds without one (survival)."""
    if kind == "regression":
        return np.abs(np.asarray(result.y_pred, np.float64) - np.asarray(result.y_true, np.float64))
    if kind == "classification":
        return (np.argmax(result.scores, axis=1) == result.y_true).astype(np.float64)
    if kind == "landmarks":
        return np.asarray(result.per_face_nme, np.float64)
    return None


def _key(row: dict) -> tuple:
    return row["target"], row["features"], row.get("protocol", "linear"), row.get("k")


def paired_comparison(scored: list[Scored], baseline: str, seed: int = 0) -> list[dict]:
    """One row per probe of every other encoder that the baseline encoder also ran (same target,
    readout, protocol): the other's headline metric minus the baseline's, over the faces both scored,
    with its paired 95 % interval."""
    base = {_key(s.row): s for s in scored if s.row["model"] == baseline}
    rows = []
    for s in scored:
        ref = base.get(_key(s.row))
        if s.row["model"] == baseline or ref is None:
            continue
        metric, lower_better = HEADLINE[s.row["kind"]]
        shared, i, j = np.intersect1d(s.ids, ref.ids, assume_unique=True, return_indices=True)
        if len(shared) == 0:
            continue
        diff = bootstrap.paired_difference(s.per_face[i], ref.per_face[j], seed=seed)
        better = diff["high"] < 0 if lower_better else diff["low"] > 0
        worse = diff["low"] > 0 if lower_better else diff["high"] < 0
        rows.append({"target": s.row["target"], "kind": s.row["kind"], "features": s.row["features"],
                     "protocol": s.row.get("protocol", "linear"), "k": s.row.get("k"),
                     "model": s.row["model"], "baseline": baseline, "metric": metric,
                     "value": float(s.per_face[i].mean()), "baseline_value": float(ref.per_face[j].mean()),
                     "n_paired": int(len(shared)), **diff,
                     "verdict": "better" if better else "worse" if worse else "no clear difference"})
    return rows


PER_FACE_COLUMNS = ("model", "target", "kind", "features", "protocol", "k", "id", "score")


def write_per_face(path, scored: list[Scored]) -> int:
    """Every probe's per-face test score (module docstring) as one CSV, so runs made elsewhere (a
    fine-tune's test/predictions.csv, another evaluate) can be paired with these probes face by face.
    Returns the number of rows written."""
    rows = 0
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PER_FACE_COLUMNS)
        for s in scored:
            head = [s.row["model"], s.row["target"], s.row["kind"], s.row["features"],
                    s.row.get("protocol", "linear"), "" if s.row.get("k") is None else s.row["k"]]
            for face, score in zip(s.ids, s.per_face):
                writer.writerow(head + [face, repr(float(score))])
                rows += 1
    return rows
