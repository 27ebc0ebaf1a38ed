"""The kept step of a fine-tune: the best on the validation split, written to WORKDIR/best/.

    best/params      Orbax: {"encoder": ..., "head": {"kernel", "bias"}} of that step (host arrays)
    best/best.json   {"step", "select", "val": metrics, "readout", "model", "outputs", "init"}
    start/           the same for step 0, the fine-tune's starting point: with LP-FT the linear probe,
                     scored on the test split beside the kept step, on the same faces

How a step is kept, resumed and swapped in atomically is training/kept_step.py's, which pretraining's
`selected/` shares. Step 0 is a candidate: with LP-FT it is the linear probe, so a fine-tune
that never beats its probe on validation keeps the probe, and says so (best_step 0).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax
import ml_collections

from mefem_jax.finetuning.outputs import Output
from mefem_jax.training import kept_step

BEST = "best"
START = "start"  # step 0, in the same layout: what the fine-tune started from


def folder(workdir) -> Path:
    return Path(str(workdir)).absolute() / BEST


class Best(kept_step.KeptStep):
    """training/kept_step.py's KeptStep as `best/`, with the head's outputs in best.json and step 0
    also written to `start/`."""

    def __init__(self, workdir, *, select: str, outputs: Sequence[Output], config):
        super().__init__(workdir, BEST, select, self._describe)
        self.outputs = tuple(outputs)
        self.config = config

    def consider(self, step: int, metrics: dict, params) -> bool:
        if self.select in metrics and step == 0 and jax.process_index() == 0:
            self.write(self.path.with_name(START), step, metrics, params)  # with LP-FT, the linear probe
        return super().consider(step, metrics, params)

    def _describe(self, step: int, metrics: dict) -> dict:
        model = json.loads(self.config.model.to_json_best_effort())
        return {"readout": self.config.head.readout, "model": model,
                "outputs": [o.as_json() for o in self.outputs], "init": str(self.config.init)}


def load(workdir, which: str = BEST) -> tuple[dict, dict]:
    """(params, best.json) of a fine-tune's kept step (or, with which=START, of its step 0)."""
    path = folder(workdir).with_name(which)
    if not (path / f"{BEST}.json").is_file():
        raise FileNotFoundError(f"{path} holds no kept step (best.json); is {workdir} a fine-tune's workdir?")
    return kept_step.read(path, BEST)


def model_config(kept: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kept["model"])
