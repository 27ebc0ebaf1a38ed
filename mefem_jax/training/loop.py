"""The step loop every training command runs: pretraining (`train.py`) and fine-tuning (`finetune.py`).

    run(config, workdir, task, allow_config_change) -> the last logged metrics

A command describes its run as a `Task` (how to build the jitted step, the data, a fresh state, how a
host batch becomes the step's arrays, and what to evaluate now and then); this module does the rest,
the same way for both:

* one run per workdir (workdir_lock.py), and a failed start leaves no empty workdir of its own making;
* resume from the newest readable checkpoint, train state and data iterator together, after
  run_record.ResumeCheck has compared the command's config with the checkpoint's (refusals are one line);
* metrics on device, pulled every `log_every` steps and before each save, where a non-finite loss,
  gradient or parameter norm stops the run before it is checkpointed;
* `task.evaluate` at step 0 of a fresh run, every `task.eval_every` steps and at the end, before the
  save of that step, so what it records (a best step, in `task.counters`) is saved with the step;
* asynchronous Orbax saves with the host counters, SIGTERM/SIGINT saved after the current step (exit 3);
* metrics.jsonl, TensorBoard, a progress bar, plots/loss.png at the end.

A resumed run computes exactly what an uninterrupted one would: the step's randomness is a function of
the step, the data iterator is restored to the next batch, and nothing here draws random numbers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging as logging_std
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from etils import epath
from tqdm import tqdm

from mefem_jax.config_checks import ConfigError
from mefem_jax.training import run_record, sharding
from mefem_jax.training.checkpoint import Checkpointer, checkpoint_dir, with_shardings
from mefem_jax.training.metric_writer import MetricWriter, plot_loss, read_metrics
from mefem_jax.training.run_setup import RunSetup
from mefem_jax.workdir_lock import LOCK_NAME, WorkdirLock


class NonFiniteLossError(RuntimeError):
    pass


class LostCheckpointsError(ValueError):
    pass


@dataclasses.dataclass
class Task:
    """What a command's run is; the loop calls these and nothing else that knows the model.

    prepare(config) -> RunSetup                  mesh, shardings, the jitted (state, inputs) -> (state, metrics)
    data(config, batch_size) -> iterator         a Grain DatasetIterator of host batches (saved in checkpoints)
    fresh_state(run) -> state                    the step-0 state, on the run's shardings
    inputs(batch, run) -> pytree of jax.Array    a host batch as the step's second argument
    evaluate(state) -> dict                      metrics of the current state (probes, validation); may
                                                 update `counters`
    counters() / restore_counters(dict)          host-side tallies that continue across a resume (JSON)
    """

    prepare: Callable[[Any], RunSetup]
    data: Callable[[Any, int], Any]
    fresh_state: Callable[[RunSetup], Any]
    inputs: Callable[[dict, RunSetup], Any]
    evaluate: Callable[[Any], dict] | None = None
    eval_every: int = 0
    counters: Callable[[], dict] = dict
    restore_counters: Callable[[dict], None] = lambda saved: None


class Preemption:
    """Turns SIGTERM/SIGINT into a flag the loop polls, so the current step finishes and is saved."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("received signal %d: saving a checkpoint after this step, then exiting", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run(config, workdir: str | Path, task: Task, allow_config_change: tuple[str, ...] | list[str] = ()) -> dict:
    """Runs (or resumes) the run in `workdir` up to `config.total_steps`; returns the last logged metrics
    with `step` (the last step done and saved) and `preempted` (stopped by a signal after saving).
    The config must already be validated: a bad config leaves nothing behind."""
    run_record.check_allowed_names(config, allow_config_change)
    workdir = epath.Path(workdir)
    is_lead = jax.process_index() == 0
    local = "://" not in str(workdir)
    created = is_lead and local and not workdir.exists()
    if is_lead:
        workdir.mkdir(parents=True, exist_ok=True)
    with WorkdirLock(workdir) if is_lead else contextlib.nullcontext():
        try:
            return _run_locked(config, workdir, task, is_lead, tuple(allow_config_change))
        except BaseException:
            if created:
                _remove_if_untouched(workdir)
            raise


