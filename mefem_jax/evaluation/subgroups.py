"""Probe errors by subgroup (`--groups`): every metric per sex, race or age band, the worst group and the
largest gap between two groups, each with a bootstrap 95 % interval.

A model for clinics is reviewed for whom it fails (FAHR-Face reports every result per subgroup): an
age MAE of 5 years over all faces can hide 9 years on the elderly. The probe is not refitted per group;
its fixed test predictions are split by the group labels of the same rows.

    --groups=gender,race,age_bin=0,20,40,60,120

Comma-separated entries. `COLUMN` groups by the column's values (as class labels, so 1 and "1" are one
group), named like "gender 1". `COLUMN_bin=e0,e1,...,eK` bins the numeric column into [e0, e1), [e1, e2)
... [e(K-1), eK] (the last bin is closed, so an edge like 120 years holds the oldest face), named like
"age 20-40"; the numbers after `=` run until the next entry that is not a number. Rows whose value is
missing, or outside the edges, have no group: they are counted and left out.

Groups with fewer than `min_size` test rows are listed as too few, without metrics or intervals: a
handful of faces gives an interval as wide as the metric's range. The worst group and the gap are taken
over the other groups, on the headline metric (MAE, highest is worst; accuracy, lowest is worst). The
gap's interval resamples each of its two groups on its own (bootstrap.unpaired_difference).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mefem_jax.evaluation import bootstrap
from mefem_jax.evaluation.probes import classification_metrics, regression_metrics
from mefem_jax.evaluation.targets import class_labels, missing_labels, numeric

# kind -> (headline metric, the function picking the worst value, the columns of the markdown table)
HEADLINE = {"regression": ("mae", max), "classification": ("accuracy", min)}
_COLUMNS = {"regression": (("MAE", "mae"), ("RMSE", "rmse"), ("R²", "r2"), ("Pearson r", "pearson_r")),
            "classification": (("accuracy", "accuracy"), ("majority", "majority_accuracy"), ("ROC-AUC", "roc_auc"))}
BIN = "_bin"


class GroupError(ValueError):
    """A --groups value that is malformed or names columns the data do not have."""


@dataclass(frozen=True)
class Grouping:
    name: str                              # "gender", or "age_bin" for a binned column
    column: str
    edges: tuple[float, ...] | None = None  # bin edges, or None: one group per value


# ---------------------------------------------------------------------------------------------
# Grammar
# ---------------------------------------------------------------------------------------------
def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _edges(entry: str, texts: list[str]) -> tuple[float, ...]:
    if not all(_is_number(t) for t in texts):
        raise GroupError(f"--groups: {entry!r}: bin edges must be numbers")
    edges = tuple(float(t) for t in texts)
    if len(edges) < 2 or not all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise GroupError(f"--groups: {entry!r}: bin edges must be at least two finite numbers, strictly "
                         f"increasing (e.g. age_bin=0,20,40,60,120)")
    return edges


def parse_groups(text: str) -> list[Grouping]:
    tokens = [t.strip() for t in text.split(",")]
    groupings, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if not token:
            raise GroupError(f"--groups={text!r}: empty entry")
        if "=" not in token:
            groupings.append(Grouping(token, token))
            continue
        key, _, first = token.partition("=")
        texts = [first]
        while i < len(tokens) and _is_number(tokens[i]):  # the edges run on until the next column
            texts.append(tokens[i])
            i += 1
        entry = f"{key}={','.join(texts)}"
        if not key.endswith(BIN) or key == BIN:
            raise GroupError(f"--groups: {entry!r} is neither COLUMN nor COLUMN_bin=EDGES")
        groupings.append(Grouping(key, key[:-len(BIN)], _edges(entry, texts)))
    names = [g.name for g in groupings]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise GroupError(f"--groups names {twice} twice")
    return groupings


def check_group_columns(groupings: list[Grouping], available: list[str], where: str) -> None:
    unknown = [g.column for g in groupings if g.column not in available]
    if unknown:
        raise GroupError(f"--groups column(s) {unknown} not in the {where} data; its labels are {sorted(available)}")


# ---------------------------------------------------------------------------------------------
# Rows -> groups
# ---------------------------------------------------------------------------------------------
def _assign(grouping: Grouping, labels: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group name per row, "" without one; missing mask; outside-the-edges mask)."""
    values = np.asarray(labels[grouping.column])
    missing = missing_labels(values)
    groups = np.full(len(values), "", dtype=object)
    outside = np.zeros(len(values), bool)
    present = values[~missing]
    if grouping.edges is None:
        # Only the present values: a NaN among floats would keep class_labels from reading 1.0 as "1".
        groups[~missing] = [f"{grouping.column} {v}" for v in class_labels(present)]
        return groups, missing, outside
    x = numeric(present, grouping.column, f"--groups {grouping.name}:")
    edges = np.asarray(grouping.edges)
    inside = (x >= edges[0]) & (x <= edges[-1])  # also False for inf
    outside[~missing] = ~inside
    # side="right" puts an edge value in the bin it opens; the last edge closes the last bin.
    bins = np.minimum(np.searchsorted(edges, x[inside], side="right") - 1, len(edges) - 2)
    names = np.array([f"{grouping.column} {lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])], dtype=object)
    rows = np.flatnonzero(~missing)[inside]
    groups[rows] = names[bins]
    return groups, missing, outside


def group_of_rows(grouping: Grouping, labels: dict[str, np.ndarray]) -> np.ndarray:
    """The group name of every row ("" when its value is missing or outside the edges)."""
    return _assign(grouping, labels)[0].astype(str)


def left_out_counts(grouping: Grouping, labels: dict[str, np.ndarray]) -> dict[str, int]:
    """{"missing": rows without a value, "outside": rows whose value lies outside the bin edges}."""
    _, missing, outside = _assign(grouping, labels)
    return {"missing": int(missing.sum()), "outside": int(outside.sum())}


def _natural_key(name: str) -> tuple:
    """"age 100-120" after "age 20-40"; a minus right after a digit separates, elsewhere it is a sign."""
    parts = re.split(r"((?<![\d.])-?\d+(?:\.\d+)?)", name)
    return tuple((0, float(p)) if i % 2 else (1, p) for i, p in enumerate(parts))


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def subgroup_report(kind: str, result, groups: np.ndarray, min_size: int = 30, seed: int = 0,
                    n_boot: int = bootstrap.N_BOOT) -> dict:
    """Per-group metrics of a probes.ProbeResult; `groups` holds the group name of each of its test rows.

    Returns {"kind", "metric": headline, "min_size", "groups": [{"group", "n", "metrics", "intervals"}],
    "too_few": [{"group", "n"}], "worst": {"group", "metric", "value"} (None without a group of min_size),
    "gap": {"metric", "groups": [a, b], "difference": value(a) - value(b) >= 0, "low", "high"} (None with
    fewer than two), "left_out": rows without a group}.
    """
    if kind not in HEADLINE:
        raise GroupError(f"--groups reports regression and classification probes, not {kind!r}")
    groups = np.asarray(groups).astype(str)
    if len(groups) != len(result.y_true):
        raise GroupError(f"--groups: {len(groups)} group labels for {len(result.y_true)} test rows")
    metric, pick_worst = HEADLINE[kind]
    if kind == "regression":
        per_row = np.abs(np.asarray(result.y_pred, np.float64) - np.asarray(result.y_true, np.float64))
    else:
        per_row = (np.argmax(result.scores, axis=1) == result.y_true).astype(np.float64)
    report = {"kind": kind, "metric": metric, "min_size": min_size, "groups": [], "too_few": [], "worst": None,
              "gap": None, "left_out": int(np.sum(groups == ""))}
    rows = {}
    for name in sorted(set(groups.tolist()) - {""}, key=_natural_key):
        rows[name] = np.flatnonzero(groups == name)
        if len(rows[name]) < min_size:
            report["too_few"].append({"group": name, "n": len(rows[name])})
            continue
        y_true, r = result.y_true[rows[name]], rows[name]
        if kind == "regression":
            metrics = regression_metrics(y_true, result.y_pred[r])
            intervals = bootstrap.regression_intervals(y_true, result.y_pred[r], n_boot=n_boot, seed=seed)
        else:
            metrics = classification_metrics(y_true, result.scores[r])
            intervals = bootstrap.classification_intervals(y_true, result.scores[r], n_boot=n_boot, seed=seed)
        report["groups"].append({"group": name, "n": len(r), "metrics": metrics, "intervals": intervals})
    values = {g["group"]: g["metrics"][metric] for g in report["groups"]}
    if values:
        worst = pick_worst(values, key=values.get)
        report["worst"] = {"group": worst, "metric": metric, "value": values[worst]}
    if len(values) >= 2:
        a = max(values, key=values.get)
        b = min((g for g in values if g != a), key=values.get)  # another group even when all tie
        diff = bootstrap.unpaired_difference(per_row[rows[a]], per_row[rows[b]], n_boot=n_boot, seed=seed)
        report["gap"] = {"metric": metric, "groups": [a, b], **diff}
    return report


# ---------------------------------------------------------------------------------------------
# Markdown and plot
# ---------------------------------------------------------------------------------------------
def _number(value: float | None, interval=None) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    text = f"{value:.3f}"
    if interval and all(v is not None and np.isfinite(v) for v in interval):
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def subgroup_table(found: list[dict]) -> list[str]:
    """Lines for report.md: one table per target and grouping, one row per encoder and readout (each
    `found` row is a subgroup_report with "model" and "features" added), the headline metric of every
    group with its interval, then the worst group and the largest gap."""
    first = found[0]
    names = [g["group"] for g in first["groups"]] + [g["group"] for g in first["too_few"]]
    sizes = {g["group"]: g["n"] for g in first["groups"] + first["too_few"]}
    metric = first["metric"]
    lines = [f"**{first['target']} by {first['grouping']}**: {metric} per group, 95 % interval in brackets; groups "
             f"under {first['min_size']} test faces are too few for an interval"
             + (f"; {first['left_out']} face(s) without a group left out" if first["left_out"] else ""), "",
             "| encoder | features | " + " | ".join(f"{n} (n={sizes[n]})" for n in names) + " | worst | largest gap |",
             "|---|---|" + "---:|" * (len(names) + 2)]
    for r in found:
        cells = {g["group"]: _number(g["metrics"][metric], g["intervals"].get(metric)) for g in r["groups"]}
        cells.update({g["group"]: "too few" for g in r["too_few"]})
        worst = r["worst"]["group"] if r["worst"] else "–"
        gap = r["gap"]
        gap_text = (f"{gap['groups'][0]} − {gap['groups'][1]}: {_number(gap['difference'], [gap['low'], gap['high']])}"
                    if gap else "–")
        lines.append(f"| {r.get('model', '')} | {r.get('features', '')} | "
                     + " | ".join(cells.get(n, "–") for n in names) + f" | {worst} | {gap_text} |")
    return lines


def plot_subgroups(path: Path, title: str, reports: dict[str, dict]) -> None:
    """Horizontal bars of the headline metric per group with 95 % whiskers, one panel per grouping
    (`reports`: grouping name -> subgroup_report); the worst group in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    most = max([len(r["groups"]) for r in reports.values()] + [1])
    fig = Figure(figsize=(4.2 * len(reports), 1.4 + 0.35 * most), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, report) in enumerate(reports.items()):
        ax = fig.add_subplot(1, len(reports), i + 1)
        metric, groups = report["metric"], report["groups"]
        value = np.array([g["metrics"][metric] for g in groups])
        low, high = (np.array([g["intervals"][metric][j] for g in groups], np.float64) for j in (0, 1))
        whiskers = np.nan_to_num(np.stack([value - low, high - value]) if groups else np.zeros((2, 0)))
        worst = report["worst"]["group"] if report["worst"] else None
        ax.barh(range(len(groups)), value, xerr=whiskers, capsize=3,
                color=["tab:red" if g["group"] == worst else "tab:blue" for g in groups])
        ax.set_yticks(range(len(groups)), [f"{g['group']} (n={g['n']})" for g in groups])
        ax.invert_yaxis()  # the first group on top
        few = ", ".join(f"{g['group']} n={g['n']}" for g in report["too_few"])
        ax.set_xlabel(metric + (f"\ntoo few: {few}" if few else ""))
        ax.set_title(name)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
