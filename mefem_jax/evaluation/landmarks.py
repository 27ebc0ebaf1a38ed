"""Face alignment from frozen features, scored as FaRL scores 300-W: `--targets=landmarks`.

A linear probe maps one feature readout (cls, mean, grid, pixels) to the 68 landmark points that
`build_shards --landmark_labels` stores (landmark_points.py: lm00_x ... lm67_y, in units of the side of
the image the encoder sees). As in probes.py, the probe is kept plain and chosen on train alone: features
standardised on train, one multi-output ridge whose single alpha is picked by exact leave-one-out (RidgeCV's
GCV shortcut, the squared error averaged over the 136 coordinates), refitted on all of train. Predictions
are clipped per coordinate to the training range, as the regression probe's are: a few faces whose
features sit far out would otherwise land points off the image and dominate the mean.

Metrics, per test face, then over faces:

    nme             mean over the 68 points of the L2 error / the inter-ocular distance (the true outer eye
                    corners, points 36 and 45: 300-W's normalisation), averaged over faces
    nme_median      its median over faces
    fr_10           the failure rate: the share of faces with NME > 0.1
    nme_mean_shape  the NME of predicting the train faces' mean shape for every face: the chance level,
                    as majority_accuracy is for a classifier

With `intervals`, percentile-bootstrap 95 % intervals of nme and fr_10 over the test faces (bootstrap.py's
resampling and level). A row with any point missing (empty, NaN) or not finite is left out and counted
(n_missing_*, n_nonfinite_*), as targets.py does for a single label.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mefem_jax.data.shards.landmark_points import COLUMNS as LANDMARK_COLUMNS
from mefem_jax.data.shards.landmark_points import NUM_POINTS
from mefem_jax.evaluation import bootstrap
from mefem_jax.evaluation.probes import RIDGE_ALPHAS
from mefem_jax.evaluation.targets import LANDMARKS, Target, TargetError, check_columns, probe_split

__all__ = ["LANDMARK_COLUMNS", "LandmarkResult", "landmark_probe", "nme"]

OUTER_EYE_CORNERS = (36, 45)  # 0-based, dlib's (and 300-W's) 68-point layout
FAILURE_NME = 0.1
TARGET = Target(LANDMARKS, LANDMARK_COLUMNS)  # what `--targets=landmarks` parses to


@dataclass
class LandmarkResult:
    metrics: dict[str, float]
    penalty: dict[str, float]   # {"alpha": the ridge penalty chosen on train}
    y_true: np.ndarray          # [n_test, 68, 2] test points
    y_pred: np.ndarray          # [n_test, 68, 2] predicted points
    per_face_nme: np.ndarray    # [n_test] NME of each test face, for paired comparisons (bootstrap.py)


def nme(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-face NME of [n, 68, 2] predicted and true points: the mean L2 error over the points over the
    true inter-ocular distance (outer eye corners). float64 [n]."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if pred.shape != true.shape or pred.ndim != 3 or pred.shape[1:] != (NUM_POINTS, 2):
        raise ValueError(f"nme needs [n, {NUM_POINTS}, 2] predictions and truths of one shape, "
                         f"got {list(pred.shape)} and {list(true.shape)}")
    a, b = OUTER_EYE_CORNERS
    iod = np.linalg.norm(true[:, a] - true[:, b], axis=-1)
    return np.linalg.norm(pred - true, axis=-1).mean(1) / iod


def _as_points(values: list[np.ndarray]) -> np.ndarray:
    """The 136 coordinate columns of the rows kept (targets.probe_rows) -> [n, 68, 2] float64."""
    return np.stack(values, axis=1).reshape(-1, NUM_POINTS, 2)


def _fit(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, float]:
    """Standardise -> multi-output ridge (one alpha, leave-one-out on train); (test predictions, alpha)."""
    for name, x in (("train", x_train), ("test", x_test)):
        if x.ndim != 2 or not np.all(np.isfinite(x)):
            raise TargetError(f"target 'landmarks': {name} features must be a finite [n, d] array")
    flat = y_train.reshape(len(y_train), -1)
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS)).fit(x_train, flat)
    pred = np.clip(model.predict(x_test), flat.min(0), flat.max(0))  # see the module docstring
    return pred.reshape(-1, NUM_POINTS, 2), float(model[-1].alpha_)


def _metrics(per_face: np.ndarray, mean_shape: np.ndarray) -> dict[str, float]:
    return {"nme": float(per_face.mean()), "fr_10": float(np.mean(per_face > FAILURE_NME)),
            "nme_median": float(np.median(per_face)), "nme_mean_shape": float(mean_shape.mean())}


def _intervals(per_face: np.ndarray, seed: int) -> dict[str, list[float]]:
    """Percentile-bootstrap intervals of nme and fr_10 over the test faces (bootstrap.py's conventions:
    N_BOOT resamples of the rows with replacement from a fixed seed, the LEVEL percentiles)."""
    idx = np.random.default_rng(seed).integers(0, len(per_face), size=(bootstrap.N_BOOT, len(per_face)))
    tail = 100.0 * (1.0 - bootstrap.LEVEL) / 2.0
    out = {}
    for name, values in (("nme", per_face), ("fr_10", (per_face > FAILURE_NME).astype(np.float64))):
        lo, hi = np.percentile(values[idx].mean(1), [tail, 100.0 - tail])
        out[name] = [float(lo), float(hi)]
    return out


def landmark_probe(train, test, feature: str, seed: int = 0, intervals: bool = False) -> tuple[dict, Any]:
    """Fit and score the landmark probe on one feature set. `train` / `test` are `embeddings.Embeddings`
    whose labels hold LANDMARK_COLUMNS. Returns the report row (JSON-ready, shaped like
    targets.probe_target's) and the LandmarkResult; `intervals` adds row["intervals"]."""
    check_columns([TARGET], list(train.labels), "train")
    check_columns([TARGET], list(test.labels), "test")
    row, x_train, values_train, x_test, values_test = probe_split(TARGET, train, test, feature)
    if row["n_train"] < 3:  # leave-one-out needs a few faces; fewer cannot make a probe
        raise TargetError(f"target 'landmarks': need at least 3 train faces with all 68 points, got {row['n_train']}")
    y_train, y_test = _as_points(values_train), _as_points(values_test)
    pred, alpha = _fit(x_train, y_train, x_test)
    per_face = nme(pred, y_test)
    mean_shape = nme(np.broadcast_to(y_train.mean(0), y_test.shape), y_test)
    result = LandmarkResult(_metrics(per_face, mean_shape), {"alpha": alpha}, y_test, pred, per_face)
    row.update(penalty=result.penalty, metrics=result.metrics)
    if intervals:
        row["intervals"] = _intervals(per_face, seed)
    return row, result
