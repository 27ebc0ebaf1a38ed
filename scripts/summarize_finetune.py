"""The fine-tuning study's table and plot (scripts/finetune_study.sh writes the runs).

    python scripts/summarize_finetune.py runs/finetune [OUT_DIR]

Reads OUT/{pretrained,random}_n{N}_s{SEED}/ (finetune workdirs: test/report.json, test/predictions.csv and,
for step 0 — with LP-FT the linear probe the fine-tune started from — test/start_predictions.csv) and, when
present, OUT/probe_n{N}/ (evaluate of both inits: report.json, per_face.csv), and writes
OUT_DIR/finetune_table.md and OUT_DIR/finetune_curve.png (age MAE against labels: each init fine-tuned and
probed).
Comparisons are paired per seed over the same test faces (absolute age error, 0/1 gender correctness;
evaluation.bootstrap.paired_difference).
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np

from mefem_jax.evaluation.bootstrap import paired_difference

RUN = re.compile(r"^(pretrained|random)_n(\d+|all)_s(\d+)$")


def _runs(root: Path) -> dict[tuple[str, str, int], Path]:
    found = {}
    for d in sorted(root.iterdir()):
        m = RUN.match(d.name)
        if m and (d / "test" / "report.json").is_file():
            found[(m.group(1), m.group(2), int(m.group(3)))] = d
    return found


def _metrics(workdir: Path, rows_key: str = "rows") -> dict | None:
    report = json.loads((workdir / "test" / "report.json").read_text())
    if rows_key not in report:
        return None
    by = {r["target"]: r for r in report[rows_key]}
    return {"age_mae": by["age"]["metrics"]["mae"], "age_ci": by["age"]["intervals"]["mae"],
            "gender_acc": by["gender"]["metrics"]["accuracy"], "gender_ci": by["gender"]["intervals"]["accuracy"],
            "kept": report["kept_step"]}


def _per_face(path: Path) -> dict[str, tuple[float, float]]:
    """id -> (absolute age error, gender correct) of one predictions.csv."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            err = abs(float(row["age_pred"]) - float(row["age"])) if row["age"] != "" else np.nan
            correct = float(row["gender_pred"] == row["gender"]) if row["gender"] != "" else np.nan
            out[row["id"]] = (err, correct)
    return out


def _lp_ft(workdir: Path) -> bool:
    """Whether the run started from a fitted linear probe (head.init=probe), so that its step 0 is one."""
    return json.loads((workdir / "config.json").read_text())["head"]["init"] == "probe"


def _paired(a: Path | dict, b: Path | dict) -> str:
    """'age MAE difference [CI] | gender accuracy difference (points) [CI]', a - b, over the faces both
    scored; each side a predictions.csv or an id -> (age error, gender correct) map."""
    pa, pb = (_per_face(x) if isinstance(x, Path) else x for x in (a, b))
    ids = sorted(set(pa) & set(pb))
    x, y = np.array([pa[i] for i in ids]), np.array([pb[i] for i in ids])
    age = paired_difference(x[:, 0], y[:, 0])
    gender = {k: 100 * v for k, v in paired_difference(x[:, 1], y[:, 1]).items()}
    return (f"{age['difference']:+.2f} [{age['low']:+.2f}, {age['high']:+.2f}] | "
            f"{gender['difference']:+.1f} [{gender['low']:+.1f}, {gender['high']:+.1f}]")


def _probes(root: Path, n: str) -> dict[str, dict]:
    """evaluate's linear probes (CLS) on the same labels, per init: OUT/probe_n{N} holds
    `evaluate --model=PRETRAINED --model=RANDOM_INIT` (finetune_study.sh), its first model the pretrained."""
    path = root / f"probe_n{n}" / "report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    labels = [m["label"] for m in report["models"]]
    out = {}
    for init, label in zip(("pretrained", "random"), labels):
        rows = {r["target"]: r for r in report["probes"]
                if r["model"] == label and r["features"] == "cls" and r.get("protocol", "linear") == "linear"}
        per_face = root / f"probe_n{n}" / "per_face.csv"
        out[init] = {"age_mae": rows["age"]["metrics"]["mae"], "age_ci": rows["age"]["intervals"]["mae"],
                     "gender_acc": rows["gender"]["metrics"]["accuracy"],
                     "gender_ci": rows["gender"]["intervals"]["accuracy"],
                     "per_face": _probe_per_face(per_face, label) if per_face.is_file() else None}
    return out


