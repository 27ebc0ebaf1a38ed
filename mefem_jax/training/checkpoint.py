"""Orbax checkpoints of a training run: the train state, the Grain iterator and the config, as one step.

    WORKDIR/checkpoints/<step>/{state, data, config, counters, data_identity}

`config`, `counters` and `data_identity` are JSON: the settings the step was computed under, the run's
host-side tallies, and which training data the iterator position refers to (run_record.py). A resume reads
them before the state, so that a run which may not continue (run_record.ResumeCheck) is refused before any
array is loaded.

Saving the data iterator with the model is what makes a resumed run *bit-identical* to an uninterrupted
one: it continues from the exact next batch, and the step's randomness is `fold_in(rng, step)`. Saves are
asynchronous (the step loop continues while the arrays are written) and atomic: Orbax writes into a
temporary folder and renames it when complete, so a run killed mid-save leaves the previous checkpoint as
the newest complete one. A newest checkpoint that exists but cannot be read (truncated, deleted files) is
skipped with a warning and the one before it is used.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import grain
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from mefem_jax.models import predictor, vit

# Config keys whose change makes old parameters or optimizer state meaningless for the new run: the
# ones each model's schema names as shaping its parameters.
INCOMPATIBLE_KEYS = (("model", vit.PARAM_SHAPE_KEYS), ("predictor", predictor.PARAM_SHAPE_KEYS))
# What a key means when a config saved before it existed lacks it.
ABSENT_MEANS = {("model", "scan_layers"): False, ("model", "attention"): "xla"}


class IncompatibleCheckpointError(ValueError):
    pass


class UnreadableCheckpointsError(RuntimeError):
    pass


class CheckpointSaveError(OSError):
    """A save that failed (disk full, permission): names the step, the folder and the cause."""


def checkpoint_dir(workdir: str | Path) -> epath.Path:
    """WORKDIR/checkpoints; local paths made absolute (Orbax requires it), gs:// left as is."""
    workdir = str(workdir)
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir)) / "checkpoints"


