"""Survival probe: a penalised Cox model on frozen embeddings, scored by the concordance index.

Cox regression on hundreds of raw embedding dimensions is ill-conditioned (the partial likelihood
is flat along most of them and Newton steps diverge), so the features are standardised and
reduced by PCA, both fitted on train only, before an L2-penalised Cox fit (lifelines). The number
of components and the penalty are chosen together by k-fold concordance on train; the test split
is scored once.

The concordance index (Harrell's C) is the fraction of comparable test pairs whose predicted risk
orders them like their observed times: 0.5 is chance, 1.0 a perfect ranking.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

PENALIZERS = (0.01, 0.1, 1.0)
COMPONENTS = (8, 16, 32)
FOLDS = 3


class SurvivalError(ValueError):
    """Time / event columns that a Cox model cannot use."""


@dataclass
class SurvivalResult:
    c_index: float          # on the test split
    train_c_index: float    # apparent, on the train split (optimistic; a sanity reference)
    penalizer: float
    n_components: int
    n_events_train: int
    n_events_test: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def check_survival_columns(time: np.ndarray, event: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """float times >= 0 and 0/1 events, or a SurvivalError saying which rows are wrong."""
    time = np.asarray(time, np.float64)
    event = np.asarray(event, np.float64)
    bad_time = np.flatnonzero(~np.isfinite(time) | (time < 0))
    if bad_time.size:
        raise SurvivalError(f"{split}: {bad_time.size} time value(s) are not finite and >= 0 "
                            f"(first at rows {bad_time[:5].tolist()})")
    bad_event = np.flatnonzero((event != 0) & (event != 1))
    if bad_event.size:
        raise SurvivalError(f"{split}: event must be 0 (censored) or 1 (event); {bad_event.size} "
                            f"value(s) are not (first at rows {bad_event[:5].tolist()})")
    if event.sum() == 0:
        raise SurvivalError(f"{split}: no events (every row is censored); concordance is undefined")
    return time, event.astype(np.int64)


class _Reducer:
    """Standardise -> PCA (whitened), fitted on the rows it is given. Principal components are
    nested, so one fit with the most components serves every smaller count (`transform(x, k)`)."""

    def __init__(self, x: np.ndarray, max_components: int):
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(x)
        k = min(max_components, x.shape[0] - 1, x.shape[1])
        # whiten: unit-variance components, so one penalty weighs every component alike.
        self.pca = PCA(n_components=k, whiten=True, random_state=0).fit(self.scaler.transform(x))

    def transform(self, x: np.ndarray, k: int):
        import pandas as pd

        z = self.pca.transform(self.scaler.transform(x))[:, :k]
        return pd.DataFrame(z, columns=[f"pc{i}" for i in range(z.shape[1])])


def _fit_cox(z, time: np.ndarray, event: np.ndarray, penalizer: float):
    from lifelines import CoxPHFitter

    df = z.copy()
    df["_time"], df["_event"] = time, event
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lifelines' convergence chatter; the C-index tells
        return CoxPHFitter(penalizer=penalizer).fit(df, duration_col="_time", event_col="_event")


def _c_index(model, z, time: np.ndarray, event: np.ndarray) -> float:
    from lifelines.utils import concordance_index

    # Higher hazard means earlier failure: concordance expects scores that grow with time.
    return float(concordance_index(time, -np.asarray(model.predict_log_partial_hazard(z)), event))


def fit_survival_probe(x_train: np.ndarray, time_train: np.ndarray, event_train: np.ndarray,
                       x_test: np.ndarray, time_test: np.ndarray, event_test: np.ndarray,
                       components: tuple[int, ...] = COMPONENTS, penalizers: tuple[float, ...] = PENALIZERS,
                       folds: int = FOLDS, seed: int = 0) -> SurvivalResult:
    time_train, event_train = check_survival_columns(time_train, event_train, "train")
    time_test, event_test = check_survival_columns(time_test, event_test, "test")
    if len(time_train) < 2 * folds:
        raise SurvivalError(f"need at least {2 * folds} training rows for a survival probe, "
                            f"got {len(time_train)}")
    most = max(components)

    # (components, penalizer) by k-fold concordance on train; the reducer is refitted per fold.
    order = np.random.default_rng(seed).permutation(len(time_train))
    fold_of = np.empty(len(order), np.int64)
    fold_of[order] = np.arange(len(order)) % folds
    scores: dict[tuple[int, float], list[float]] = {}
    for k in range(folds):
        fit_rows, val_rows = fold_of != k, fold_of == k
        if event_train[val_rows].sum() == 0:
            continue  # a fold without events has no comparable pairs
        reducer = _Reducer(x_train[fit_rows], most)
        for n in components:
            z_fit, z_val = reducer.transform(x_train[fit_rows], n), reducer.transform(x_train[val_rows], n)
            for pen in penalizers:
                model = _fit_cox(z_fit, time_train[fit_rows], event_train[fit_rows], pen)
                scores.setdefault((z_fit.shape[1], pen), []).append(
                    _c_index(model, z_val, time_train[val_rows], event_train[val_rows]))
    # Ties go to fewer components, then to the stronger penalty: the simpler model.
    n_best, pen_best = max(scores, key=lambda c: (np.mean(scores[c]), -c[0], c[1]))

    reducer = _Reducer(x_train, most)
    z_train = reducer.transform(x_train, n_best)
    model = _fit_cox(z_train, time_train, event_train, pen_best)
    return SurvivalResult(
        c_index=_c_index(model, reducer.transform(x_test, n_best), time_test, event_test),
        train_c_index=_c_index(model, z_train, time_train, event_train),
        penalizer=float(pen_best), n_components=int(z_train.shape[1]),
        n_events_train=int(event_train.sum()), n_events_test=int(event_test.sum()))
