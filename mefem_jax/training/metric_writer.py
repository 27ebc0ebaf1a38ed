"""Where training metrics go: `metrics.jsonl` (one JSON object per log step), TensorBoard event files
beside it, and a loss plot at the end. Only the lead process (index 0) writes.

Paths go through `etils.epath`, so a `gs://` workdir works like a local one. Object stores cannot append,
so for them the (small) file is rewritten at each log step; local files are appended to.
"""
from __future__ import annotations

import json
import math
import os
import sys

from absl import logging
from etils import epath


class MetricWriter:
    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.workdir = epath.Path(workdir)
        self.enabled = enabled
        self._tb = None
        self._remote = "://" in str(workdir)
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._tb = _summary_writer_class()(str(self.workdir / "tb"))

    @property
    def path(self) -> epath.Path:
        return self.workdir / "metrics.jsonl"

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _to_json(v) for k, v in metrics.items()})
        line = json.dumps(row) + "\n"
        if self._remote:
            old = self.path.read_text() if self.path.exists() else ""
            self.path.write_text(old + line)
        else:
            with self.path.open("a") as f:
                f.write(line)
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """Drops rows logged after `step`: a resumed run rewrites them, so the file has no duplicates."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line, row in _lines_and_rows(self.path) if row["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))  # also repairs a torn last line

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, which writes event files without TensorFlow.

    tensorboardX imports torch whenever torch is installed (the test extra installs it), only so that it
    can accept torch tensors, which we never log. That costs 3-5 s at every start of the entry point. When
    torch is not loaded yet, it is hidden for the duration of this one import; torch itself stays
    importable afterwards.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` inside tensorboardX raises ImportError, which it handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _to_json(v):
    try:
        v = v.item()
    except AttributeError:
        pass
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep the information as text
    return v


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [row for _, row in _lines_and_rows(epath.Path(path))]


def _lines_and_rows(path: epath.Path) -> list[tuple[str, dict]]:
    """(line, parsed row) of each row. A torn last line (a run killed mid-write) is dropped with a
    warning; a bad line anywhere else is damage we did not cause, and an error naming the file."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except ValueError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path} line {i + 1} is not a JSON row ({e}); fix or remove that line") from None
            logging.warning("%s: dropping its torn last line %r (a run stopped while writing it)", path, line[:80])
    return out


def plot_loss(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), (int, float))]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in rows]
    for key in ("loss", "loss_patch", "loss_cls"):
        if key in rows[0]:
            axes[0].plot(steps, [r[key] for r in rows], label=key)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("JEPA loss")
    axes[0].legend()
    axes[0].set_yscale("log")
    if "lr" in rows[0]:
        axes[1].plot(steps, [r["lr"] for r in rows], label="lr")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("learning rate")
    if "target_std" in rows[0]:
        ax2 = axes[1].twinx()
        ax2.plot(steps, [r["target_std"] for r in rows], color="C3", label="target_std")
        ax2.set_ylabel("target feature std", color="C3")
    fig.tight_layout()
    out_png = epath.Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with out_png.open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