class Checkpointer:
    def __init__(self, workdir: str | Path, every_steps: int, max_to_keep: int = 3, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every_steps), 1),
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save that a kill interrupted
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving = None  # step of the newest save started, for naming it when it fails

    # ------------------------------------------------------------------------------------ save

    def save(self, step: int, state, data_iterator, config, force: bool = False,
             counters: dict | None = None, data_identity: dict | None = None) -> bool:
        """Saves when `step` is on the save interval (or `force`); returns whether a save started.

        `counters` (JSON) are the run's cumulative host-side tallies, such as images decoded and skipped,
        which must continue across a resume like the state does. `data_identity` (JSON) names the data
        the steps were trained on (run_record.data_identity).
        """
        items = dict(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        )
        for name, value in (("counters", counters), ("data_identity", data_identity)):
            if value is not None:
                items[name] = ocp.args.JsonSave(dict(value))
        args = ocp.args.Composite(**items)
        self.check()  # the previous save's error is that save's, not this one's
        self._saving = int(step)
        with self._naming_failures():
            return self.manager.save(int(step), args=args, force=force)

    def check(self) -> None:
        """Raises CheckpointSaveError if the save in flight has failed; cheap enough to call every step,
        so an asynchronous save's failure surfaces right after it, not at the next save."""
        with self._naming_failures():
            self.manager.check_for_errors()

    def wait(self) -> None:
        with self._naming_failures():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    @contextlib.contextmanager
    def _naming_failures(self):
        try:
            yield
        except CheckpointSaveError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax and tensorstore wrap OS errors in their own types
            where = self.directory / str(self._saving) if self._saving is not None else self.directory
            raise CheckpointSaveError(f"saving the checkpoint of step {self._saving} to {where} failed: "
                                      f"{_root_cause(e)}; the earlier checkpoints are intact") from e

    # --------------------------------------------------------------------------------- restore

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state, data_iterator,
                       accept: Callable[[int, dict], Any] | None = None) -> tuple[Any, int, Any]:
        """(state, step, verdict) of the newest readable checkpoint, restored onto `abstract_state`'s
        shardings, or (None, 0, None).

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with `sharding` set, so the arrays land
        directly on the current mesh whatever mesh wrote them. `data_iterator` is restored in place.
        `accept(step, saved)` sees what the step saved beside its state (`saved_beside`) before the state
        is read: it raises to refuse the resume, and its return value is the verdict.
        """
        unreadable = []
        for step in reversed(self.steps()):
            verdict = accept(step, self.saved_beside(step)) if accept is not None else None
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back, loudly
                logging.warning("checkpoint at step %d in %s cannot be restored (%s: %s); trying the previous one",
                                step, self.directory, type(e).__name__, e)
                unreadable.append(step)
                continue
            self._set_aside(unreadable)
            logging.info("resumed from step %d in %s", step, self.directory)
            return restored.state, step, verdict
        if unreadable:
            # Starting afresh here would silently discard the run (and rewrite its metrics from step 0).
            raise UnreadableCheckpointsError(
                f"none of the checkpoints in {self.directory} (steps {sorted(unreadable)}) can be restored, "
                "see the warnings above; move them away to start this run afresh")
        return None, 0, None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable step folders to WORKDIR/checkpoints_unreadable/, out of the manager's sight.

        Left in place, they would break the resumed run: Orbax never saves a step at or below its newest
        one, and refuses outright to save a step that exists. Moved, not deleted: a read can fail for
        reasons that a person can still fix, and the folder is theirs to inspect.
        """
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory.parent / "checkpoints_unreadable"
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target, n = aside / str(step), 1
                while target.exists():
                    target, n = aside / f"{step}-{n}", n + 1
                (self.directory / str(step)).rename(target)
                logging.warning("moved the unreadable checkpoint of step %d to %s", step, target)
        ocp.multihost.sync_global_processes("mefem_jax_set_aside_unreadable_checkpoints")
        self.manager.reload()

    def read_counters(self, step: int) -> dict:
        """The counters saved with `step`; {} for a checkpoint written before they were saved."""
        return dict(self._read_json(step, "counters") or {})

    def saved_beside(self, step: int) -> dict:
        """{"config", "data_identity"} saved with `step`, each None where absent (older checkpoints) or
        unreadable (the state restore that follows reports a damaged step)."""
        return {name: self._read_json(step, name) for name in ("config", "data_identity")}

    def _read_json(self, step: int, name: str):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]
        except Exception:  # noqa: BLE001 - absent in older checkpoints, or damaged
            return None


def check_compatible(saved: dict, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume when a shape-defining knob changed; lists every such change."""
    current = json.loads(config.to_json_best_effort())
    problems = []
    for section, keys in INCOMPATIBLE_KEYS:
        for key in keys:
            absent = ABSENT_MEANS.get((section, key))
            old = saved.get(section, {}).get(key, absent)
            new = current.get(section, {}).get(key, absent)
            if old != new:
                problems.append(f"{section}.{key}: checkpoint has {old!r}, this run has {new!r}")
    if problems:
        raise IncompatibleCheckpointError(
            "the workdir holds checkpoints of a different model; use a new --workdir or restore the settings: "
            + "; ".join(problems))


def _root_cause(error: BaseException) -> str:
    """The innermost OSError of the chain (ENOSPC, EACCES), else the error's own first line, kept short."""
    seen, found = error, None
    while seen is not None:
        if isinstance(seen, OSError):
            found = seen
        seen = seen.__cause__ or seen.__context__
    chosen = found or error
    lines = str(chosen).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 300:  # tensorstore puts the OS cause (ENOSPC, EACCES) at the end of a long line
        text = "..." + text[-300:]
    return f"{type(chosen).__name__}: {text}"


def with_shardings(abstract, shardings):
    """Attaches target shardings to an eval_shape result, for restoring onto the current mesh."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def load_params_for_eval(workdir: str | Path, which: str = "target", step: int | None = None):
    """(encoder params, the run's saved config as a dict, step) from a training workdir; the optimizer
    state is read but not returned.

    `which="target"` is the EMA target encoder (the one I-JEPA evaluates), `"context"` the online one.
    The params are in the layout the saved config describes: stacked under `blocks` when the run had
    `model.scan_layers` (`models.vit.unstack_blocks` gives the per-block layout).
    """
    if which not in ("target", "context"):
        raise ValueError(f"which must be 'target' or 'context', got {which!r}")
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints/ folder in {workdir}")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; available: {steps}")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                 config=ocp.args.JsonRestore()))
    finally:
        manager.close()
    state, config = restored.state, restored.config
    params = state["target_params"] if which == "target" else state["params"]["encoder"]
    return jax.tree.map(lambda x: jax.device_get(x), params), config, step
