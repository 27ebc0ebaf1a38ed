"""Linear probes on frozen features: ridge for regression, logistic for classification.

A probe measures what a frozen embedding makes *linearly* available, so the probe itself is kept
as plain as possible and every choice is made on the train split alone:

* features are standardised (mean 0, std 1 per dimension, fitted on train), so one penalty grid
  suits any encoder width or feature scale;
* the penalty is chosen by cross-validation on train (ridge: exact leave-one-out over an alpha
  grid; logistic: stratified k-fold over a C grid, scored by held-out log-loss, with the scaler
  refitted inside every fold) and the probe is refitted on all of train with it;
* the test split is touched once, to compute the metrics.

Regression predictions are clipped to the range of the training labels: a linear probe extrapolates
without bound, and a handful of faces whose features sit tens of standard deviations out (seen on
CLS readouts) would otherwise get ages like -560 and dominate MAE and R^2.

Metrics: MAE, RMSE, R^2 and Pearson r for regression; accuracy and ROC-AUC (macro one-vs-rest
for more than two classes) for classification, next to the majority-class accuracy so a reader
sees chance level beside the number.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
# Imported here, not lazily: `blas_threads` can only limit BLAS libraries already loaded, and
# scipy (under sklearn) brings its own OpenBLAS.
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

# Penalty grids, wide enough for raw pixels (hundreds of correlated dims) and for embeddings.
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 17))
LOGISTIC_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))
MAX_FOLDS = 5
LOGISTIC_MAX_ITER = 1000


def blas_threads(n: int | None):
    """Context limiting BLAS to `n` threads (None: leave the libraries' default).

    A probe is many small fits (folds x penalties); multi-threaded BLAS spends more time waking
    and synchronising threads than computing on them, badly so on a busy machine (a 16000 x 384
    multinomial fit measured 10x slower with 2 threads than with 1 on a loaded 2-core host).
    """
    return threadpool_limits(n) if n else contextlib.nullcontext()


class ProbeError(ValueError):
    """The labels cannot be probed as asked (too few classes or examples, unseen test classes, a
    constant regression target)."""


@dataclass
class ProbeResult:
    metrics: dict[str, float]
    penalty: dict[str, float]           # the chosen regulariser, e.g. {"alpha": 10.0}
    y_true: np.ndarray                  # test labels (class indices for classification)
    y_pred: np.ndarray                  # predictions (values, or class indices)
    scores: np.ndarray | None = None    # classification: [n_test, n_classes] probabilities
    classes: list[Any] = field(default_factory=list)
    # The fitted estimator (scaler + ridge / logistic pipeline), for readouts of the probe beyond the
    # test split (saliency.py's linear map); its predictions are unclipped, unlike y_pred.
    model: Any = None


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    y_true = np.asarray(y_true, np.float64)
    y_pred = np.asarray(y_pred, np.float64)
    err = y_pred - y_true
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    # Pearson r is undefined when either side is constant (e.g. a probe that predicts the mean).
    if np.std(y_true) > 0 and np.std(y_pred) > 0:
        pearson = float(np.corrcoef(y_true, y_pred)[0, 1])
    else:
        pearson = float("nan")
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))),
            "r2": r2, "pearson_r": pearson}


def classification_metrics(y_true: np.ndarray, scores: np.ndarray,
                           train_counts: np.ndarray | None = None) -> dict[str, float]:
    """y_true: class indices in [0, C); scores: [n, C] class probabilities.

    `train_counts` (per class) gives the majority class for the chance-level accuracy; without
    it the majority of the test labels is used.
    """
    y_true = np.asarray(y_true)
    n_classes = scores.shape[1]
    accuracy = float(np.mean(np.argmax(scores, axis=1) == y_true))
    counts = train_counts if train_counts is not None else np.bincount(y_true, minlength=n_classes)
    majority = float(np.mean(y_true == int(np.argmax(counts))))
    present = np.unique(y_true)
    if len(present) < 2:
        auc = float("nan")  # AUC needs both positives and negatives in the test labels
    elif n_classes == 2:
        auc = float(roc_auc_score(y_true, scores[:, 1]))
    else:
        # Macro one-vs-rest over the classes present in test (a class absent from test has no
        # positives, so its one-vs-rest AUC does not exist).
        aucs = [roc_auc_score(y_true == c, scores[:, c]) for c in present]
        auc = float(np.mean(aucs))
    return {"accuracy": accuracy, "roc_auc": auc, "majority_accuracy": majority}


# ---------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------
def _check_features(x_train: np.ndarray, x_test: np.ndarray) -> None:
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ProbeError(f"features must be [n, d] with the same d; got {x_train.shape} and {x_test.shape}")
    for name, x in (("train", x_train), ("test", x_test)):
        if not np.all(np.isfinite(x)):
            raise ProbeError(f"{name} features contain NaN or Inf")


def fit_regression_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                         y_test: np.ndarray, alphas: tuple[float, ...] = RIDGE_ALPHAS) -> ProbeResult:
    """Standardise -> ridge, alpha by leave-one-out on train (RidgeCV's exact GCV shortcut)."""
    _check_features(x_train, x_test)
    if len(y_train) < 3:
        raise ProbeError(f"need at least 3 training examples for a regression probe, got {len(y_train)}")
    y_train = np.asarray(y_train, np.float64)
    if np.ptp(y_train) == 0:  # as a single class is for a classifier: the clipped prediction is that value
        raise ProbeError(f"the train split has a single value ({y_train[0]:g}); nothing to probe")
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))
    model.fit(x_train, y_train)
    pred = np.clip(model.predict(x_test), y_train.min(), y_train.max())  # see the module docstring
    alpha = float(model[-1].alpha_)
    return ProbeResult(metrics=regression_metrics(y_test, pred), penalty={"alpha": alpha},
                       y_true=np.asarray(y_test, np.float64), y_pred=pred, model=model)


