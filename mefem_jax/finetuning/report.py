"""The test report of a fine-tune: report.json (everything), report.md (a table a person reads) and
predictions.csv (one row per test face), in WORKDIR/test/; the same for step 0 (`start_rows`,
start_predictions.csv), the point the fine-tune started from.

The rows have evaluate's layout (target, kind, metrics, intervals, n_test), so scripts that read
`evaluate`'s report.json read this one, and scripts/paired_compare.py can pair its predictions.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

_COLUMNS = {"regression": (("MAE", "mae"), ("RMSE", "rmse"), ("R²", "r2")),
            "classification": (("accuracy", "accuracy"), ("majority", "majority_accuracy"), ("ROC-AUC", "roc_auc"))}


def _cell(row: dict, key: str) -> str:
    value = row.get("metrics", {}).get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{value:.3f}"
    interval = row.get("intervals", {}).get(key)
    if interval and all(v is not None and math.isfinite(v) for v in interval):
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def _tables(rows: list[dict]) -> list[str]:
    lines = []
    for kind, columns in _COLUMNS.items():
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        lines += ["", f"### {kind.capitalize()}", "",
                  "| target | n | " + " | ".join(title for title, _ in columns) + " |",
                  "|---|---:|" + "---:|" * len(columns)]
        for r in mine:
            lines.append(f"| {r['target']} | {r['n_test']} | " + " | ".join(_cell(r, k) for _, k in columns) + " |")
    return lines


def markdown(config, scored: dict, skipped: dict) -> str:
    kept = scored["best"][0]
    lines = [f"# Fine-tune of `{config.init}`", "",
             f"- kept step {kept['step']} of {config.total_steps}, best validation {kept['select']} "
             f"= {kept['val'][kept['select']]:.4f}",
             f"- head on `{config.head.readout}`, initialised by `{config.head.init}`; layer decay "
             f"{config.optim.layer_decay}, drop path {config.drop_path}, batch {config.data.batch_size}",
             f"- train `{config.data.train}`", f"- val `{config.data.val}`", f"- test `{config.data.test}`"]
    unreadable = sum(len(v) for v in skipped.values())
    if unreadable:
        lines.append(f"- {unreadable} test images could not be read and are not scored")
    lines += ["", "95 % intervals: percentile bootstrap over the test faces (1,000 resamples).", "",
              f"## The kept step ({kept['step']})"] + _tables(scored["best"][1])
    if "start" in scored:
        what = "the linear probe it started from" if config.head.init == "probe" else "the initial head"
        lines += ["", f"## Step 0: {what}, on the same faces"] + _tables(scored["start"][1])
    return "\n".join(lines) + "\n"


def _write_faces(path: Path, faces: list[dict]) -> None:
    if faces:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(faces[0]))
            writer.writeheader()
            writer.writerows(faces)


def write(out: Path, config, scored: dict, skipped: dict) -> None:
    """`scored`: {"best": (best.json, rows, faces), and "start" likewise when step 0 was kept}."""
    out.mkdir(parents=True, exist_ok=True)
    kept, rows, faces = scored["best"]
    payload = {"init": str(config.init), "kept_step": kept["step"], "val": kept["val"], "rows": rows,
               "test": str(config.data.test), "skipped": skipped}
    if "start" in scored:
        payload.update(start_val=scored["start"][0]["val"], start_rows=scored["start"][1])
        _write_faces(out / "start_predictions.csv", scored["start"][2])
    (out / "report.json").write_text(json.dumps(payload, indent=2))
    (out / "report.md").write_text(markdown(config, scored, skipped))
    _write_faces(out / "predictions.csv", faces)