def _remove_if_untouched(workdir) -> None:
    """A run that failed before writing anything leaves no empty workdir of its own making behind.
    (Local paths only; never raises, so the error that stopped the run is the one reported.)"""
    workdir = Path(str(workdir))
    with contextlib.suppress(OSError):
        if not any((workdir / "checkpoints").iterdir()):  # Orbax creates it before anything is saved
            (workdir / "checkpoints").rmdir()
    with contextlib.suppress(OSError):
        if {p.name for p in workdir.iterdir()} == {LOCK_NAME}:
            (workdir / LOCK_NAME).unlink()
            workdir.rmdir()


def _refuse_lost_checkpoints(workdir) -> None:
    """Metrics without any checkpoint (or save in flight) mean the checkpoints were deleted: a fresh
    start would silently drop the logged history. (Called before Orbax cleans interrupted saves away.)"""
    metrics = workdir / "metrics.jsonl"
    if not metrics.exists():
        return
    logged = [r["step"] for r in read_metrics(metrics) if r.get("step", 0) > 0]
    ckpt_dir = checkpoint_dir(workdir)
    if not logged or (ckpt_dir.exists() and any(ckpt_dir.iterdir())):
        return
    raise LostCheckpointsError(f"{metrics} logs steps up to {max(logged)} but {ckpt_dir} holds no checkpoint; "
                               "restore the checkpoints, or start afresh in a new --workdir (or after "
                               "removing metrics.jsonl)")


def _check_total(total: int, start: int, workdir) -> None:
    if total < start:
        raise ConfigError(f"total_steps={total} is not allowed; allowed: >= {start}, the step of the newest "
                          f"checkpoint in {workdir} that this run resumes from")


def _run_locked(config, workdir, task: Task, is_lead: bool, allow_config_change: tuple[str, ...]) -> dict:
    if is_lead:
        _refuse_lost_checkpoints(workdir)
    setup = task.prepare(config)
    sharding.log_mesh(setup.mesh)
    batch_size = setup.batch_size
    data_it = task.data(config, batch_size)
    ckpt = Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep)
    total = int(config.total_steps)
    resume_check = run_record.ResumeCheck(config, workdir, allow_config_change)
    try:
        abstract = with_shardings(setup.abstract_state, setup.state_sharding)
        state, start, changes = ckpt.restore_latest(abstract, data_it, accept=resume_check)
        _check_total(total, start, workdir)
        if state is None:
            state = task.fresh_state(setup)
        else:
            task.restore_counters(ckpt.read_counters(start))
    except BaseException:  # a refused resume or failed start stops Orbax's and Grain's threads too
        ckpt.close()
        data_it.close()
        raise
    if is_lead:  # once the start is settled: a refused or failed one leaves the run's record alone
        run_record.write(workdir, config, start, changes)

    writer = MetricWriter(workdir, enabled=is_lead)
    writer.truncate_after(start)  # a resumed run rewrites what was logged after its checkpoint
    evaluate = task.evaluate if task.evaluate is not None and task.eval_every else None
    if start == 0 and evaluate is not None:
        # Evaluate before the first update, so every learning curve starts at its own initial state.
        writer.write(0, evaluate(state))
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not is_lead)
    last: dict = {"step": start, "preempted": False}  # what a run that has nothing left to do reports
    t_log, n_log, compile_s = time.perf_counter(), 0, None
    stall_s = 0.0  # seconds blocked in ckpt.save since the last metrics row
    try:
        with Preemption() as preempt:
            for step in range(start, total):
                ckpt.check()  # an asynchronous save that failed stops the run now, naming its step
                batch = next(data_it)
                inputs = task.inputs(batch, setup)
                t0 = time.perf_counter()
                state, metrics = setup.step(state, inputs)
                if compile_s is None:  # the first call traces and compiles; keep it out of img/s
                    jax.block_until_ready(state.step)
                    compile_s = time.perf_counter() - t0
                    t_log, n_log = time.perf_counter(), 0
                    logging.info("first step (trace + compile + run): %.1fs", compile_s)
                else:
                    n_log += 1
                bar.update(1)
                done = step + 1
                stop = preempt.requested or ckpt.manager.reached_preemption(done)
                saving = stop or done == total or ckpt.manager.should_save(done)
                if done % config.log_every == 0 or saving:
                    metrics = jax.device_get(metrics)
                    _check_finite(metrics, done)
                evaluated = {}
                if evaluate is not None and (done % task.eval_every == 0 or done == total):
                    evaluated = evaluate(state)
                    t_log += evaluated.get("probe_seconds", 0.0)  # keep the evaluation's time out of img/s
                if saving:
                    # The loop waits here for the device-to-host copy and for the previous async save to
                    # finish; the writing itself overlaps the next steps. Logged as ckpt_stall_s.
                    t_save = time.perf_counter()
                    ckpt.save(done, state, data_it, config, force=True, counters=task.counters(),
                              data_identity=resume_check.data)
                    stall_s += time.perf_counter() - t_save
                if done % config.log_every == 0 or done == total or evaluated or stop:  # a row at the saved step
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - t_log
                    row = {k: float(v) for k, v in metrics.items()}
                    row.update(img_per_sec=n_log * batch_size / elapsed if n_log else float("nan"),
                               compile_s=compile_s, ckpt_stall_s=stall_s, **task.counters(), **evaluated)
                    writer.write(done, row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                    img_s=f"{row['img_per_sec']:.0f}")
                    last = dict(row, step=done, preempted=stop)
                    t_log, n_log, stall_s = time.perf_counter(), 0, 0.0
                if stop:
                    logging.warning("preempted: saved step %d, exiting", done)
                    break
    finally:
        bar.close()
        ckpt.close()  # lets in-flight async saves of good steps finish, even when we stop on an error
        data_it.close()  # stops Grain worker processes
        writer.close()
    if is_lead and writer.path.exists():
        plot_loss(writer.path, workdir / "plots" / "loss.png")
    return last