def encode_classes(y_train: np.ndarray, y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """Labels (any hashable values) -> class indices; error on test classes unseen in train or on
    a training class with fewer than two examples (it could not be cross-validated)."""
    classes, train_idx, counts = np.unique(y_train, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise ProbeError(f"the train split has a single class ({classes.tolist()}); nothing to probe")
    lonely = [c for c, n in zip(classes.tolist(), counts) if n < 2]
    if lonely:
        raise ProbeError(f"class(es) {lonely} have a single training example; a probe needs at "
                         f"least 2 per class (drop or merge them)")
    unseen = sorted(set(np.unique(y_test).tolist()) - set(classes.tolist()), key=str)
    if unseen:
        raise ProbeError(f"test labels {unseen} never occur in the train split")
    test_idx = np.searchsorted(classes, y_test)
    return train_idx, test_idx, classes.tolist()


def _logistic(c: float):
    # warm_start: along an increasing C path each fit starts from the previous solution, which
    # is what makes the grid affordable (weakly penalised fits on separable data are the slow ones).
    return LogisticRegression(C=c, max_iter=LOGISTIC_MAX_ITER, warm_start=True)


def _fold_log_losses(x: np.ndarray, y: np.ndarray, n_classes: int, cs: tuple[float, ...],
                     folds) -> np.ndarray:
    """Held-out log-loss [n_folds, n_cs]; the scaler is refitted on each fold's training part."""
    losses = []
    for fit_rows, val_rows in folds.split(x, y):
        scaler = StandardScaler().fit(x[fit_rows])
        x_fit, x_val = scaler.transform(x[fit_rows]), scaler.transform(x[val_rows])
        model, row = _logistic(cs[0]), []
        for c in cs:
            model.set_params(C=c)
            with warnings.catch_warnings():
                # A weakly penalised candidate may stop at max_iter; its held-out loss judges it.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x_fit, y[fit_rows])
            row.append(log_loss(y[val_rows], model.predict_proba(x_val), labels=np.arange(n_classes)))
        losses.append(row)
    return np.asarray(losses)


def fit_classification_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                             y_test: np.ndarray, cs: tuple[float, ...] = LOGISTIC_CS,
                             seed: int = 0) -> ProbeResult:
    """Standardise -> L2 logistic regression (multinomial for > 2 classes), C by stratified
    k-fold held-out log-loss on train."""
    _check_features(x_train, x_test)
    train_idx, test_idx, classes = encode_classes(np.asarray(y_train), np.asarray(y_test))
    counts = np.bincount(train_idx, minlength=len(classes))
    folds = StratifiedKFold(n_splits=int(min(MAX_FOLDS, counts.min())), shuffle=True, random_state=seed)
    cs = tuple(sorted(cs))
    best_c = cs[int(np.argmin(_fold_log_losses(x_train, train_idx, len(classes), cs, folds).mean(0)))]

    scaler = StandardScaler().fit(x_train)
    with warnings.catch_warnings():  # as in the folds: the held-out loss chose this C, converged or not
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = _logistic(best_c).fit(scaler.transform(x_train), train_idx)
    scores = model.predict_proba(scaler.transform(x_test))  # columns 0..C-1: train has every class
    return ProbeResult(metrics=classification_metrics(test_idx, scores, counts),
                       penalty={"C": float(best_c)}, y_true=test_idx,
                       y_pred=np.argmax(scores, axis=1), scores=scores, classes=classes,
                       model=make_pipeline(scaler, model))  # both fitted: the pipeline needs no fit
