"""MeFEm pretraining entry point.

    python -m mefem_jax.train --config=configs/vitb.py --workdir=DIR [--config.key=value ...]
    python -m mefem_jax.train --config=configs/vitb.py:smoke --workdir=/tmp/mefem_smoke   # CPU, minutes

With `--config.data.train=synthetic` (the default) it trains on the embedded procedural faces, so it runs
on any machine; point `data.train` at a shard folder (`python -m mefem_jax.data.build_shards`) or at
`tfds:NAME` for real faces. Writes to DIR: config.json, metrics.jsonl, TensorBoard events (tb/),
checkpoints/ (Orbax: train state + data iterator + config), and plots/loss.png at the end. Re-running
the same command resumes from the newest complete checkpoint; SIGTERM (preemption) saves before exit.
A resume refuses settings or data that would change what its steps compute, unless
`--allow_config_change=KEY[,KEY...]` names them; every change is kept in config_history.jsonl
(training/run_record.py).

One run per workdir (workdir_lock.py). Exit codes, for schedulers: 0 finished, 3 preempted and saved
(re-run the same command to resume), 2 bad input (flags, config, data, workdir contents), 1 failed
(NaN loss, a failed save, a locked workdir, unreadable checkpoints). Every failure is one line on
stderr, `train: ...`; `--debug` keeps the traceback.

The loop does no host work per step beyond fetching the next batch: metrics stay on device and are
pulled only every `log_every` steps (and before each save), where the loss is checked for NaN/Inf.
"""
from __future__ import annotations

import contextlib
import json
import logging as logging_std
import math
import signal
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from tqdm import tqdm

from mefem_jax import cli
from mefem_jax.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_FINISHED, EXIT_PREEMPTED  # noqa: F401 - in README
from mefem_jax.config import validate_config
from mefem_jax.config_checks import ConfigError
from mefem_jax.data import mixture
from mefem_jax.data.pipeline import make_train_iterator
from mefem_jax.evaluation.online_probe import probe_during_training
from mefem_jax.models import vit
from mefem_jax.training import run_record, sharding
from mefem_jax.training.checkpoint import Checkpointer, checkpoint_dir, with_shardings
from mefem_jax.training.metric_writer import MetricWriter, plot_loss, read_metrics
from mefem_jax.training.run_setup import prepare
from mefem_jax.weights import encoders
from mefem_jax.weights.runs import run_step
from mefem_jax.weights.timm_keys import ConversionError
from mefem_jax.workdir_lock import LOCK_NAME, WorkdirLock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vitb.py[:smoke].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (metrics, checkpoints, plots); local or gs://.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for clusters jax cannot detect (TPU pods and SLURM can).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total processes, with --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Join a multi-host run that jax detects itself (TPU pods).")
_ALLOW_CHANGE = flags.DEFINE_list(
    "allow_config_change", [], "Config keys (or sections) a resume may change although that changes what its "
    "steps compute, e.g. data.batch_size,data.train; each change is recorded in WORKDIR/config_history.jsonl.")


class NonFiniteLossError(RuntimeError):
    pass


class LostCheckpointsError(ValueError):
    pass


class InitFromMismatchError(ValueError):
    """init_from's weights do not fit model.*: one short line; the cause lists every parameter."""


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


def train(config, workdir: str | Path, allow_config_change: tuple[str, ...] | list[str] = ()) -> dict:
    """Runs (or resumes) the run in `workdir` up to `config.total_steps`; returns the last logged metrics
    with `step` (the last step done and saved) and `preempted` (stopped by a signal after saving).
    `allow_config_change`: keys a resume may change beyond run_record.RESUMABLE."""
    validate_config(config)  # before the workdir is touched: a bad config leaves nothing behind
    run_record.check_allowed_names(config, allow_config_change)
    workdir = epath.Path(workdir)
    is_lead = jax.process_index() == 0
    local = "://" not in str(workdir)
    created = is_lead and local and not workdir.exists()
    if is_lead:
        workdir.mkdir(parents=True, exist_ok=True)
    with WorkdirLock(workdir) if is_lead else contextlib.nullcontext():
        try:
            return _train_locked(config, workdir, is_lead, tuple(allow_config_change))
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


