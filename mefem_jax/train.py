"""MeFEm pretraining entry point.

    python -m mefem_jax.train --config=configs/vitb.py --workdir=DIR [--config.key=value ...]
    python -m mefem_jax.train --config=configs/vitb.py:smoke --workdir=/tmp/mefem_smoke   # CPU, minutes

With `--config.data.train=synthetic` (the default) it trains on the embedded procedural faces, so it runs
on any machine; point `data.train` at a shard folder (`python -m mefem_jax.data.build_shards`) or at
`tfds:NAME` for real faces. Writes to DIR: config.json, metrics.jsonl, TensorBoard events (tb/),
checkpoints/ (Orbax: train state + data iterator + config), and plots/loss.png at the end. Re-running
the same command resumes from the newest complete checkpoint; SIGTERM (preemption) saves before exit.
With `--config.eval.select=METRIC` (a probe column, e.g. probe_age_mae) it also keeps the target encoder
of the probed step where METRIC is best in DIR/selected/, an encoder source like any checkpoint.
A resume refuses settings or data that would change what its steps compute, unless
`--allow_config_change=KEY[,KEY...]` names them; every change is kept in config_history.jsonl
(training/run_record.py).

One run per workdir (workdir_lock.py). Exit codes, for schedulers: 0 finished, 3 preempted and saved
(re-run the same command to resume), 2 bad input (flags, config, data, workdir contents), 1 failed
(NaN loss, a failed save, a locked workdir, unreadable checkpoints). Every failure is one line on
stderr, `train: ...`; `--debug` keeps the traceback.

The step loop is training/loop.py's, shared with fine-tuning: no host work per step beyond fetching the
next batch; metrics stay on device and are pulled only every `log_every` steps (and before each save),
where the loss is checked for NaN/Inf. This file says what the pretraining run is (`pretraining_task`).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from mefem_jax import cli
from mefem_jax.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_FINISHED, EXIT_PREEMPTED  # noqa: F401 - in README
from mefem_jax.config import validate_config
from mefem_jax.config_checks import ConfigError
from mefem_jax.data import mixture
from mefem_jax.data.pipeline import make_train_iterator
from mefem_jax.evaluation.online_probe import metric_names, probe_during_training
from mefem_jax.models import vit
from mefem_jax.training import kept_step, loop, sharding
from mefem_jax.training.metric_writer import read_metrics
from mefem_jax.training.run_setup import prepare
from mefem_jax.weights import encoders
from mefem_jax.weights.runs import SELECTED, run_step
from mefem_jax.weights.timm_keys import ConversionError

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


class InitFromMismatchError(ValueError):
    """init_from's weights do not fit model.*: one short line; the cause lists every parameter."""


def train(config, workdir: str | Path, allow_config_change: tuple[str, ...] | list[str] = ()) -> dict:
    """Runs (or resumes) the run in `workdir` up to `config.total_steps`; returns the last logged metrics
    with `step` (the last step done and saved) and `preempted` (stopped by a signal after saving).
    `allow_config_change`: keys a resume may change beyond run_record.RESUMABLE."""
    validate_config(config)  # before the workdir is touched: a bad config leaves nothing behind
    return loop.run(config, workdir, pretraining_task(config, workdir), allow_config_change)


def pretraining_task(config, workdir: str | Path | None = None) -> loop.Task:
    """The JEPA run as the shared loop sees it: run_setup's step on the pretraining stream, probes of the
    target encoder every eval.every_steps, the pipeline's decoded/skipped counts saved with each step.
    `workdir`'s metrics.jsonl, when there is one, gives a resumed run's probes their RankMe history; with
    `eval.select`, the target encoder of the step where that probe metric is best is kept in
    `workdir/selected/` (weights/runs.py reads it as an encoder)."""
    stats = loop.DataStats(mixture.source_names(config.data.train))
    select = config.eval.get("select", "")  # configs saved before the key existed lack it
    kept = None
    names = metric_names(config.eval) if select else []
    if select and select not in names:  # before any step: a typo would cost a probe interval
        raise ConfigError(f"eval.select={select!r} is not allowed; allowed: one of the probe columns {names}")
    if select and workdir is not None:
        kept = kept_step.KeptStep(workdir, SELECTED, select, lambda step, metrics: _describe(config))
    pieces = {}  # the run's Pieces once prepared, for the probes

    def setup(cfg):
        run = prepare(cfg)
        pieces["run"] = run
        return run

    def data(cfg, batch_size):
        return make_train_iterator(cfg.data, image_size=cfg.model.image_size, global_batch_size=batch_size,
                                   seed=cfg.seed, process_index=jax.process_index(),
                                   process_count=jax.process_count())

    def inputs(batch, run):
        stats.update(batch)
        return sharding.global_batch(np.asarray(batch["image"]), run.batch_sharding)

    def evaluate(state):
        params = _host_target(state)
        metrics = probe_during_training(pieces["run"].pieces.objective.encoder, params, config.eval,
                                        _history(workdir, pieces))
        if kept is not None:
            kept.consider(int(state.step), metrics, params)
        return metrics

    def counters():
        return dict(stats.as_dict(), **(kept.counters() if kept is not None else {}))

    def restore_counters(saved):
        stats.restore(saved)
        if kept is not None:
            kept.restore(saved)

    return loop.Task(prepare=setup, data=data, fresh_state=lambda run: _fresh_state(run, config), inputs=inputs,
                     evaluate=evaluate, eval_every=int(config.eval.every_steps), counters=counters,
                     restore_counters=restore_counters)


def _history(workdir, pieces: dict) -> list[dict]:
    """The metric rows this run logged before this process started (read once, on the first probe)."""
    if "history" not in pieces:
        path = epath.Path(workdir) / "metrics.jsonl" if workdir is not None else None
        pieces["history"] = read_metrics(path) if path is not None and path.exists() else []
    return pieces["history"]


def _host_target(state) -> dict:
    """The target encoder's params as host arrays, on every process (probed there, kept by process 0)."""
    params = state.target_params
    if jax.process_count() > 1:  # host copies of the (possibly cross-process) shards
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def _describe(config) -> dict:
    """What selected/selected.json says beside the step and its probes: enough to load and card it."""
    return {"kind": "pretraining", "which": "target", "config": json.loads(config.to_json_best_effort())}


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


def main(argv):
    del argv
    loop.quiet_checkpoint_logs()
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
