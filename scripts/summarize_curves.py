"""Learning curves and the test table of a `scripts/learning_curves.sh` run.

    python scripts/summarize_curves.py ROOT [OUT]

Reads every run folder `ROOT/<setting>_s<seed>/metrics.jsonl` (validation probes and RankMe logged by
the train loop every `eval.every_steps`, step 0 being the run's own random init) and the test-split
reports `ROOT/test_<run>/report.json` written by `python -m mefem_jax.evaluate`, then writes (OUT defaults
to ROOT; `docs/` holds the committed results, so name it only to replace them: docs/RESULTS.md)

    OUT/learning_curves.png        validation probe metrics and RankMe against training step
    OUT/learning_curves_table.md   the test split, once per run, with bootstrap intervals, and the
                                   per-setting mean and seed spread
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

RUN = re.compile(r"^(?P<setting>[a-z][a-z0-9_]*)_s(?P<seed>\d+)$")
LABELS = {
    "mefem": "MeFEm-full (stripes + circular + CLS p=0.5)",
    "stripes": "stripes only",
    "multiblock": "multiblock (I-JEPA)",
    "mefem_lr4x": "MeFEm-full, 4x lr",
    "lr4x_cls_context": "4x lr, CLS always in the context (no reassignment)",
    "mefem_sigreg": "MeFEm-full + SIGReg 0.05, 4x lr",
    "random": "random init (same ViT)",
}
# (metric key in metrics.jsonl, panel title, lower is better)
PANELS = [("probe_age_mae", "age MAE (y), CLS", True), ("probe_gender_acc", "gender accuracy, CLS", False),
          ("probe_race_acc", "race accuracy, CLS", False), ("probe_age_mae_mean", "age MAE (y), mean-pool", True),
          ("rankme_cls", "RankMe, CLS", False), ("rankme_patch", "RankMe, patch tokens", False)]
# (target, metric, column title, format)
TEST_COLUMNS = [("age", "mae", "age MAE (y)", ".2f"), ("age", "r2", "age R²", ".3f"),
                ("gender", "accuracy", "gender acc", ".3f"), ("race", "accuracy", "race acc", ".3f")]


def runs(root: Path) -> dict[str, dict[int, Path]]:
    found: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in sorted(root.iterdir()):
        m = RUN.match(path.name)
        if m and (path / "metrics.jsonl").is_file():
            found[m["setting"]][int(m["seed"])] = path
    return found


def probe_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "probe_age_mae" in r]


def _model_name(found: dict) -> str:
    """The encoder the runs trained, read from the first run's config.json (the plot serves any run)."""
    path = next(p for seeds in found.values() for p in seeds.values())
    try:
        m = json.loads((path / "config.json").read_text())["model"]
        overrides = "".join(f", {k} {m[k]}" for k in ("width", "depth") if m.get(k) is not None)
        return f"ViT-{m['variant']}{overrides}, {m['image_size']} px, patch {m['patch_size']}"
    except (OSError, KeyError, ValueError):
        return "encoder unknown: no readable config.json"


