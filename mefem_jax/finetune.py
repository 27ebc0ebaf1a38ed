"""Fine-tuning entry point: a pretrained encoder and a linear head trained together on labelled faces.

    python -m mefem_jax.finetune --config=configs/finetune.py[:cpu] --workdir=W --config.init=SPEC \
        --config.data.train=TRAIN --config.data.val=VAL --config.data.test=TEST \
        --config.target=age:regression[,gender:classification,...]

`init` is any encoder `evaluate` and `export` read: a training run or one of its steps (RUN@STEP), an
export, a MeFEm `.pth.tar`, `random:...`; its architecture becomes `model.*`. The data specs are
evaluate's labelled specs (a folder with labels.csv, CSV:images=..., shard folders, with filters such as
split=train,sample=500). The recipe (layer-wise lr decay, drop path, LP-FT, age-balanced sampling) is
mefem_jax/finetuning/config.py's.

Writes to W what pretraining writes (config.json, metrics.jsonl with the validation metrics as `val_*`,
TensorBoard, checkpoints/, plots/loss.png), runs in the same loop (training/loop.py: resume, SIGTERM
save with exit 3, the workdir lock, one-line errors with exit 2 for bad input), and adds:

    best/params, best/best.json   the step with the best validation `eval.select`, its metrics and the
                                  head's outputs (what `python -m mefem_jax.export --workdir=W` releases)
    test/report.json, report.md   that step scored once on data.test, with bootstrap 95 % intervals
    test/predictions.csv          each test face's label and prediction (for paired comparisons)
    start/, test/start_*          step 0 kept and scored the same way: with LP-FT, the linear probe the
                                  fine-tune started from, on the same test faces
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from mefem_jax import cli
from mefem_jax.cli import EXIT_FINISHED, EXIT_PREEMPTED
from mefem_jax.data import device_augment
from mefem_jax.finetuning import best as best_lib
from mefem_jax.finetuning import labelled_data, linear_head, report, scoring
from mefem_jax.finetuning import outputs as outputs_lib
from mefem_jax.finetuning import step as step_lib
from mefem_jax.finetuning.config import validate
from mefem_jax.training import loop, sharding
from mefem_jax.weights import encoders
from mefem_jax.weights.classifier import fold_standardisation

_FLAGS = {}  # defined only when this file runs as a program (_define_flags)


def _define_flags():
    # Not at import: tests import finetune() beside train, and absl refuses a flag (--config) defined twice.
    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/finetune.py[:cpu].", lock_config=True)
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Output folder (metrics, checkpoints, best/, test/).")
    _FLAGS["allow"] = flags.DEFINE_list(
        "allow_config_change", [], "Config keys a resume may change although that changes what its steps "
        "compute; each change is recorded in WORKDIR/config_history.jsonl.")


def finetune(config, workdir: str | Path, allow_config_change=()) -> dict:
    """Runs (or resumes) the fine-tune in `workdir`, then scores its kept step on data.test.
    Returns the last logged metrics with `best_step`, and `test` (the report rows) when data.test is set."""
    validate(config)
    loaded = encoders.load_encoder(config.init)
    with config.unlocked():  # the architecture is the encoder's; unrolled, as drop path and layer decay need.
        # How attention is computed is this run's choice, not the architecture (models/attention_impl.py).
        attention = config.model.get("attention", loaded.model_cfg.get("attention"))
        config.model = loaded.model_cfg
        config.model.update(scan_layers=False, remat=False, attention=attention)
    targets = outputs_lib.parse_fine_tune_targets(config.target)
    input_size = device_augment.input_size(config.data, config.model.image_size)
    train = labelled_data.load_split(config.data.train, input_size, "train")
    val = labelled_data.load_split(config.data.val, config.model.image_size, "val")
    outputs = outputs_lib.plan_outputs(targets, train.labels)
    outputs_lib.plan_outputs(targets, val.labels, "val")  # the same columns must be there, labelled
    task = _task(config, workdir, loaded.params, train, val, outputs)
    last = loop.run(config, workdir, task, allow_config_change)
    last["best_step"] = task.best.step
    if config.data.test and not last.get("preempted"):
        last["test"] = _score_test(config, workdir, outputs)
    return last


def _task(config, workdir, encoder_params, train, val, outputs) -> loop.Task:
    y_train = outputs_lib.encode_labels(outputs, train.labels)
    y_val = outputs_lib.encode_labels(outputs, val.labels)
    best = best_lib.Best(workdir, select=config.eval.select, outputs=outputs, config=config)
    held = {}

    def prepare(cfg):
        held["run"] = run = step_lib.prepare(cfg, outputs, start_params)
        held["predict"] = step_lib.make_predict(run.pieces)
        return run

    def start_params():
        params = jax.device_get(held["run"].pieces.model.init(jax.random.PRNGKey(config.seed),
                                                              step_lib.dummy_images(config))["params"])
        params["encoder"] = encoder_params
        if config.head.standardize != "none" or config.head.init == "probe":
            params["head"] = _start_head(config, held["run"].pieces, encoder_params, train, y_train, outputs,
                                         params["head"])
        return params

    def data(cfg, batch_size):
        return labelled_data.train_iterator(train, y_train, batch_size=batch_size, seed=cfg.seed,
                                            balance=cfg.data.balance, process_index=jax.process_index(),
                                            process_count=jax.process_count())

    def inputs(batch, run):
        return {k: sharding.global_batch(np.asarray(batch[k]), run.batch_sharding) for k in ("image", "labels")}

    def evaluate(state):
        jax.block_until_ready(state.params)  # the queued steps are not the validation's time
        t0 = time.perf_counter()
        params = _host_params(state.params)
        logits = step_lib.in_batches(held["predict"], params, val.images, int(config.eval.batch_size))
        metrics = scoring.validation_metrics(outputs, logits, y_val)
        best.consider(int(state.step), metrics, params)
        return dict({f"val_{k}": v for k, v in metrics.items()}, probe_seconds=time.perf_counter() - t0)

    task = loop.Task(prepare=prepare, data=data, fresh_state=lambda run: run.init_fn(run.rng), inputs=inputs,
                     evaluate=evaluate, eval_every=int(config.eval.every_steps), counters=best.counters,
                     restore_counters=best.restore)
    task.best = best
    return task


def _start_head(config, pieces, encoder_params, train, y_train, outputs, head: dict) -> dict:
    """The head at step 0: its input standardisation measured on the frozen encoder's features, and with
    LP-FT (head.init='probe') a linear probe fitted on them; with head.standardize='none' both are folded
    into a plain Linear.

    The features are of one augmented view per face, the views the fine-tune trains on: a probe fitted
    on whole faces alone can lean on directions that a crop moves far, and start the fine-tune with a
    loss orders of magnitude above the probe's (seen with random encoders)."""
    rows = np.arange(len(train))
    if 0 < config.head.probe_rows < len(rows):
        rows = np.sort(np.random.default_rng(config.seed).choice(rows, config.head.probe_rows, replace=False))
    features = step_lib.features(pieces, encoder_params, train.images[rows], int(config.eval.batch_size),
                                 augment=jax.random.PRNGKey(config.seed))
    stats = linear_head.input_stats(features)
    head = dict(head, **stats)
    if config.head.init == "probe":
        head.update(linear_head.fit_head(features, y_train[rows], outputs, stats, seed=config.seed))
        logging.info("head: a linear probe fitted on %d frozen feature rows (LP-FT)", len(features))
    logging.info("head input: standardised by the spread over %d faces (median std %.3g, median |mean| %.3g)",
                 len(features), float(np.median(stats["input_std"])), float(np.median(np.abs(stats["input_mean"]))))
    return fold_standardisation(head) if config.head.standardize == "none" else head