def _train_locked(config, workdir, is_lead: bool, allow_config_change: tuple[str, ...]) -> dict:
    if is_lead:
        _refuse_lost_checkpoints(workdir)
    run = prepare(config)
    sharding.log_mesh(run.mesh)
    pieces, batch_sh, batch_size = run.pieces, run.batch_sharding, run.batch_size
    data_it = make_train_iterator(config.data, image_size=config.model.image_size, global_batch_size=batch_size,
                                  seed=config.seed, process_index=jax.process_index(),
                                  process_count=jax.process_count())

    ckpt = Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep)
    total = int(config.total_steps)
    resume_check = run_record.ResumeCheck(config, workdir, allow_config_change)
    try:
        abstract = with_shardings(run.abstract_state, run.state_sharding)
        state, start, changes = ckpt.restore_latest(abstract, data_it, accept=resume_check)
        _check_total(total, start, workdir)
        if state is None:
            state = _fresh_state(run, config)
    except BaseException:  # a refused resume or failed start stops Orbax's and Grain's threads too
        ckpt.close()
        data_it.close()
        raise
    if is_lead:  # once the start is settled: a refused or failed one leaves the run's record alone
        run_record.write(workdir, config, start, changes)
    step_fn = run.step

    writer = MetricWriter(workdir, enabled=is_lead)
    writer.truncate_after(start)  # a resumed run rewrites what was logged after its checkpoint
    if start == 0 and config.eval.every_steps:
        # Probe the encoder before its first update, so every learning curve starts at its own random init.
        writer.write(0, _probe(pieces, state, config))
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not is_lead)
    last: dict = {"step": start, "preempted": False}  # what a run that has nothing left to do reports
    stats = DataStats(mixture.source_names(config.data.train), ckpt.read_counters(start) if start else {})
    t_log, n_log, compile_s = time.perf_counter(), 0, None
    stall_s = 0.0  # seconds blocked in ckpt.save since the last metrics row
    try:
        with Preemption() as preempt:
            for step in range(start, total):
                ckpt.check()  # an asynchronous save that failed stops the run now, naming its step
                batch = next(data_it)
                stats.update(batch)
                images = sharding.global_batch(np.asarray(batch["image"]), batch_sh)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, images)
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
                if saving:
                    # The loop waits here for the device-to-host copy and for the previous async save to
                    # finish; the writing itself overlaps the next steps. Logged as ckpt_stall_s.
                    t_save = time.perf_counter()
                    ckpt.save(done, state, data_it, config, force=True, counters=stats.as_dict(),
                              data_identity=resume_check.data)
                    stall_s += time.perf_counter() - t_save
                probe = {}
                if config.eval.every_steps and (done % config.eval.every_steps == 0 or done == total):
                    probe = _probe(pieces, state, config)
                    t_log += probe["probe_seconds"]  # keep the probe's time out of img/s
                if done % config.log_every == 0 or done == total or probe or stop:  # a row at the saved step
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - t_log
                    row = {k: float(v) for k, v in metrics.items()}
                    row.update(img_per_sec=n_log * batch_size / elapsed if n_log else float("nan"),
                               compile_s=compile_s, ckpt_stall_s=stall_s, **stats.as_dict(), **probe)
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


def _probe(pieces, state, config) -> dict:
    """Linear probes of the current target encoder on the eval set (config.eval), on every process."""
    params = state.target_params
    if jax.process_count() > 1:  # host copies of the (possibly cross-process) shards
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    return probe_during_training(pieces.objective.encoder, params, config.eval)


def _fresh_state(run, config):
    """The step-0 state; with `init_from`, its encoders (context and target) hold those weights and the
    predictor keeps its fresh init. The weights are read before the state is built: they fail more often."""
    encoder = _init_from_weights(config) if config.init_from else None
    state = run.init()
    if encoder is None:
        return state
    state = state.replace(params=dict(state.params, encoder=encoder), target_params=encoder)
    logging.info("initialised the encoder from %s", config.init_from)
    return jax.device_put(state, run.state_sharding)


def _init_from_weights(config) -> dict:
    try:
        return encoders.load_encoder_params(config.init_from, config.model)
    except ConversionError as e:
        if len(e.problems) <= 1:  # already one line
            raise
        # Weights of another architecture misfit every parameter (54 for a width change): name the cause.
        raise InitFromMismatchError(f"init_from {config.init_from}: {_architecture_misfit(config)} "
                                    f"({len(e.problems)} parameters do not fit); --debug lists them") from e


def _architecture_misfit(config) -> str:
    """'width 128 != model.width 64' for each shape key on which init_from's weights and model.* differ."""
    source = str(config.init_from)
    # A weights file need not say its head count, which shapes no parameter: borrow the configured one.
    spec = source if run_step(source) else f"{source}:heads={config.model.heads}"
    try:
        theirs = encoders.load_encoder(spec).model_cfg
    except Exception:  # noqa: BLE001 - only the description is lost; the mismatch itself was read
        return "does not fit the configured encoder"
    # variant is a name, heads shape nothing, and the scanned or unrolled layout is converted on loading.
    keys = [k for k in vit.PARAM_SHAPE_KEYS if k not in ("variant", "heads", "scan_layers")]
    differ = [f"{k} {theirs.get(k)} != model.{k} {config.model.get(k)}" for k in keys
              if theirs.get(k) != config.model.get(k)]
    return ", ".join(differ) or "does not fit the configured encoder"


class DataStats:
    """Running counts of what the input pipeline delivered and skipped (bad records never crash a run), and
    for a mixture what each source delivered (`data_decoded_<name>`, names from data/mixture.py)."""

    def __init__(self, source_names=(), saved: dict | None = None):  # saved: an earlier as_dict()
        saved = saved or {}
        self.decoded = int(saved.get("data_decoded", 0))
        self.skipped = int(saved.get("data_skipped", 0))
        self.keys = [f"data_decoded_{name}" for name in source_names]
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


class _QuietLibraries(logging_std.Filter):
    """Orbax narrates every save at INFO (a dozen lines per checkpoint); keep its warnings only."""

    def filter(self, record):
        return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    _MULTIHOST.value)
    summary = train(_CONFIG.value, _WORKDIR.value, _ALLOW_CHANGE.value)  # errors: one line and a status (cli.run)
    preempted = summary.pop("preempted", False)
    print(json.dumps(dict({k: summary[k] for k in ("step", "loss", "img_per_sec") if k in summary},
                          status="preempted" if preempted else "finished")))
    return EXIT_PREEMPTED if preempted else EXIT_FINISHED


if __name__ == "__main__":
    cli.run("train", main, _CONFIG)