def _probes_paired(root: Path, n: str) -> str | None:
    """'age diff [CI] | gender diff (points) [CI] |' of evaluate's own paired comparison (second model vs first),
    turned round to pretrained − random."""
    path = root / f"probe_n{n}" / "report.json"
    if not path.is_file():
        return None
    rows = {r["target"]: r for r in json.loads(path.read_text()).get("comparison", [])
            if r["features"] == "cls" and r.get("protocol", "linear") == "linear"}
    if not {"age", "gender"} <= set(rows):
        return None
    cells = []
    for target, scale, digits in (("age", 1, 2), ("gender", 100, 1)):
        r = rows[target]  # random − pretrained: negate, and swap the interval's ends
        cells.append(f"{-r['difference'] * scale:+.{digits}f} [{-r['high'] * scale:+.{digits}f}, "
                     f"{-r['low'] * scale:+.{digits}f}]")
    return " | ".join(cells) + " |"


def _probe_per_face(path: Path, label: str) -> dict[str, tuple[float, float]]:
    """id -> (absolute age error, gender correct) of one encoder's CLS linear probes in evaluate's per_face.csv."""
    age, gender = {}, {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["model"] == label and row["features"] == "cls" and row["protocol"] == "linear":
                (age if row["target"] == "age" else gender if row["target"] == "gender" else {})[row["id"]] = \
                    float(row["score"])
    return {i: (age.get(i, np.nan), gender.get(i, np.nan)) for i in set(age) | set(gender)}


def _ci(v: float, ci, scale: float = 1.0, digits: int = 2) -> str:
    return f"{v * scale:.{digits}f} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def _order(n: str) -> float:
    return float("inf") if n == "all" else float(n)


def table(root: Path) -> tuple[str, dict]:
    """Three tables: every model on the test split; pretrained vs random init fine-tuned, paired per seed;
    each fine-tune against the linear probe of its own init on the same labels (evaluate's, or with LP-FT
    the probe it started from), paired."""
    runs = _runs(root)
    probed = {p.name[len("probe_n"):] for p in root.glob("probe_n*") if (p / "report.json").is_file()}
    counts = sorted({n for _, n, _ in runs} | probed, key=_order)
    scores = ["| labels | seed | model | kept step | age MAE (y) | gender acc (%) |", "|---|---:|---|---:|---:|---:|"]
    versus_random = ["| labels | seed | age MAE: pretrained − random (y) | gender acc: pretrained − random (pts) |",
                     "|---|---:|---:|---:|"]
    versus_probe = ["| labels | seed | init | age MAE: fine-tuned − probe (y) | gender acc: fine-tuned − probe (pts) |",
                    "|---|---:|---|---:|---:|"]
    probes_paired = ["| labels | age MAE: pretrained − random (y) | gender acc: pretrained − random (pts) |",
                     "|---|---:|---:|"]
    curve: dict = {"pretrained": {}, "random": {}, "probe": {}, "random probe": {}}
    for n in counts:
        probes = _probes(root, n)
        paired = _probes_paired(root, n)
        if paired:
            probes_paired.append(f"| {n} | {paired}")
        for init, probe in probes.items():
            curve["probe" if init == "pretrained" else "random probe"][n] = [(probe["age_mae"], probe["gender_acc"])]
            scores.append(f"| {n} | – | {init}: linear probe (evaluate) | – | {_ci(probe['age_mae'], probe['age_ci'])} "
                          f"| {_ci(probe['gender_acc'], probe['gender_ci'], 100, 1)} |")
        for seed in sorted({s for _, m, s in runs if m == n}):
            for init in ("pretrained", "random"):
                if (init, n, seed) not in runs:
                    continue
                workdir = runs[(init, n, seed)]
                predictions = workdir / "test" / "predictions.csv"
                start = _metrics(workdir, "start_rows") if _lp_ft(workdir) else None
                if start:
                    scores.append(f"| {n} | {seed} | {init}: linear probe (LP-FT step 0) | – | "
                                  f"{_ci(start['age_mae'], start['age_ci'])} | "
                                  f"{_ci(start['gender_acc'], start['gender_ci'], 100, 1)} |")
                    versus_probe.append(f"| {n} | {seed} | {init} (its step 0) | "
                                        + _paired(predictions, workdir / "test" / "start_predictions.csv") + " |")
                elif probes.get(init, {}).get("per_face"):
                    paired = _paired(predictions, probes[init]["per_face"])
                    versus_probe.append(f"| {n} | {seed} | {init} | {paired} |")
                m = _metrics(workdir)
                curve[init].setdefault(n, []).append((m["age_mae"], m["gender_acc"]))
                scores.append(f"| {n} | {seed} | {init}: fine-tuned | {m['kept']} | {_ci(m['age_mae'], m['age_ci'])} | "
                              f"{_ci(m['gender_acc'], m['gender_ci'], 100, 1)} |")
            if ("pretrained", n, seed) in runs and ("random", n, seed) in runs:
                versus_random.append(f"| {n} | {seed} | " + _paired(
                    runs[("pretrained", n, seed)] / "test" / "predictions.csv",
                    runs[("random", n, seed)] / "test" / "predictions.csv") + " |")
    text = "\n".join(["### Test split, every model", ""] + scores +
                     ["", "### Fine-tuned: pretrained against random init, paired over the test faces (95 % bootstrap)",
                      ""] + versus_random +
                     ["", "### Each fine-tune against the linear probe of its own init on the same labels, paired", ""]
                     + versus_probe +
                     ["", "### Linear probes: pretrained against random init, paired (evaluate's comparison)", ""]
                     + probes_paired)
    return text + "\n", curve


def plot(curve: dict, path: Path) -> None:
    """Two panels against the number of labels, age MAE and gender accuracy: each init fine-tuned (a dot per
    seed, the line through their mean) and probed (dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    counts = sorted({n for series in curve.values() for n in series}, key=_order)
    x = {n: i for i, n in enumerate(counts)}
    styles = {"pretrained": ("C0", "o", "fine-tuned from pretrained"),
              "random": ("C3", "s", "fine-tuned from random init"),
              "probe": ("C0", "^", "linear probe of pretrained"),
              "random probe": ("C3", "v", "linear probe of random init")}
    panels = (("test age MAE (years)", 0, 1.0), ("test gender accuracy (%)", 1, 100.0))
    for i, (ylabel, column, scale) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, (color, marker, label) in styles.items():
            series = curve[name]
            if not series:
                continue
            xs = [x[n] for n in counts if n in series]
            means = [scale * float(np.mean([v[column] for v in series[n]])) for n in counts if n in series]
            ax.plot(xs, means, color=color, marker=marker, label=label, linestyle="--" if "probe" in name else "-")
            for n in series:  # each seed as a dot
                ax.scatter([x[n]] * len(series[n]), [scale * v[column] for v in series[n]], color=color, s=12,
                           alpha=0.5)
        ax.set_xticks(range(len(counts)))
        ax.set_xticklabels(counts)
        ax.set_xlabel("UTKFace train labels")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Fine-tuning the :cpu encoder (120 steps) against linear probes: pretrained vs random init")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    root = Path(argv[1])
    out = Path(argv[2]) if len(argv) > 2 else root
    out.mkdir(parents=True, exist_ok=True)
    text, curve = table(root)
    (out / "finetune_table.md").write_text(text)
    plot(curve, out / "finetune_curve.png")
    print(text)
    print(f"wrote {out / 'finetune_table.md'} and {out / 'finetune_curve.png'}")


if __name__ == "__main__":
    main(sys.argv)
