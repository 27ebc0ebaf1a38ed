"""The kept step of a run: the params of the step whose validation number was best so far, on disk.

    WORKDIR/<name>/params        Orbax StandardCheckpointer, host arrays
    WORKDIR/<name>/<name>.json   {"step", "select", "val": that step's metrics, ...what the run adds}

Fine-tuning keeps `best/` (eval.select over the validation metrics); pretraining keeps `selected/` when
`eval.select` names a probe metric, because checkpoints rotate (`checkpoint.max_to_keep`) and a long run's
best encoder can be gone by its end: a 3,000-step UTKFace run peaked on its CLS probes at step 500 and had
lost that checkpoint when it finished (docs/RESULTS.md).

The loop evaluates before it saves a step (training/loop.py), and the kept step and value travel in the
checkpoint's counters (`<name>_step`, `<name>_value`, `<name>_select`), so a resumed run compares with what
the interrupted one had kept. A resume replays its steps bit for bit and so rewrites the same kept step.
A new kept step is written beside the old one and swapped in by renames: a kill leaves either whole.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

LOWER_IS_BETTER = ("loss", "mae", "rmse")
# Readouts other than CLS add their name to a probe metric (evaluation/online_probe.py): probe_age_mae_grid.
READOUT_SUFFIXES = ("_mean", "_grid", "_pixels")


def lower_is_better(select: str) -> bool:
    """Losses, MAEs and RMSEs (whatever the readout) are better lower; accuracy, AUC, R², RankMe higher."""
    for suffix in READOUT_SUFFIXES:
        if select.endswith(suffix):
            select = select[: -len(suffix)]
            break
    return select.endswith(LOWER_IS_BETTER)


def is_better(select: str, value: float, kept: float | None) -> bool:
    """Whether `value` of metric `select` beats the kept one (None: nothing kept). NaN never does."""
    if not math.isfinite(value):
        return False
    if kept is None:
        return True
    return value < kept if lower_is_better(select) else value > kept


class KeptStep:
    """Keeps WORKDIR/<name>/ at the step with the best `select` so far (module docstring).

    `describe(step, metrics)` adds the run's own fields to <name>.json (the model, the head's outputs...).
    Only process 0 writes; every process keeps the same counters."""

    def __init__(self, workdir, name: str, select: str, describe: Callable[[int, dict], dict] = lambda s, m: {}):
        self.path = Path(str(workdir)).absolute() / name
        self.name, self.select, self.describe = name, select, describe
        self.step: int | None = None
        self.value: float | None = None

    def counters(self) -> dict:
        if self.step is None:
            return {}
        return {f"{self.name}_step": self.step, f"{self.name}_value": self.value, f"{self.name}_select": self.select}

    def restore(self, saved: dict) -> None:
        if f"{self.name}_step" not in saved:
            return
        # Counters saved before the metric's name was kept with them were always of this run's select.
        if saved.get(f"{self.name}_select", self.select) != self.select:
            logging.warning("eval.select changed from %s to %s on resume: %s/ is replaced at the next probe",
                            saved[f"{self.name}_select"], self.select, self.path)
            return
        self.step, self.value = int(saved[f"{self.name}_step"]), float(saved[f"{self.name}_value"])

    def consider(self, step: int, metrics: dict, params) -> bool:
        """Keeps `params` when `metrics[select]` beats the kept value; returns whether it did."""
        if self.select not in metrics:
            raise ValueError(f"eval.select={self.select!r} is not a validation metric; they are {sorted(metrics)}")
        value = float(metrics[self.select])
        if not is_better(self.select, value, self.value):
            return False
        self.step, self.value = step, value
        if jax.process_index() == 0:
            self.write(self.path, step, metrics, params)
        logging.info("kept step so far: %d (validation %s %.4f) in %s", step, self.select, value, self.path)
        return True

    def write(self, path: Path, step: int, metrics: dict, params) -> None:
        """Host `params` and <name>.json into `path`, atomically (a new folder renamed into place)."""
        new, old = path.with_name(path.name + ".new"), path.with_name(path.name + ".old")
        for leftover in (new, old):
            shutil.rmtree(leftover, ignore_errors=True)
        new.mkdir(parents=True)
        # A checkpointer of this process alone: the others do not write, so they must not be waited for.
        alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                   active_processes={jax.process_index()})
        with ocp.StandardCheckpointer(multiprocessing_options=alone) as checkpointer:
            checkpointer.save(new / "params", params)
        record = {"step": step, "select": self.select, "val": metrics, **self.describe(step, metrics)}
        (new / f"{self.name}.json").write_text(json.dumps(record, indent=2))
        if path.exists():
            path.rename(old)
        new.rename(path)
        shutil.rmtree(old, ignore_errors=True)


def read(path, name: str) -> tuple[Any, dict]:
    """(params as host numpy arrays, <name>.json) of a kept-step folder (local or gs://), whatever mesh
    wrote it."""
    path = epath.Path(path if "://" in str(path) else Path(path).absolute())  # Orbax wants absolute paths
    record_path = path / f"{name}.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{path} holds no kept step ({name}.json)")
    record = json.loads(record_path.read_text())
    if not (path / "params").exists():
        raise FileNotFoundError(f"{path} has {name}.json but no params/ checkpoint")
    with ocp.StandardCheckpointer() as checkpointer:
        target = jax.tree.map(lambda a: np.empty(a.shape, a.dtype),
                              checkpointer.metadata(path / "params").item_metadata.tree)
        params = checkpointer.restore(path / "params", target)
    return params, record