def _check_finite(metrics: dict, step: int) -> None:
    # param_norm is of the state about to be saved: a finite loss and gradient can still produce an update
    # that overflows the parameters (a diverging learning rate), and that state must not be checkpointed.
    for key in ("loss", "grad_norm", "param_norm"):
        value = float(metrics[key])
        if not math.isfinite(value):
            raise NonFiniteLossError(f"{key} is {value} at step {step}; stopping before it is checkpointed. "
                                     "The checkpoints of earlier steps are intact.")


class _QuietOrbax(logging_std.Filter):
    def filter(self, record):
        return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def quiet_checkpoint_logs() -> None:
    """Orbax narrates every save at INFO (a dozen lines per checkpoint); keep its warnings only."""
    logging.get_absl_handler().addFilter(_QuietOrbax())


class DataStats:
    """Running counts of what the input pipeline delivered and skipped (bad records never crash a run), and
    for a mixture what each source delivered (`data_decoded_<name>`, names from data/mixture.py)."""

    def __init__(self, source_names=(), saved: dict | None = None):  # saved: an earlier as_dict()
        self.keys = [f"data_decoded_{name}" for name in source_names]
        self.restore(saved or {})

    def restore(self, saved: dict) -> None:
        self.decoded = int(saved.get("data_decoded", 0))
        self.skipped = int(saved.get("data_skipped", 0))
        self.by_source = [int(saved.get(key, 0)) for key in self.keys]

    def update(self, batch: dict) -> None:
        self.decoded += int(np.shape(batch["image"])[0])
        if "skipped" in batch:
            self.skipped += int(np.sum(batch["skipped"]))
        if self.keys:
            self.by_source = [n + int(k) for n, k in zip(self.by_source, batch["decoded_per_source"])]

    def as_dict(self) -> dict:
        return {"data_decoded": self.decoded, "data_skipped": self.skipped,
                **dict(zip(self.keys, self.by_source))}
