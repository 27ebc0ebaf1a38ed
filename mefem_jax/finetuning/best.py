"""The kept step of a fine-tune: the best on the validation split, written to WORKDIR/best/.

    best/params      Orbax: {"encoder": ..., "head": {"kernel", "bias"}} of that step (host arrays)
    best/best.json   {"step", "select", "val": metrics, "readout", "model", "outputs", "init"}
    start/           the same for step 0, the fine-tune's starting point: with LP-FT the linear probe,
                     scored on the test split beside the kept step, on the same faces

The validation runs before the step's checkpoint is saved (training/loop.py), and the best value so far
travels in the checkpoint's counters: a resumed run compares with what the interrupted one had kept,
not with a stale value. A new best is written beside the old one and swapped in by renames, so a kill
leaves either folder whole. Step 0 is a candidate: with LP-FT it is the linear probe, so a fine-tune
that never beats its probe on validation keeps the probe, and says so (best_step 0).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from mefem_jax.finetuning.outputs import Output
from mefem_jax.finetuning.scoring import is_better

BEST = "best"
START = "start"  # step 0, in the same layout: what the fine-tune started from


def folder(workdir) -> Path:
    return Path(str(workdir)).absolute() / BEST


class Best:
    def __init__(self, workdir, *, select: str, outputs: Sequence[Output], config):
        self.path = folder(workdir)
        self.select = select
        self.outputs = tuple(outputs)
        self.config = config
        self.step: int | None = None
        self.value: float | None = None

    def counters(self) -> dict:
        return {} if self.step is None else {"best_step": self.step, "best_value": self.value}

    def restore(self, saved: dict) -> None:
        if "best_step" in saved:
            self.step, self.value = int(saved["best_step"]), float(saved["best_value"])

    def consider(self, step: int, metrics: dict, params) -> bool:
        if self.select not in metrics:
            raise ValueError(f"eval.select={self.select!r} is not a validation metric; they are {sorted(metrics)}")
        if step == 0 and jax.process_index() == 0:  # the starting point (with LP-FT, the linear probe)
            self._write(self.path.with_name(START), step, metrics, params)
        value = float(metrics[self.select])
        if not is_better(self.select, value, self.value):
            return False
        self.step, self.value = step, value
        if jax.process_index() == 0:
            self._write(self.path, step, metrics, params)
        logging.info("best step so far: %d (val %s %.4f)", step, self.select, value)
        return True

    def _write(self, path: Path, step: int, metrics: dict, params) -> None:
        new, old = path.with_name(path.name + ".new"), path.with_name(path.name + ".old")
        for leftover in (new, old):
            shutil.rmtree(leftover, ignore_errors=True)
        new.mkdir(parents=True)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(new / "params", params)
        (new / "best.json").write_text(json.dumps(self.describe(step, metrics), indent=2))
        if path.exists():
            path.rename(old)
        new.rename(path)
        shutil.rmtree(old, ignore_errors=True)

    def describe(self, step: int, metrics: dict) -> dict:
        model = json.loads(self.config.model.to_json_best_effort())
        return {"step": step, "select": self.select, "val": metrics, "readout": self.config.head.readout,
                "model": model, "outputs": [o.as_json() for o in self.outputs], "init": str(self.config.init)}


def load(workdir, which: str = BEST) -> tuple[dict, dict]:
    """(params, best.json) of a fine-tune's kept step (or, with which=START, of its step 0)."""
    path = folder(workdir).with_name(which)
    if not (path / "best.json").is_file():
        raise FileNotFoundError(f"{path} holds no kept step (best.json); is {workdir} a fine-tune's workdir?")
    kept = json.loads((path / "best.json").read_text())
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path / "params")
    return jax.device_get(params), kept


def model_config(kept: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kept["model"])
