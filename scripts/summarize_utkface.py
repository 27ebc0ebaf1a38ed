"""Tables and curves of the UTKFace pretraining comparison (scripts/utkface_pretrain.sh).

    python scripts/summarize_utkface.py runs/utkface docs/

Prints a Markdown table of test-split probe metrics per setting and feature set, and writes
`utkface_curves.png` (training loss and target-feature std per setting) to the output folder.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SETTINGS = [("multiblock", "multiblock, uniform weights, CLS in context"),
            ("stripes", "axial stripes, uniform weights, CLS in context"),
            ("stripes_full", "axial stripes + circular weights + CLS reassignment"),
            ("random", "same ViT at random init")]


def probe_table(root: Path) -> str:
    rows = ["| setting | features | age MAE (y) | age R² | gender acc | gender AUC | race acc | race AUC |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, label in SETTINGS:
        path = root / f"eval_{name}" / "report.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        by = {(p["target"], p["features"]): p["metrics"] for p in report["probes"]}
        features = ["cls", "mean"] + (["pixels"] if name == "random" else [])
        for f in features:
            age, gender, race = by[("age", f)], by[("gender", f)], by[("race", f)]
            shown = "raw pixels 16x16x3 (baseline)" if f == "pixels" else label
            rows.append(f"| {shown} | {f if f != 'pixels' else '-'} | {age['mae']:.2f} | {age['r2']:.3f} | "
                        f"{gender['accuracy']:.3f} | {gender['roc_auc']:.3f} | {race['accuracy']:.3f} | "
                        f"{race['roc_auc']:.3f} |")
    return "\n".join(rows)


def curves(root: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_std) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, label in SETTINGS[:3]:
        path = root / name / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r["loss"] for r in rows], label=label)
        ax_std.plot(steps, [r["target_std"] for r in rows], label=label)
    ax_loss.set(xlabel="step", ylabel="JEPA loss (each setting's own objective)")
    ax_std.set(xlabel="step", ylabel="target feature std (collapse monitor)")
    ax_loss.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main() -> None:
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    print(probe_table(root))
    curves(root, out / "utkface_curves.png")


if __name__ == "__main__":
    main()
