"""Weighted k-nearest-neighbour evaluation of frozen features, DINO's protocol (Caron et al. 2021).

A linear probe asks what the embedding makes linearly available; kNN asks whether faces that share
a label lie close together, with no fitted parameters at all (nothing to cross-validate, nothing
that could rescue a badly scaled feature). The rule, for every test face:

* features are L2-normalised, so the similarity to a train face is the cosine of their angle;
* the k most similar train faces vote, each with weight exp(similarity / T), T = 0.07: a near
  neighbour counts for far more than the k-th (at T = 0.07 a similarity 0.1 higher weighs 4x);
* classification: a class's score is the summed weight of its voters, the scores normalised to sum
  to 1 so they serve as probabilities for ROC-AUC; regression: the weighted mean of the voters'
  labels (it stays inside the train labels' range, so no clipping is needed).

Rows are selected and metrics computed as for the linear probe (targets.probe_split,
probes.regression_metrics / classification_metrics, bootstrap.py), so a kNN row sits beside a
linear row with the same metric names. Other kinds (survival, landmarks) are refused.

Memory stays bounded on large train sets: test rows are scored `chunk` at a time, so only chunk x
n_train similarities (and argpartition's indices of that shape) exist at once, about 300 MB for
1024 x 20,000 float32 features. The arithmetic runs in the features' precision, float32 at least.
"""
from __future__ import annotations


import numpy as np

from mefem_jax.evaluation import bootstrap
from mefem_jax.evaluation.probes import ProbeResult, classification_metrics, regression_metrics
from mefem_jax.evaluation.targets import Target, TargetError, class_labels, probe_split

K_VALUES = (10, 20)
TEMPERATURE = 0.07
CHUNK = 1024


class KnnError(ValueError):
    """A k or temperature the kNN rule cannot use."""


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.result_type(x, np.float32))
    # A zero row stays zero (cosine 0 to everything) instead of becoming NaN.
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check(k: int, temperature: float) -> None:
    if k < 1:
        raise KnnError(f"kNN needs k >= 1, got k={k}")
    if not temperature > 0:
        raise KnnError(f"kNN needs a temperature > 0, got {temperature}")


def _neighbours(train_x: np.ndarray, test_x: np.ndarray, k: int, temperature: float, chunk: int):
    """Yields (test row slice, [m, k] train indices, [m, k] weights) for the test rows, chunk by chunk."""
    train_u, test_u = _unit_rows(train_x), _unit_rows(test_x)
    k = min(k, len(train_u))
    for start in range(0, len(test_u), chunk):
        sim = test_u[start:start + chunk] @ train_u.T
        # argpartition finds the k largest without sorting every row; their order does not matter.
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sim, idx, axis=1)
        # Shifting by the row's best similarity leaves every normalised score and mean unchanged and
        # keeps exp() finite for any temperature.
        weights = np.exp((top - top.max(axis=1, keepdims=True)) / temperature)
        yield slice(start, start + len(sim)), idx, weights


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, k: int,
               temperature: float = TEMPERATURE, chunk: int = CHUNK) -> np.ndarray:
    """[n_test, n_classes] class probabilities (rows sum to 1) from the k nearest train rows' weighted
    votes; `train_y` holds class indices in [0, n_classes). k above n_train uses every train row."""
    _check(k, temperature)
    train_y = np.asarray(train_y)
    out = np.zeros((len(test_x), n_classes), np.float64)
    for rows, idx, weights in _neighbours(train_x, test_x, k, temperature, chunk):
        votes = np.zeros((len(idx), n_classes), np.float64)
        np.add.at(votes, (np.arange(len(idx))[:, None], train_y[idx]), weights)
        out[rows] = votes / votes.sum(axis=1, keepdims=True)
    return out


def knn_regress(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int,
                temperature: float = TEMPERATURE, chunk: int = CHUNK) -> np.ndarray:
    """[n_test] weighted mean of the k nearest train rows' labels."""
    _check(k, temperature)
    train_y = np.asarray(train_y, np.float64)
    out = np.zeros(len(test_x), np.float64)
    for rows, idx, weights in _neighbours(train_x, test_x, k, temperature, chunk):
        out[rows] = np.sum(weights * train_y[idx], axis=1) / weights.sum(axis=1)
    return out


def _encode(y_train: np.ndarray, y_test: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, list]:
    """Class labels -> indices. Unlike the logistic probe, a class with one train face is fine (no folds)."""
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise TargetError(f"target {name!r}: the train split has a single class ({classes.tolist()}); "
                          "nothing to probe")
    unseen = sorted(set(np.unique(y_test).tolist()) - set(classes.tolist()), key=str)
    if unseen:
        raise TargetError(f"target {name!r}: test labels {unseen} never occur in the train split")
    return np.searchsorted(classes, y_train), np.searchsorted(classes, y_test), classes.tolist()


def knn_probe(target: Target, train, test, feature: str, k: int, seed: int = 0,
              intervals: bool = False) -> tuple[dict, ProbeResult]:
    """Score one target by weighted kNN on `train` / `test` (`embeddings.Embeddings`). Returns the report
    row (probe_target's layout plus "protocol": "knn", "k" as asked, "k_used", "temperature", and a
    "note" when k exceeds the labelled train rows) and the ProbeResult. `seed`: the bootstrap's."""
    if target.kind not in ("regression", "classification"):
        raise TargetError(f"target {target.name!r}: kNN scores regression and classification targets, "
                          f"not {target.kind} (use the linear protocol)")
    _check(k, TEMPERATURE)
    row, x_train, y_train, x_test, y_test = probe_split(target, train, test, feature)
    n_train = row["n_train"]
    for split, x in (("train", x_train), ("test", x_test)):
        if not np.all(np.isfinite(x)):
            raise TargetError(f"target {target.name!r} ({feature} features): {split} features contain NaN or Inf")
    k_used = min(k, n_train)
    row.update(protocol="knn", k=k, k_used=k_used, temperature=TEMPERATURE)
    if k_used < k:
        row["note"] = f"k={k} > {n_train} labelled train rows: every train row votes (k={k_used})"

    if target.kind == "classification":
        train_idx, test_idx, classes = _encode(class_labels(y_train[0]), class_labels(y_test[0]), target.name)
        scores = knn_scores(x_train, train_idx, x_test, len(classes), k)
        counts = np.bincount(train_idx, minlength=len(classes))
        result = ProbeResult(metrics=classification_metrics(test_idx, scores, counts), penalty={"k": k_used},
                             y_true=test_idx, y_pred=np.argmax(scores, axis=1), scores=scores, classes=classes)
        row.update(metrics=result.metrics, classes=classes)
        if intervals:
            row["intervals"] = bootstrap.classification_intervals(test_idx, scores, seed=seed)
        return row, result
    if np.ptp(y_train[0]) == 0:  # the linear probe's rule: a single train value is nothing to probe
        raise TargetError(f"target {target.name!r}: the train split has a single value ({y_train[0][0]:g}); "
                          "nothing to probe")
    pred = knn_regress(x_train, y_train[0], x_test, k)
    result = ProbeResult(metrics=regression_metrics(y_test[0], pred), penalty={"k": k_used},
                         y_true=np.asarray(y_test[0], np.float64), y_pred=pred)
    row["metrics"] = result.metrics
    if intervals:
        row["intervals"] = bootstrap.regression_intervals(result.y_true, pred, seed=seed)
    return row, result
