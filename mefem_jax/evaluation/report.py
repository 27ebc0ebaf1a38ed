"""Writing an evaluation: report.json (everything), report.md (tables), and the plots.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend state), so
they work on headless machines and inside a training process.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from mefem_jax.evaluation.subgroups import subgroup_table

# (heading, row kind, [(column title, key in row["metrics"] or row, format)])
_TABLES = (
    ("Regression (linear probe: ridge)", "regression",
     [("MAE", "mae", ".3f"), ("RMSE", "rmse", ".3f"), ("R²", "r2", ".3f"), ("Pearson r", "pearson_r", ".3f"),
      ("alpha", "alpha", ".3g")]),
    ("Classification (linear probe: logistic)", "classification",
     [("accuracy", "accuracy", ".3f"), ("majority", "majority_accuracy", ".3f"),
      ("ROC-AUC", "roc_auc", ".3f"), ("C", "C", ".3g")]),
    ("Landmarks (linear probe: ridge to the 68 points; NME over the inter-ocular distance, as FaRL scores 300W)",
     "landmarks", [("NME", "nme", ".4f"), ("median NME", "nme_median", ".4f"), ("FR@0.1", "fr_10", ".3f"),
                   ("alpha", "alpha", ".3g")]),
    ("Survival (penalised Cox on PCA features)", "survival",
     [("C-index", "c_index", ".3f"), ("train C-index", "train_c_index", ".3f"),
      ("penalizer", "penalizer", ".3g"), ("PCs", "n_components", "d"),
      ("events train/test", "events", "s")]),
)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "target"


def _fmt(value, spec: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def _with_interval(row: dict, key: str, spec: str) -> str:
    text = _fmt(_cell(row, key), spec)
    interval = row.get("intervals", {}).get(key)
    if interval and all(v is not None and math.isfinite(v) for v in interval):
        text += f" [{format(interval[0], spec)}, {format(interval[1], spec)}]"
    return text


def _cell(row: dict, key: str):
    if key == "events":
        m = row["metrics"]
        return f"{m['n_events_train']}/{m['n_events_test']}"
    return row["metrics"].get(key, row.get("penalty", {}).get(key))


def markdown_report(report: dict) -> str:
    models = report.get("models") or [report["model"]]
    several = len(models) > 1
    title = models[0]["spec"] if not several else " vs ".join(m["label"] for m in models)
    lines = [f"# Evaluation of `{title}`", ""]
    lines += [f"- encoder{' `' + m['label'] + '`' if several else ''}: {_describe(m)}" for m in models]
    g = report.get('grid_size', 2)
    lines += [f"- features: `cls` = final-normed CLS token (a CNN's pooled features), `mean` = mean of final-normed "
              f"patch tokens, `grid` = patch tokens pooled to {g}x{g} "
              f"cells, `pixels` = the image downsampled to {report['pixel_size']}x{report['pixel_size']}x3 (baseline)",
              "- metrics on test with a bootstrap 95 % interval over the test rows in brackets"]
    for split, info in report["data"].items():
        skipped = sum(info["skipped"].values())
        lines.append(f"- {split}: `{info['spec']}`, {info['n']} images" + (f", {skipped} skipped" if skipped else ""))
    if report.get("leakage"):
        lines.append(f"- test: {report['leakage']['excluded']} image(s) left out, near-duplicates of the "
                     f"pretraining data `{report['leakage']['pretrain']}`")
    lines += [f"- warning: {w}" for w in report.get("warnings", [])]
    lines += _health(report, models)
    lines += _probe_tables(report.get("probes", []), several)
    lines += _comparison(report.get("comparison", []))
    lines += _fewshot(report.get("fewshot", []))
    tables: dict[tuple, list[dict]] = {}
    for found in report.get("subgroups", []):
        tables.setdefault((found["target"], found["grouping"]), []).append(found)
    if tables:
        lines += ["", "## Subgroups (linear probes)"]
    for found in tables.values():
        lines += [""] + subgroup_table(found)
    lines += _verification(report.get("verification", []), several)
    if report.get("saliency"):
        lines += ["", "## Saliency (occlusion; gradient x input for mefem_jax encoders)", ""]
        lines += [f"![{r['png']}]({r['png']})" for r in report["saliency"]]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _describe(m: dict) -> str:
    size = m.get("image_size", (m.get("config") or {}).get("image_size"))
    patch = (m.get("config") or {}).get("patch_size")
    text = f"width {m['width']}, depth {m['depth']}, heads {m['heads']}"
    text += f", patch {patch}" if patch else f", {m['grid'][0]}x{m['grid'][1]} grid" if m.get("grid") else ""
    text += f", {size} px" + (f" (centre crop {m['input_size']})" if m.get("input_size", size) != size else "")
    return text + (f", `{m['spec']}`" if m.get("label") and m["label"] != m["spec"] else "")


def _table(titles: list[str], n_text: int) -> list[str]:
    aligns = ["---"] * n_text + ["---:"] * (len(titles) - n_text)
    return ["| " + " | ".join(titles) + " |", "|" + "|".join(aligns) + "|"]


def _health(report: dict, models: list[dict]) -> list[str]:
    rows = [(m.get("label", ""), m.get("health") or {}) for m in models] if len(models) > 1 else \
        [("", report.get("health") or {})]
    rows = [(label, h) for label, h in rows if h]
    if not rows:
        return []
    keys = list(rows[0][1])
    lines = ["", "## Representation health (effective rank, RankMe, of the test embeddings)", ""]
    if len(models) > 1:
        lines += _table(["encoder"] + keys, 1)
        return lines + [f"| {label} | " + " | ".join(f"{h[k]:.1f}" for k in keys) + " |" for label, h in rows]
    return lines + _table(keys, 0) + ["| " + " | ".join(f"{v:.1f}" for v in rows[0][1].values()) + " |"]


def _protocol(row: dict) -> str:
    return f"kNN k={row['k']}" if row.get("protocol") == "knn" else row.get("protocol", "linear")


def _probe_tables(rows: list[dict], several: bool) -> list[str]:
    lines = []
    with_protocol = any(r.get("protocol", "linear") != "linear" for r in rows)
    for heading, kind, columns in _TABLES:
        selected = [r for r in rows if r["kind"] == kind]
        if not selected:
            continue
        titles = ["target", "features"] + ["protocol"] * with_protocol + ["encoder"] * several
        n_text = len(titles)
        titles += [c[0] for c in columns] + ["n train/test"]
        lines += ["", f"## {heading}", ""]
        if with_protocol and kind in ("regression", "classification"):
            lines += ["kNN: DINO's cosine k-nearest neighbours with exp(similarity / 0.07) weighted votes "
                      "(a weighted mean for regression).", ""]
        lines += _table(titles, n_text)
        for r in selected:
            cells = [r["target"], r["features"]] + [_protocol(r)] * with_protocol + [r.get("model", "")] * several
            cells += [_with_interval(r, key, spec) for _, key, spec in columns]
            cells.append(f"{r['n_train']}/{r['n_test']}")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _comparison(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", f"## Each encoder against `{rows[0]['baseline']}` (paired bootstrap over the same test faces)", "",
             "A negative difference in MAE or NME, a positive one in accuracy, is better.", ""]
    lines += _table(["target", "features", "protocol", "encoder", "metric", "encoder's", "baseline's",
                     "difference [95 %]", "faces", "verdict"], 5)
    for r in rows:
        lines.append(f"| {r['target']} | {r['features']} | {_protocol(r)} | {r['model']} | {r['metric']} | "
                     f"{r['value']:.3f} | {r['baseline_value']:.3f} | {r['difference']:+.3f} "
                     f"[{r['low']:+.3f}, {r['high']:+.3f}] | {r['n_paired']} | {r['verdict']} |")
    return lines


def _fewshot(rows: list[dict]) -> list[str]:
    """One row per (target, readout, protocol, encoder), one column per number of labels."""
    if not rows:
        return []
    sizes = list(dict.fromkeys(str(r["n"]) for r in rows))
    lines = ["", "## Label efficiency (mean ± sd over the draws; n labels per class for a classification, "
             "in all for a regression; kNN k=10)", ""]
    lines += _table(["target", "features", "protocol", "encoder", "metric"] + [f"n={n}" for n in sizes], 5)
    table: dict[tuple, dict[str, str]] = {}
    for r in rows:
        m = r["metrics"][r["headline"]]
        cell = f"{m['mean']:.3f}" + ("" if m["sd"] is None or not math.isfinite(m["sd"]) else f" ± {m['sd']:.3f}")
        key = (r["target"], r["features"], r["protocol"], r.get("model", ""), r["headline"])
        table.setdefault(key, {})[str(r["n"])] = cell + (f" (capped: {r['n_train']} faces)" if r["capped"] else "")
    for key, cells in table.items():
        lines.append("| " + " | ".join(key) + " | " + " | ".join(cells.get(n, "–") for n in sizes) + " |")
    return lines


def _verification(rows: list[dict], several: bool) -> list[str]:
    if not rows:
        return []
    fars = sorted({k.split("=", 1)[1] for r in rows for k in r if k.startswith("tar@far=")}, key=float, reverse=True)
    titles = ["features"] + ["encoder"] * several + ["ROC-AUC", "best accuracy"] + [f"TAR@FAR={f}" for f in fars]
    lines = ["", "## Verification (cosine similarity)", ""] + _table(titles + ["pairs (same/diff)"], 1 + several)
    for r in rows:
        cells = [r["features"]] + [r.get("model", "")] * several
        cells += [_fmt(r["roc_auc"], ".4f"), _fmt(r["best_accuracy"], ".4f")]
        cells += [_fmt(r[f"tar@far={f}"], ".4f") + ("" if r[f"far_resolvable@far={f}"] else "*") for f in fars]
        cells.append(f"{r['n_genuine']}/{r['n_impostor']}")
        lines.append("| " + " | ".join(cells) + " |")
    if not all(r[f"far_resolvable@far={f}"] for r in rows for f in fars):
        lines += ["", "\\* fewer than 1/FAR impostor pairs: the threshold is the highest impostor score."]
    return lines


def write_report(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(report), indent=2, allow_nan=False)
    (out_dir / "report.json").write_text(text + "\n")
    (out_dir / "report.md").write_text(markdown_report(report))


def _jsonable(value):
    """numpy scalars/arrays -> Python; NaN / Inf (an undefined metric) -> null, which strict JSON
    readers accept and Python's `NaN` extension is not."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def _figure(n_panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * n_panels, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]


def plot_regression(path: Path, target: str, results: dict) -> None:
    """Predicted vs true, one panel per feature set; `results`: features -> ProbeResult."""
    fig, axes = _figure(len(results))
    for ax, (feature, res) in zip(axes, results.items()):
        lo = float(min(res.y_true.min(), res.y_pred.min()))
        hi = float(max(res.y_true.max(), res.y_pred.max()))
        ax.scatter(res.y_true, res.y_pred, s=6, alpha=0.4, linewidths=0)
        ax.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--")
        ax.set_xlabel(f"true {target}")
        ax.set_ylabel(f"predicted {target}")
        m = res.metrics
        ax.set_title(f"{feature}: MAE {m['mae']:.2f}, R² {m['r2']:.2f}")
    fig.savefig(path, dpi=110)


def plot_roc(path: Path, title: str, curves: dict) -> None:
    """ROC curves on one axis; `curves`: label -> (bool truth, score)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, (ax,) = _figure(1)
    for label, (truth, score) in curves.items():
        fpr, tpr, _ = roc_curve(truth, score)
        ax.plot(fpr, tpr, lw=1.5, label=f"{label} (AUC {roc_auc_score(truth, score):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110)