def _host_params(params):
    if jax.process_count() > 1:  # host copies of the (possibly cross-process) shards
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def _score_test(config, workdir, outputs) -> list[dict]:
    """The kept step on data.test, once, and beside it step 0 (with LP-FT the linear probe) on the same faces:
    report.json / report.md / predictions.csv under W/test."""
    test = labelled_data.load_split(config.data.test, config.model.image_size, "test")
    predict = step_lib.make_predict(step_lib.build(config, outputs))
    y_test = outputs_lib.encode_labels(outputs, test.labels)
    scored = {}
    for which in (best_lib.BEST, best_lib.START):
        if which == best_lib.START and (config.head.init != "probe" or not
                                        (best_lib.folder(workdir).with_name(which) / "best.json").is_file()):
            continue  # step 0 is worth scoring only as LP-FT's probe (and exists only if that step was kept)
        params, kept = best_lib.load(workdir, which)
        logits = step_lib.in_batches(predict, params, test.images, int(config.eval.batch_size))
        scored[which] = (kept, scoring.test_rows(outputs, logits, y_test, seed=config.seed),
                         scoring.per_face(outputs, logits, y_test, test.ids))
    if jax.process_index() == 0:
        report.write(Path(str(workdir)) / "test", config, scored, test.skipped)
    return scored[best_lib.BEST][1]


def main(argv):
    del argv
    loop.quiet_checkpoint_logs()
    if _FLAGS["workdir"].value is None:
        raise app.UsageError("--workdir is required")
    summary = finetune(_FLAGS["config"].value, _FLAGS["workdir"].value, _FLAGS["allow"].value)
    preempted = summary.pop("preempted", False)
    test = {row["target"]: row.get("metrics") for row in summary.get("test", [])}
    print(json.dumps(dict({k: summary[k] for k in ("step", "best_step") if k in summary}, test=test,
                          status="preempted" if preempted else "finished")))
    return EXIT_PREEMPTED if preempted else EXIT_FINISHED


if __name__ == "__main__":
    _define_flags()
    cli.run("finetune", main, _FLAGS["config"])