def plot(found: dict, out_png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(2, 3, i + 1) for i in range(len(PANELS))]
    for colour, (setting, seeds) in enumerate(sorted(found.items())):
        for k, (seed, path) in enumerate(sorted(seeds.items())):
            rows = probe_rows(path)
            for ax, (key, _, _) in zip(axes, PANELS):
                pts = [(r["step"], r[key]) for r in rows if key in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{colour}", ls=("-", "--", ":")[k % 3],
                            label=f"{LABELS.get(setting, setting)}, seed {seed}")
    for ax, (_, title, lower) in zip(axes, PANELS):
        ax.set_title(title + (" (lower is better)" if lower else ""), fontsize=10)
        ax.set_xlabel("training step (step 0 = the run's own random init)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(f"Validation probes during pretraining ({_model_name(found)})")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)


def val_table(found: dict) -> str:
    """Validation probes at the run's first probe (step 0 = its random init where logged) and its last."""
    keys = [("probe_age_mae", ".2f"), ("probe_gender_acc", ".3f"), ("probe_race_acc", ".3f"),
            ("probe_age_mae_mean", ".2f"), ("probe_age_mae_grid", ".2f"), ("rankme_cls", ".1f"),
            ("rankme_mean", ".1f"), ("rankme_patch", ".1f")]
    head = ["setting", "seed", "step"] + [k.replace("probe_", "") for k, _ in keys]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|" + "---:|" * len(keys)]
    for setting in [s for s in LABELS if s in found] + sorted(set(found) - set(LABELS)):
        for seed, path in sorted(found[setting].items()):
            rows = probe_rows(path)
            for r in (rows[0], rows[-1]) if len(rows) > 1 else rows:
                cells = [format(r[k], spec) if k in r else "–" for k, spec in keys]
                lines.append(f"| {LABELS.get(setting, setting)} | {seed} | {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(["## Validation split: first and last probe of each run", "", *lines]) + "\n"


def _test_metrics(report_path: Path, feature: str) -> dict | None:
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    by = {(p["target"], p["features"]): p for p in report["probes"]}
    out = {}
    for target, metric, _, _ in TEST_COLUMNS:
        row = by.get((target, feature))
        if row is None:
            return None
        out[(target, metric)] = (row["metrics"][metric], row.get("intervals", {}).get(metric))
    out["health"] = report.get("health", {})
    return out


def table(root: Path, found: dict, features=("cls", "mean", "grid")) -> str:
    names = {s: sorted(seeds) for s, seeds in found.items()}
    names.update({"random": sorted(int(p.name.rsplit("_s", 1)[1]) for p in root.glob("test_random_s*"))})
    head = ["setting", "seed", "readout"] + [c[2] for c in TEST_COLUMNS] + ["RankMe cls / mean / patch"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|" + "---:|" * (len(head) - 3)]
    summary = ["| setting | readout | " + " | ".join(f"{c[2]} (mean ± half-range over seeds)" for c in TEST_COLUMNS)
               + " |", "|---|---|" + "---:|" * len(TEST_COLUMNS)]
    for setting in [s for s in LABELS if s in names] + sorted(set(names) - set(LABELS)):
        for feature in features:
            per_seed = []
            for seed in names[setting]:
                m = _test_metrics(root / f"test_{setting}_s{seed}" / "report.json", feature)
                if m is None:
                    continue
                per_seed.append(m)
                cells = []
                for target, metric, _, spec in TEST_COLUMNS:
                    value, ci = m[(target, metric)]
                    cells.append(f"{value:{spec}}" + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else ""))
                h = m["health"]
                ranks = " / ".join(f"{h[k]:.1f}" for k in ("rankme_cls", "rankme_mean", "rankme_patch") if k in h)
                lines.append(f"| {LABELS.get(setting, setting)} | {seed} | {feature} | " + " | ".join(cells)
                             + f" | {ranks} |")
            if len(per_seed) > 1:
                cells = []
                for target, metric, _, spec in TEST_COLUMNS:
                    v = np.array([m[(target, metric)][0] for m in per_seed])
                    cells.append(f"{v.mean():{spec}} ± {(v.max() - v.min()) / 2:{spec}}")
                summary.append(f"| {LABELS.get(setting, setting)} | {feature} | " + " | ".join(cells) + " |")
    pixels = _test_metrics(root / f"test_random_s{names['random'][0]}" / "report.json", "pixels") \
        if names["random"] else None
    if pixels:
        cells = [f"{pixels[(t, m)][0]:{spec}}" for t, m, _, spec in TEST_COLUMNS]
        lines.append("| raw pixels 16x16x3 (baseline) | - | pixels | " + " | ".join(cells) + " | |")
    return "\n".join(["## Test split, one row per run", "", *lines, "", "## Per setting: mean over seeds",
                      "", *summary]) + "\n"


def main(argv) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    root = Path(argv[1])
    out = Path(argv[2]) if len(argv) == 3 else root
    if not root.is_dir():
        print(f"summarize_curves: no run folder {root}", file=sys.stderr)
        return 2
    found = runs(root)
    if not found:
        print(f"summarize_curves: no <setting>_s<seed>/metrics.jsonl under {root}", file=sys.stderr)
        return 2
    plot(found, out / "learning_curves.png")
    text = val_table(found) + "\n" + table(root, found)
    (out / "learning_curves_table.md").write_text(text)
    print(text)
    print(f"wrote {out / 'learning_curves.png'} and {out / 'learning_curves_table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
