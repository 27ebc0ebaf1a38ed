"""MeFEm pretraining entry point.

    python -m mefem_jax.train --config=configs/vitb.py --workdir=DIR [--config.key=value ...]
    python -m mefem_jax.train --config=configs/vitb.py:smoke --workdir=/tmp/mefem_smoke   # CPU, minutes

With `--config.data.train=synthetic` (the default) it trains on the embedded procedural faces, so it runs
on any machine; point `data.train` at a shard folder (`python -m mefem_jax.data.build_shards`) or at
`tfds:NAME` for real faces. Writes to DIR: config.json, metrics.jsonl, TensorBoard events (tb/),
checkpoints/ (Orbax: train state + data iterator + config), and plots/loss.png at the end. Re-running
the same command resumes from the newest complete checkpoint; SIGTERM (preemption) saves before exit.

The loop does no host work per step beyond fetching the next batch: metrics stay on device and are
pulled only every `log_every` steps (and before each save), where the loss is checked for NaN/Inf.
"""
from __future__ import annotations

import json
import logging as logging_std
import math
import signal
import time
from pathlib import Path

import jax
from etils import epath
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from mefem_jax import sharding
from mefem_jax.checkpoint import Checkpointer, with_shardings
from mefem_jax.data.pipeline import make_train_iterator
from mefem_jax.metric_writer import MetricWriter, plot_loss
from mefem_jax.run_setup import prepare

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vitb.py[:smoke].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (metrics, checkpoints, plots); local or gs://.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for clusters jax cannot detect (TPU pods and SLURM can).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total processes, with --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Join a multi-host run that jax detects itself (TPU pods).")


class NonFiniteLossError(RuntimeError):
    pass


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


def train(config, workdir: str | Path) -> dict:
    """Runs (or resumes) the run in `workdir` up to `config.total_steps`; returns the last logged metrics."""
    workdir = epath.Path(workdir)
    is_lead = jax.process_index() == 0
    if is_lead:
        workdir.mkdir(parents=True, exist_ok=True)

    run = prepare(config)
    sharding.log_mesh(run.mesh)
    pieces, batch_sh, batch_size = run.pieces, run.batch_sharding, run.batch_size
    data_it = make_train_iterator(config.data, image_size=config.model.image_size, global_batch_size=batch_size,
                                  seed=config.seed, process_index=jax.process_index(),
                                  process_count=jax.process_count())

    ckpt = Checkpointer(workdir, config.checkpoint.every_steps, config.checkpoint.max_to_keep)
    state, start = ckpt.restore_latest(with_shardings(run.abstract_state, run.state_sharding), data_it, config)
    if is_lead:  # after the compatibility check: a refused resume leaves the run's config.json alone
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    if state is None:
        state = run.init()
        if config.init_from:
            state = _init_encoder_from(state, config, run.state_sharding)
    step_fn = run.step

    writer = MetricWriter(workdir, enabled=is_lead)
    writer.truncate_after(start)  # a resumed run rewrites what was logged after its checkpoint
    if start == 0 and config.eval.every_steps:
        # Probe the encoder before its first update, so every learning curve starts at its own random init.
        writer.write(0, _probe(pieces, state, config))
    total = int(config.total_steps)
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not is_lead)
    last: dict = {}
    stats = DataStats()
    t_log, n_log, compile_s = time.perf_counter(), 0, None
    stall_s = 0.0  # seconds blocked in ckpt.save since the last metrics row
    try:
        with Preemption() as preempt:
            for step in range(start, total):
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
                    ckpt.save(done, state, data_it, config, force=True)
                    stall_s += time.perf_counter() - t_save
                probe = {}
                if config.eval.every_steps and (done % config.eval.every_steps == 0 or done == total):
                    probe = _probe(pieces, state, config)
                    t_log += probe["probe_seconds"]  # keep the probe's time out of img/s
                if done % config.log_every == 0 or done == total or probe:
                    metrics = jax.device_get(metrics)
                    elapsed = time.perf_counter() - t_log
                    row = {k: float(v) for k, v in metrics.items()}
                    row.update(img_per_sec=n_log * batch_size / elapsed if n_log else float("nan"),
                               compile_s=compile_s, ckpt_stall_s=stall_s, **stats.as_dict(), **probe)
                    writer.write(done, row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                    img_s=f"{row['img_per_sec']:.0f}")
                    last = dict(row, step=done)
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
    from mefem_jax.evaluation.online_probe import probe_during_training

    params = state.target_params
    if jax.process_count() > 1:  # host copies of the (possibly cross-process) shards
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    return probe_during_training(pieces.objective.encoder, params, config.eval)


def _init_encoder_from(state, config, state_sh):
    """Loads released / exported encoder weights into both encoders; the predictor keeps its fresh init."""
    from mefem_jax.export import load_encoder_params

    enc = load_encoder_params(config.init_from, config.model)
    params = dict(state.params, encoder=enc)
    state = state.replace(params=params, target_params=enc)
    logging.info("initialised the encoder from %s", config.init_from)
    return jax.device_put(state, state_sh)


class DataStats:
    """Running counts of what the input pipeline delivered and skipped (bad records never crash a run)."""

    def __init__(self):
        self.decoded = 0
        self.skipped = 0

    def update(self, batch: dict) -> None:
        self.decoded += int(np.shape(batch["image"])[0])
        if "skipped" in batch:
            self.skipped += int(np.sum(batch["skipped"]))

    def as_dict(self) -> dict:
        return {"data_decoded": self.decoded, "data_skipped": self.skipped}


class _QuietLibraries(logging_std.Filter):
    """Orbax narrates every save at INFO (a dozen lines per checkpoint); keep its warnings only."""

    def filter(self, record):
        return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _MULTIHOST.value)
    summary = train(_CONFIG.value, _WORKDIR.value)
    print(json.dumps({k: summary[k] for k in ("step", "loss", "img_per_sec") if k in summary}))


if __name__ == "__main__":
    app.run(main)
