"""What `--targets` asks for, and one probe per (target, feature set) on train/test embeddings.

    --targets=age:regression,gender:classification,race:classification,time,event:survival

Comma-separated; each target ends with `:KIND`. Regression and classification take one label
column; survival takes two, the follow-up time then the event flag (1 = event, 0 = censored).

    --targets=anthropometry            every facial proportion of `build_shards --landmark_labels`
    --targets=anthropometry,age:regression

`anthropometry` stands for one regression target per proportion (`face_proportions.NAMES`: eye
width, nose length, ... each over the inter-ocular distance), so any folder built with landmark
labels, or its landmark_labels.csv, yields an anthropometric benchmark in one run.

    --targets=landmarks                the 68 points of `build_shards --landmark_labels`, one probe
    --targets=landmarks,age:regression

`landmarks` is one target of its own kind: a single multi-output probe of the 136 point coordinates
(landmark_points.COLUMNS), scored as face alignment is (NME, failure rate; evaluation/landmarks.py).

A row whose label is empty (or NaN) for a target is left out of that target's probe and counted
(`n_missing_*` in the report); so is, in a regression or survival column, a value that is not finite
(inf, -inf, or a number too large for a float such as 1e400), counted apart (`n_nonfinite_*`, and a
warning in the report). A label that is present but unusable (text in a regression or survival column)
is an error naming the column and examples, since it means the wrong column. A regression target with a
single value in the train split is refused, as a classification target with a single class is: there is
nothing to probe, and its clipped predictions would score a perfect MAE of 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mefem_jax.data.shards.face_proportions import NAMES as PROPORTIONS
from mefem_jax.data.shards.landmark_points import COLUMNS as LANDMARK_COLUMNS
from mefem_jax.evaluation import bootstrap
from mefem_jax.evaluation.probes import ProbeError, fit_classification_probe, fit_regression_probe
from mefem_jax.evaluation.survival import SurvivalError, fit_survival_probe

KINDS = {"regression": 1, "classification": 1, "survival": 2}  # kind -> number of columns
# Names that stand for several targets at once.
PRESETS = {"anthropometry": tuple((name, "regression") for name in PROPORTIONS)}
LANDMARKS = "landmarks"  # the name and the kind of the landmark target (evaluation/landmarks.py)


class TargetError(ValueError):
    """A --targets value that is malformed or names labels the data do not have."""


@dataclass(frozen=True)
class Target:
    kind: str
    columns: tuple[str, ...]

    @property
    def name(self) -> str:
        return LANDMARKS if self.kind == LANDMARKS else ",".join(self.columns)


def parse_targets(text: str) -> list[Target]:
    targets, pending = [], []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            raise TargetError(f"--targets={text!r}: empty entry")
        if token in PRESETS and not pending:
            targets += [Target(kind, (column,)) for column, kind in PRESETS[token]]
            continue
        if token == LANDMARKS and not pending:
            targets.append(Target(LANDMARKS, LANDMARK_COLUMNS))
            continue
        name, sep, kind = token.rpartition(":")
        if not sep:
            pending.append(token)  # a column of a multi-column target; its kind comes later
            continue
        if kind not in KINDS:
            raise TargetError(f"--targets: unknown kind {kind!r} in {token!r}; kinds are {sorted(KINDS)}")
        columns = (*pending, name)
        pending = []
        if len(columns) != KINDS[kind] or not all(columns):
            usage = "TIME,EVENT:survival" if kind == "survival" else f"COLUMN:{kind}"
            raise TargetError(f"--targets: {kind} takes {KINDS[kind]} column(s) ({usage}), got {list(columns)}")
        targets.append(Target(kind, columns))
    if pending:
        raise TargetError(f"--targets: {pending} lack a :KIND (one of {sorted(KINDS)})")
    if not targets:
        raise TargetError("--targets is empty")
    seen = [t.name for t in targets]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise TargetError(f"--targets names {twice} twice")
    return targets


def check_columns(targets: list[Target], available: list[str], where: str) -> None:
    for t in targets:
        unknown = [c for c in t.columns if c not in available]
        if unknown:
            what = ("facial proportions" if set(unknown) <= set(PROPORTIONS) else
                    "the 68 landmark points" if set(unknown) <= set(LANDMARK_COLUMNS) else None)
            hint = (f"; {what} come from `build_shards --landmark_labels` (its shards, or landmark_labels.csv)"
                    if what else "")
            raise TargetError(f"target column(s) {_shown(unknown)} not in the {where} data; its labels are "
                              f"{_shown(available)}{hint}")


def _shown(columns: list[str]) -> list[str]:
    """Sorted column names for a message, the 136 landmark point columns (if any) as one entry."""
    points = set(columns) & set(LANDMARK_COLUMNS)
    rest = sorted(c for c in columns if c not in points)
    if not points:
        return rest
    first = next(c for c in LANDMARK_COLUMNS if c in points)
    return rest + [f"{len(points)} landmark point columns ({first} ...)"]


def missing_labels(values: np.ndarray) -> np.ndarray:
    """Empty strings and NaN are missing labels."""
    if values.dtype.kind in "US":
        stripped = np.char.strip(values.astype(str))
        return (stripped == "") | (np.char.lower(stripped) == "nan")
    if values.dtype.kind == "f":
        return np.isnan(values)
    return np.zeros(values.shape, bool)


def numeric(values: np.ndarray, column: str, where: str) -> np.ndarray:
    """Label values -> float64; TargetError naming the offending values when some are not numbers."""
    if values.dtype.kind in "iufb":
        return values.astype(np.float64)
    out = np.empty(len(values), np.float64)
    bad = []
    for i, v in enumerate(values.astype(str)):
        try:
            out[i] = float(v)
        except ValueError:
            bad.append(v)
    if bad:
        raise TargetError(f"{where} column {column!r} must be numeric but holds {len(bad)} non-numeric "
                          f"value(s), e.g. {sorted(set(bad))[:5]}")
    return out


def class_labels(values: np.ndarray) -> np.ndarray:
    """Class labels as strings, so 1 and "1" (CSV text vs typed shards) are the same class."""
    if values.dtype.kind == "f" and np.all(values == np.round(values)):
        values = values.astype(np.int64)
    return np.char.strip(values.astype(str))


def probe_rows(target: Target, labels: dict[str, np.ndarray], where: str):
    """The rows of one split that `target` can use: (mask over the rows, the label arrays of those rows
    (float64 for numeric kinds), {"missing": n, "nonfinite": n} rows left out)."""
    keep = ~np.any([missing_labels(labels[c]) for c in target.columns], axis=0)
    values = [labels[c][keep] for c in target.columns]
    dropped = {"missing": int((~keep).sum()), "nonfinite": 0}
    if target.kind != "classification":
        values = [numeric(v, c, where) for v, c in zip(values, target.columns)]
        finite = np.all([np.isfinite(v) for v in values], axis=0)
        dropped["nonfinite"] = int((~finite).sum())
        keep[keep] = finite
        values = [v[finite] for v in values]
    return keep, values, dropped


def probe_split(target: Target, train, test, feature: str):
    """What every protocol fits on: (the report row's head, train features, train label arrays, test features,
    test label arrays), the rows chosen by `probe_rows` on each split; TargetError for a split left empty."""
    keep_train, y_train, dropped_train = probe_rows(target, train.labels, "train")
    keep_test, y_test, dropped_test = probe_rows(target, test.labels, "test")
    row: dict[str, Any] = {"target": target.name, "kind": target.kind, "features": feature,
                           "n_train": int(keep_train.sum()), "n_test": int(keep_test.sum())}
    for reason in ("missing", "nonfinite"):
        row[f"n_{reason}_train"], row[f"n_{reason}_test"] = dropped_train[reason], dropped_test[reason]
    for split, n in (("train", row["n_train"]), ("test", row["n_test"])):
        if n == 0:
            raise TargetError(f"target {target.name!r}: no labelled rows in the {split} split")
    return row, train.features[feature][keep_train], y_train, test.features[feature][keep_test], y_test


def probe_target(target: Target, train, test, feature: str, seed: int = 0,
                 intervals: bool = False) -> tuple[dict, Any]:
    """Fit and score one probe. `train` / `test` are `embeddings.Embeddings`. Returns the report
    row (JSON-ready) and the raw result (for plots). `intervals`: add bootstrap 95 % intervals of
    the headline metrics over the test rows (bootstrap.py) as row["intervals"]."""
    row, x_train, y_train, x_test, y_test = probe_split(target, train, test, feature)
    try:
        if target.kind == "classification":
            result = fit_classification_probe(x_train, class_labels(y_train[0]), x_test,
                                              class_labels(y_test[0]), seed=seed)
            row.update(penalty=result.penalty, metrics=result.metrics, classes=result.classes)
            if intervals:
                row["intervals"] = bootstrap.classification_intervals(result.y_true, result.scores, seed=seed)
            return row, result
        if target.kind == "regression":
            result = fit_regression_probe(x_train, y_train[0], x_test, y_test[0])
            row.update(penalty=result.penalty, metrics=result.metrics)
            if intervals:
                row["intervals"] = bootstrap.regression_intervals(result.y_true, result.y_pred, seed=seed)
        else:
            result = fit_survival_probe(x_train, *y_train, x_test, *y_test, seed=seed)
            metrics = result.as_dict()
            row.update(penalty={"penalizer": metrics.pop("penalizer")}, metrics=metrics)
        return row, result
    except (ProbeError, SurvivalError) as err:
        raise TargetError(f"target {target.name!r} ({feature} features): {err}") from err
