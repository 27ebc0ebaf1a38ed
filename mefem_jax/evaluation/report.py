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

# (heading, row kind, [(column title, key in row["metrics"] or row, format)])
_TABLES = (
    ("Regression (linear probe: ridge)", "regression",
     [("MAE", "mae", ".3f"), ("RMSE", "rmse", ".3f"), ("R²", "r2", ".3f"), ("Pearson r", "pearson_r", ".3f"),
      ("alpha", "alpha", ".3g")]),
    ("Classification (linear probe: logistic)", "classification",
     [("accuracy", "accuracy", ".3f"), ("majority", "majority_accuracy", ".3f"),
      ("ROC-AUC", "roc_auc", ".3f"), ("C", "C", ".3g")]),
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
    model = report["model"]
    lines = [f"# Evaluation of `{model['spec']}`", "",
             f"- encoder: width {model['width']}, depth {model['depth']}, heads {model['heads']}, "
             f"patch {model['config']['patch_size']}, {model['config']['image_size']} px",
             f"- features: `cls` = final-normed CLS token, `mean` = mean of final-normed patch tokens, "
             f"`grid` = patch tokens pooled to {report.get('grid_size', 2)}x{report.get('grid_size', 2)} cells, "
             f"`pixels` = the image downsampled to {report['pixel_size']}x{report['pixel_size']}x3 (baseline)",
             "- metrics on test with a bootstrap 95 % interval over the test rows in brackets"]
    for split, info in report["data"].items():
        skipped = sum(info["skipped"].values())
        lines.append(f"- {split}: `{info['spec']}`, {info['n']} images" + (f", {skipped} skipped" if skipped else ""))
    lines += [f"- warning: {w}" for w in report.get("warnings", [])]

    health = report.get("health") or {}
    if health:
        lines += ["", "## Representation health (effective rank, RankMe, of the test embeddings)", "",
                  "| " + " | ".join(health) + " |", "|" + "|".join(["---:"] * len(health)) + "|",
                  "| " + " | ".join(f"{v:.1f}" for v in health.values()) + " |"]

    rows = report.get("probes", [])
    for heading, kind, columns in _TABLES:
        selected = [r for r in rows if r["kind"] == kind]
        if not selected:
            continue
        titles = ["target", "features"] + [c[0] for c in columns] + ["n train/test"]
        lines += ["", f"## {heading}", "", "| " + " | ".join(titles) + " |",
                  "|" + "|".join(["---"] * 2 + ["---:"] * (len(titles) - 2)) + "|"]
        for r in selected:
            cells = [r["target"], r["features"]] + [_with_interval(r, key, spec) for _, key, spec in columns]
            cells.append(f"{r['n_train']}/{r['n_test']}")
            lines.append("| " + " | ".join(cells) + " |")

    verification = report.get("verification", [])
    if verification:
        fars = sorted({k.split("=", 1)[1] for r in verification for k in r if k.startswith("tar@far=")},
                      key=float, reverse=True)
        titles = ["features", "ROC-AUC", "best accuracy"] + [f"TAR@FAR={f}" for f in fars] + ["pairs (same/diff)"]
        lines += ["", "## Verification (cosine similarity)", "", "| " + " | ".join(titles) + " |",
                  "|---|" + "|".join(["---:"] * (len(titles) - 1)) + "|"]
        for r in verification:
            cells = [r["features"], _fmt(r["roc_auc"], ".4f"), _fmt(r["best_accuracy"], ".4f")]
            cells += [_fmt(r[f"tar@far={f}"], ".4f") + ("" if r[f"far_resolvable@far={f}"] else "*") for f in fars]
            cells.append(f"{r['n_genuine']}/{r['n_impostor']}")
            lines.append("| " + " | ".join(cells) + " |")
        if not all(r[f"far_resolvable@far={f}"] for r in verification for f in fars):
            lines += ["", "\\* fewer than 1/FAR impostor pairs: the threshold is the highest impostor score."]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


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
