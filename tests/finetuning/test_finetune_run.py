"""`python -m mefem_jax.finetune` on real faces: the `:cpu` recipe through the entry point, a resume that
computes what an uninterrupted run computed, and a bad target column refused in one line with exit 2."""
from __future__ import annotations

import json
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from helpers.faces import IMAGES, utkface_rows, write_labels
from helpers.runs import assert_refused, run_module
from helpers.tiny_configs import TINY_SPEC
from mefem_jax.finetuning import best as best_lib
from mefem_jax.training.metric_writer import read_metrics

TARGETS = "age:regression,gender:classification"


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    rows = utkface_rows(48)
    for i, row in enumerate(rows):  # 32 train, 8 val, 8 test, interleaved over all ages
        row["split"] = ("train", "train", "train", "train", "val", "test")[i % 6]
    return write_labels(tmp_path_factory.mktemp("labels") / "labels.csv", rows)


def _spec(labels, split):
    return f"{labels}:images={IMAGES},split={split}"


def _overrides(labels, **more):
    # head.init=probe: the LP-FT path (features of augmented views, the fitted head) is the one with more to test
    return {"init": TINY_SPEC, "target": TARGETS, "head.init": "probe", "data.train": _spec(labels, "train"),
            "data.val": _spec(labels, "val"), "data.test": _spec(labels, "test"), "total_steps": 4,
            "data.batch_size": 8, "eval.every_steps": 2, "eval.batch_size": 8, "checkpoint.every_steps": 2,
            "log_every": 1, **more}


def _config(labels, **more):
    from configs import finetune

    config = finetune.get_config("cpu")
    config.unlock()
    config.update_from_flattened_dict(_overrides(labels, **more))
    return config


def _saved_params(workdir, step):
    with ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True)) as m:
        return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]


BALANCED = {"data.balance": "age:20"}


@pytest.fixture(scope="module")
def cpu_run(labels, tmp_path_factory):
    """The `:cpu` recipe through the entry point (age-balanced sampling on), 4 steps."""
    workdir = tmp_path_factory.mktemp("finetune") / "run"
    flags = [f"--config.{k}={v}" for k, v in _overrides(labels, **BALANCED).items()]
    done = run_module("mefem_jax.finetune", "--config=configs/finetune.py:cpu", f"--workdir={workdir}", *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, json.loads(done.stdout.strip().splitlines()[-1])


def test_the_cpu_recipe_through_the_entry_point(cpu_run):
    workdir, summary = cpu_run
    assert summary["status"] == "finished" and summary["step"] == 4
    assert set(summary["test"]) == {"age", "gender"}
    kept = json.loads((workdir / "best" / "best.json").read_text())
    assert kept["step"] == summary["best_step"] in (0, 2, 4)
    assert [o["name"] for o in kept["outputs"]] == ["age", "gender"]
    report = json.loads((workdir / "test" / "report.json").read_text())
    assert {r["target"]: r["n_test"] for r in report["rows"]} == {"age": 8, "gender": 8}
    assert all("intervals" in r for r in report["rows"])
    assert (workdir / "test" / "predictions.csv").read_text().count("\n") == 9  # header + 8 faces
    # step 0, the linear probe LP-FT starts from, kept and scored on the same faces
    assert json.loads((workdir / "start" / "best.json").read_text())["step"] == 0
    assert [r["target"] for r in report["start_rows"]] == ["age", "gender"]
    assert (workdir / "test" / "start_predictions.csv").read_text().count("\n") == 9
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]
    # head.standardize='batch' (the default): the head's input statistics, measured before step 0, then
    # tracked by the steps
    start, end = best_lib.load(workdir, best_lib.START)[0]["head"], _saved_params(workdir, 4)["head"]
    assert np.all(np.asarray(start["input_std"]) > 0) and np.any(np.asarray(start["input_mean"]) != 0)
    for key in ("input_mean", "input_std", "kernel"):
        assert np.all(np.isfinite(end[key])) and np.any(np.asarray(end[key]) != np.asarray(start[key])), key


def test_a_resumed_fine_tune_computes_what_an_uninterrupted_one_did(cpu_run, labels, tmp_path):
    from mefem_jax.finetune import finetune

    straight, _ = cpu_run
    # The same run stopped after its step-2 save: its step-4 checkpoint never happened.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    assert finetune(_config(labels, **BALANCED), resumed)["step"] == 4
    a, b = (traverse_util.flatten_dict(_saved_params(w, 4)) for w in (straight, resumed))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=str(key))
    rows_a, rows_b = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [0, 1, 2, 3, 4]
    drop = ("img_per_sec", "compile_s", "ckpt_stall_s", "probe_seconds")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows_a] == \
           [{k: v for k, v in r.items() if k not in drop} for r in rows_b]
    assert (json.loads((straight / "best" / "best.json").read_text())
            == json.loads((resumed / "best" / "best.json").read_text()))


def test_a_missing_target_column_is_one_line_and_exit_2(labels, tmp_path):
    flags = [f"--config.{k}={v}" for k, v in _overrides(labels, target="bmi:regression").items()]
    done = run_module("mefem_jax.finetune", "--config=configs/finetune.py:cpu", f"--workdir={tmp_path / 'run'}",
                      *flags)
    assert done.returncode == 2
    assert_refused(done, "finetune:", "target column 'bmi' is not in the train data")
    assert not (tmp_path / "run").exists()  # refused before the workdir was made
