"""Label efficiency (few-shot curves): how a probe's score grows with the number of training labels.

An encoder whose features separate faces well needs few labels; the full-data probe cannot show
that. For each n of `shots` (e.g. 10, 100, 1000, all) and each of several repeats, n labelled train
rows are drawn (classification: n per class, so every class is seen; regression: n rows), the
linear probe (targets.probe_target) and the weighted kNN (knn.knn_probe, k = 10) are fitted on them,
and both are scored on the full test split. One row per (n, protocol) holds every metric per repeat,
their mean and their sample sd, which is the spread the draw of the labels causes.

Draws are reproducible and nested: repeat r permutes the labelled train rows with a generator
seeded from (seed, r), and n takes the first n of that order (of each class), so the 10 faces of
n = 10 are among the 100 of n = 100. The points of one curve then differ only by the labels added.
A draw that takes every labelled row (n = all, or n above every class's size) is the same for every
repeat: it is fitted once and its sd is NaN (null in report.json).

n above what the data hold (of some class) is capped to what exists and noted in the row; n below
what a protocol can fit (the logistic probe cross-validates, so it needs 2 per class; ridge needs 3
rows) is an error naming n.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from mefem_jax.evaluation import knn
from mefem_jax.evaluation.embeddings import Embeddings
from mefem_jax.evaluation.targets import Target, TargetError, class_labels, probe_rows, probe_target

PROTOCOLS = ("linear", "knn")
KNN_K = knn.K_VALUES[0]
HEADLINE = {"regression": "mae", "classification": "accuracy"}
# The fewest labels (per class for classification) each protocol can be fitted on.
MIN_SHOTS = {"linear": {"classification": 2, "regression": 3}, "knn": {"classification": 1, "regression": 2}}


class ShotsError(ValueError):
    """Shots, seeds or protocols that do not make a label-efficiency curve."""


def parse_shots(text: str) -> list[int | None]:
    """"10,100,1000,all" -> [10, 100, 1000, None] (None: every labelled train row)."""
    shots: list[int | None] = []
    for token in (t.strip().lower() for t in text.split(",")):
        if token == "all":
            shots.append(None)
        elif token.isdigit() and int(token) > 0:
            shots.append(int(token))
        else:
            raise ShotsError(f"shots {text!r}: {token!r} is neither a positive integer nor 'all'")
    if len(set(shots)) < len(shots):
        raise ShotsError(f"shots {text!r} name a value twice")
    return shots


def draw_rows(y: np.ndarray, kind: str, n: int | None, seed: int, repeat: int) -> np.ndarray:
    """Sorted indices into `y` (the labelled train rows' labels): n per class for classification, n rows
    for regression, all of them for n=None; the first of a permutation seeded from (seed, repeat)."""
    if n is None:
        return np.arange(len(y))
    order = np.random.default_rng((seed, repeat)).permutation(len(y))
    if kind == "regression":
        return np.sort(order[:n])
    in_order = y[order]
    return np.sort(np.concatenate([order[in_order == c][:n] for c in np.unique(y)]))


def _subset(emb: Embeddings, rows: np.ndarray, feature: str, columns: tuple[str, ...]) -> Embeddings:
    return Embeddings(ids=emb.ids[rows], features={feature: emb.features[feature][rows]},
                      labels={c: emb.labels[c][rows] for c in columns})


def _summary(runs: list[dict]) -> dict[str, dict[str, Any]]:
    """{metric: {"per_seed": [...], "mean": m, "sd": s}} over the repeats' metric dicts."""
    out = {}
    for name in runs[0]:
        values = np.array([r[name] for r in runs], np.float64)
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        out[name] = {"per_seed": values.tolist(), "mean": float(values.mean()), "sd": sd}
    return out


def _cap_note(y: np.ndarray, kind: str, n: int | None) -> str | None:
    if n is None:
        return None
    if kind == "regression":
        return f"n={n} > {len(y)} labelled train rows: all used" if n > len(y) else None
    classes, counts = np.unique(y, return_counts=True)
    short = {str(c): int(m) for c, m in zip(classes, counts) if m < n}
    return f"n={n} per class: {short} have fewer train rows (all of theirs used)" if short else None


def check_shots(kind: str, shots, protocols=PROTOCOLS) -> None:
    """An n too few for a probe of this kind (the CV'd logistic probe needs 2 per class): known before
    any data is read, so evaluate refuses it with the other flags."""
    least = max(MIN_SHOTS[p][kind] for p in protocols)
    for n in shots:
        if n is not None and n < least:
            per = " per class" if kind == "classification" else ""
            raise ShotsError(f"label efficiency: n={n} is too few labels{per} for {kind} with "
                             f"{'+'.join(protocols)}; the least is {least}")


def label_efficiency(target: Target, train, test, feature: str, shots, seeds: int = 3,
                     protocols=PROTOCOLS, seed: int = 0) -> list[dict]:
    """One row per (n, protocol): target, kind, features, protocol, n (asked; "all"), n_train (labelled
    rows used; classification adds n_per_class), n_test, capped (+ note), seeds (repeats fitted),
    headline, metrics {name: {per_seed, mean, sd}}; linear rows add the per-seed penalties, kNN rows k."""
    if target.kind not in HEADLINE:
        raise TargetError(f"target {target.name!r}: label efficiency covers regression and classification "
                          f"targets, not {target.kind}")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ShotsError(f"label efficiency: unknown protocol(s) {unknown} or none; choose from {PROTOCOLS}")
    if not shots:
        raise ShotsError("label efficiency needs at least one n (shots), e.g. 10,100,1000,all")
    if seeds < 1 or seed < 0:
        raise ShotsError(f"label efficiency needs seeds >= 1 and seed >= 0, got seeds={seeds}, seed={seed}")
    check_shots(target.kind, shots, protocols)

    keep, values, _ = probe_rows(target, train.labels, "train")
    labelled = np.flatnonzero(keep)  # rows of `train` with a usable label
    y = class_labels(values[0]) if target.kind == "classification" else values[0]
    rows = []
    for n in shots:
        draws = [draw_rows(y, target.kind, n, seed, r) for r in range(seeds)]
        if len(draws[0]) == len(y):  # every labelled row: the repeats would all fit the same data
            draws = draws[:1]
        runs: dict[str, list[tuple[dict, Any]]] = {p: [] for p in protocols}
        for r, drawn in enumerate(draws):
            subset = _subset(train, labelled[drawn], feature, target.columns)
            try:
                if "linear" in protocols:
                    runs["linear"].append(probe_target(target, subset, test, feature, seed=seed + r))
                if "knn" in protocols:
                    runs["knn"].append(knn.knn_probe(target, subset, test, feature, KNN_K))
            except TargetError as err:
                raise TargetError(f"label efficiency at n={'all' if n is None else n}, repeat {r}: {err}") from err
        note = _cap_note(y, target.kind, n)
        for protocol, fitted in runs.items():
            first = fitted[0][0]
            row: dict[str, Any] = {
                "target": target.name, "kind": target.kind, "features": feature, "protocol": protocol,
                "n": "all" if n is None else n, "n_train": first["n_train"], "n_test": first["n_test"],
                "capped": note is not None, "seeds": len(fitted), "seed": seed, "headline": HEADLINE[target.kind],
                "metrics": _summary([f[0]["metrics"] for f in fitted])}
            if target.kind == "classification":
                classes, counts = np.unique(y[draws[0]], return_counts=True)
                row["n_per_class"] = {str(c): int(m) for c, m in zip(classes, counts)}
            if note:
                row["note"] = note
            if protocol == "linear":
                row["penalty"] = [f[0]["penalty"] for f in fitted]
            else:
                row.update(k=KNN_K, k_used=first["k_used"])
            rows.append(row)
    return rows


def plot_label_efficiency(path, title: str, rows: list[dict]) -> None:
    """The headline metric's mean (+- sd band) against the labelled train rows used (log x): one panel
    per protocol, one curve per (model, features) in it; `rows` are label_efficiency's, of one target.
    A readout keeps its colour across panels and an encoder its line style, so a reader can follow
    one encoder through the panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len({r["target"] for r in rows}) != 1:
        raise ValueError(f"plot_label_efficiency draws one target, got {sorted({r['target'] for r in rows})}")
    panels: dict[str, dict[tuple, list[dict]]] = {}
    for r in rows:
        protocol = r["protocol"] + (f" (k={r['k']})" if "k" in r else "")
        panels.setdefault(protocol, {}).setdefault((r.get("model"), r["features"]), []).append(r)
    features = list(dict.fromkeys(r["features"] for r in rows))
    models = list(dict.fromkeys(r.get("model") for r in rows))
    styles = ("-", "--", ":", "-.")
    metric = rows[0]["headline"]
    fig = Figure(figsize=(5.2 * len(panels), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (protocol, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for (model, feature), points in curves.items():
            points = sorted(points, key=lambda r: r["n_train"])
            x = np.array([r["n_train"] for r in points], np.float64)
            mean = np.array([r["metrics"][metric]["mean"] for r in points])
            sd = np.nan_to_num(np.array([r["metrics"][metric]["sd"] for r in points], np.float64))  # one fit: no band
            colour = f"C{features.index(feature) % 10}"
            label = feature if model is None else f"{model} / {feature}"
            ax.plot(x, mean, marker="o", lw=1.5, color=colour, ls=styles[models.index(model) % len(styles)],
                    label=label)
            ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.12, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlabel("labelled train rows used")
        ax.set_ylabel(f"{metric} (mean ± sd over draws)")
        ax.set_title(f"{title}: {protocol}")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
