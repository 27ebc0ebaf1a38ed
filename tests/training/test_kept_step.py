"""The kept step (training/kept_step.py): which direction is better, what is written, what a resume keeps."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from helpers.repo import REPO
from mefem_jax.training import kept_step
from mefem_jax.training.kept_step import KeptStep


@pytest.mark.parametrize("name, lower", [
    ("probe_age_mae", True), ("probe_age_mae_grid", True), ("probe_age_rmse_mean", True), ("loss", True),
    ("age_mae", True), ("gender_loss", True),
    ("probe_gender_acc", False), ("probe_gender_acc_grid", False), ("probe_age_r2", False),
    ("rankme_cls", False), ("gender_roc_auc", False),
    # a target whose own name ends like a lower-is-better metric is read by its metric, not its name
    ("probe_weight_loss_acc", False),
])
def test_the_direction_of_each_metric(name, lower):
    assert kept_step.lower_is_better(name) is lower


def test_kept_on_improvement_only_and_read_back(tmp_path):
    kept = KeptStep(tmp_path, "selected", "probe_age_mae", lambda step, m: {"kind": "pretraining"})
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    assert kept.consider(0, {"probe_age_mae": 13.2, "rankme_cls": 9.0}, params)
    assert kept.consider(2, {"probe_age_mae": 12.8}, {"w": params["w"] + 1})
    assert not kept.consider(4, {"probe_age_mae": 12.9}, {"w": params["w"] + 2})
    assert not kept.consider(6, {"probe_age_mae": float("nan")}, {"w": params["w"] + 3})
    read, record = kept_step.read(tmp_path / "selected", "selected")
    np.testing.assert_array_equal(read["w"], params["w"] + 1)
    assert record == {"step": 2, "select": "probe_age_mae", "val": {"probe_age_mae": 12.8}, "kind": "pretraining"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selected"]  # no .new / .old left behind
    assert kept.counters() == {"selected_step": 2, "selected_value": 12.8, "selected_select": "probe_age_mae"}
    with pytest.raises(ValueError, match="eval.select='probe_age_mae' is not a validation metric"):
        kept.consider(8, {"probe_gender_acc": 0.7}, params)


def test_a_resume_compares_with_the_checkpoints_kept_value_of_the_same_metric(tmp_path):
    saved = {"selected_step": 2, "selected_value": 12.8, "selected_select": "probe_age_mae"}
    same = KeptStep(tmp_path, "selected", "probe_age_mae")
    same.restore(saved)
    assert not same.consider(4, {"probe_age_mae": 12.9}, {"w": np.zeros(2)})
    assert not (tmp_path / "selected").exists()
    other = KeptStep(tmp_path, "selected", "probe_gender_acc")  # eval.select changed on resume
    other.restore(saved)
    assert other.consider(4, {"probe_gender_acc": 0.6}, {"w": np.zeros(2)})
    assert json.loads((tmp_path / "selected" / "selected.json").read_text())["step"] == 4
    older = KeptStep(tmp_path, "best", "loss")  # counters written before the metric's name was kept
    older.restore({"best_step": 3, "best_value": 0.5})
    assert (older.step, older.value) == (3, 0.5)


_WORKER = """
import sys
import jax
jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
import numpy as np
from mefem_jax.training.kept_step import KeptStep
KeptStep(sys.argv[3], "selected", "probe_age_mae").consider(3, {"probe_age_mae": 1.0}, {"w": np.ones(4)})
jax.distributed.shutdown()
"""


def test_in_a_two_process_run_process_0_writes_alone(tmp_path):
    """Every process considers the step and only process 0 writes; Orbax's default checkpointer would
    wait at a barrier for the others, which never save: with it, this test fails after ~30 s."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(i), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    params, record = kept_step.read(tmp_path / "selected", "selected")
    assert record["step"] == 3 and params["w"].tolist() == [1.0] * 4
