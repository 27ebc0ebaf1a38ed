"""Checkpoints, resume and preemption, through the real entry point (`python -m mefem_jax.train`).

Every run is a subprocess on a tiny model (width 64, depth 2, batch 8, 20 steps, a checkpoint every
4), killed or signalled the way a preemptible machine is. The yardstick is one uninterrupted
reference run: whatever happens to a run, re-running the same command must end on exactly (bit for
bit) the reference's train state and data-iterator position, with a metrics.jsonl that has every
step once.

Runs share the test session's persistent XLA compilation cache, so only the first run of each
configuration compiles; the rest start in seconds (most of which is imports).
"""
from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from mefem_jax.training.checkpoint import load_params_for_eval
from mefem_jax.training.train_step import build, init_state
from mefem_jax.weights.release import export_folder
from helpers.runs import (TOTAL, complete_steps, in_flight, logged_steps, reference_run, resumed_from,
                          run, Run, saves_in_flight, last_logged_step)
from helpers.saved_runs import assert_matches_reference, saved_state


@pytest.fixture(scope="module")
def reference(train_env, tmp_path_factory) -> Path:
    """What every interrupted run must reproduce."""
    return reference_run(train_env, tmp_path_factory)


def copy_run(reference: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    return workdir


# -- tests ---------------------------------------------------------------------------------------------

# When to pull the plug: (what is awaited, condition on the workdir). The step-8 save is one
# interval after the step-4 one, so a run killed in it resumes from a real restore.
KILL_MOMENTS = {
    "early": ("step 3", lambda workdir: last_logged_step(workdir) >= 3),
    "mid_save": ("the step-8 save in flight", lambda workdir: in_flight(8, workdir)),
    "after_save": ("the step-8 checkpoint committed", lambda workdir: 8 in complete_steps(workdir)),
}


@pytest.mark.parametrize("moments", [
    pytest.param(("mid_save",), id="1_kill"),  # the riskiest moment; resumes through a real restore
    pytest.param(("early", "mid_save", "after_save"), id="3_kills", marks=pytest.mark.slow),
])
def test_sigkill_then_rerun_is_bit_exact(train_env, reference, tmp_path, moments):
    """kill -9 at each moment in turn, re-running the same command after each; every rerun must
    resume from the newest *complete* checkpoint, and the last one finish exactly as the reference."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    newest = None  # the step the next run must resume from (None: starts afresh)
    for moment in moments:
        what, condition = KILL_MOMENTS[moment]
        r = Run(train_env, workdir, tmp_path / f"killed_{moment}.log")
        r.wait_until(lambda: condition(workdir), what)
        r.kill()
        r.wait()
        assert resumed_from(r.text()) == newest, r.tail()
        if moment == "mid_save":
            assert in_flight(8, workdir), "the kill missed the save: its temporary folder is gone"
            assert 8 not in complete_steps(workdir)
        complete = complete_steps(workdir)
        newest = complete[-1] if complete else None

    r = Run(train_env, workdir, tmp_path / "finished.log")
    assert r.wait() == 0, r.tail()
    assert resumed_from(r.text()) == newest, r.tail()
    assert not saves_in_flight(workdir), "the interrupted saves' temporary folders are left over"
    assert logged_steps(workdir) == list(range(1, TOTAL + 1))
    assert_matches_reference(workdir, reference)


def terminate_after(train_env, workdir: Path, step: int, log: Path) -> int:
    """Starts a run, sends SIGTERM once `step` is logged; returns the step it saved and stopped at."""
    workdir.mkdir()
    r = Run(train_env, workdir, log)
    r.wait_until(lambda: last_logged_step(workdir) >= step, f"step {step}")
    r.kill(signal.SIGTERM)
    assert r.wait() == 3, r.tail()  # "preempted, saved" (was 0, which a scheduler reads as finished)
    text = r.text()
    assert "received signal 15" in text, r.tail()
    return int(re.search(r"preempted: saved step (\d+)", text).group(1))


def test_sigterm_saves_the_current_step_and_exits_cleanly(train_env, tmp_path):
    workdir = tmp_path / "run"
    saved = terminate_after(train_env, workdir, 6, tmp_path / "terminated.log")
    assert 6 <= saved < TOTAL
    assert complete_steps(workdir)[-1] == saved  # committed before the process exited
    assert not saves_in_flight(workdir)
    assert int(saved_state(workdir, saved)["step"]) == saved
    assert logged_steps(workdir) == list(range(1, saved + 1))


@pytest.mark.slow
def test_resume_after_sigterm_is_bit_exact(train_env, reference, tmp_path):
    workdir = tmp_path / "run"
    saved = terminate_after(train_env, workdir, 6, tmp_path / "terminated.log")
    r = run(train_env, workdir, "resumed")
    assert r.proc.returncode == 0, r.tail()
    assert resumed_from(r.text()) == saved
    assert logged_steps(workdir) == list(range(1, TOTAL + 1))
    assert_matches_reference(workdir, reference)


def test_unreadable_newest_checkpoints_fall_back_to_a_complete_one(train_env, reference, tmp_path):
    workdir = copy_run(reference, tmp_path)
    assert complete_steps(workdir) == [12, 16, 20]
    # Truncate step 20 (its largest array file is gone) and delete step 16's train state.
    files = [p for p in (workdir / "checkpoints" / "20" / "state").rglob("*") if p.is_file()]
    max(files, key=lambda p: p.stat().st_size).unlink()
    shutil.rmtree(workdir / "checkpoints" / "16" / "state")

    r = run(train_env, workdir, "fallback")
    assert r.proc.returncode == 0, r.tail()
    text = r.text()
    for step in (20, 16):
        assert f"checkpoint at step {step} in" in text and "cannot be restored" in text, r.tail()
    assert resumed_from(text) == 12
    # The broken steps are kept for inspection, out of the way of the re-saved ones.
    assert sorted(p.name for p in (workdir / "checkpoints_unreadable").iterdir()) == ["16", "20"]
    assert logged_steps(workdir) == list(range(1, TOTAL + 1))
    assert_matches_reference(workdir, reference)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(train_env, reference, tmp_path):
    workdir = copy_run(reference, tmp_path)
    for step in complete_steps(workdir):
        shutil.rmtree(workdir / "checkpoints" / str(step) / "state")
    metrics = (workdir / "metrics.jsonl").read_text()

    r = run(train_env, workdir, "all_unreadable")
    assert r.proc.returncode != 0
    assert "none of the checkpoints" in r.text() and "[12, 16, 20]" in r.text(), r.tail()
    assert complete_steps(workdir) == [12, 16, 20]
    assert (workdir / "metrics.jsonl").read_text() == metrics  # a fresh start would have cut it to nothing


def test_changed_model_width_is_refused_and_changed_log_every_accepted(train_env, reference, tmp_path):
    workdir = copy_run(reference, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "20")  # so the accepted run has steps left to do

    r = run(train_env, workdir, "wider", model__width=128)
    assert r.proc.returncode != 0
    assert "model.width: checkpoint has 64, this run has 128" in r.text(), r.tail()
    assert complete_steps(workdir) == [12, 16]  # nothing was written over

    r = run(train_env, workdir, "log_every_2", log_every=2)
    assert r.proc.returncode == 0, r.tail()
    assert resumed_from(r.text()) == 16
    assert logged_steps(workdir) == list(range(1, 17)) + [18, 20]
    assert_matches_reference(workdir, reference)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(train_env, tmp_path):
    workdir = tmp_path / "run"
    # A learning rate of 1e30, reached in the second step of warm-up, blows the parameters up. Every
    # step is a checkpoint step, so the first bad state is always the next one to be saved.
    r = run(train_env, workdir, "diverging", optim__lr=1e30, checkpoint__every_steps=1)
    assert r.proc.returncode != 0
    text = r.text()
    found = re.search(r"train: (\w+) is (\S+) at step (\d+)", text)  # one line, no traceback
    assert found, r.tail()
    bad = int(found.group(3))
    assert bad < TOTAL
    good = complete_steps(workdir)
    assert good and good[-1] == bad - 1, (good, bad)
    assert logged_steps(workdir)[-1] == bad - 1
    state = saved_state(workdir, bad - 1)
    for tree in (state["params"], state["target_params"]):
        largest = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(tree))
        assert largest < 100, f"the last checkpoint (step {bad - 1}) already holds blown-up parameters"
    params, _, step = load_params_for_eval(workdir, "target")
    assert step == bad - 1 and all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_init_from_an_exported_encoder(train_env, reference, tmp_path):
    exported, config, _ = load_params_for_eval(reference, "target")
    folder = export_folder(exported, ml_collections.ConfigDict(config["model"]), tmp_path / "exported")
    workdir = tmp_path / "run"
    # Same compiled step as the reference. Another seed, so that the fresh parameters of this run are
    # far from the exported ones (the reference's barely left its seed-0 init in 20 steps). Every
    # checkpoint is kept, so step 1 (which Orbax's default policy saves as a run's first) is still there.
    r = run(train_env, workdir, "init_from", init_from=folder, seed=1, checkpoint__max_to_keep=20)
    assert r.proc.returncode == 0, r.tail()
    assert 1 in complete_steps(workdir)
    state = saved_state(workdir, 1)

    # The step-1 checkpoint is one AdamW update away from the step-0 state, and the first update
    # moves each parameter by at most lr * (1 + wd * |p|): |m_hat / sqrt(v_hat)| is 1 at step 0.
    # (The EMA target moves less.) A different start is ~0.02 (the init std) away almost everywhere.
    first = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1

    def assert_one_step_from(actual, start, what):
        for path, a in jax.tree_util.tree_flatten_with_path(actual)[0]:
            s = np.asarray(_at(start, path))
            bound = first["lr"] * (1 + first["wd"] * np.abs(s)) * (1 + 1e-5) + 1e-7
            worst = float((np.abs(a - s) - bound).max())
            assert worst <= 0, f"{what}{jax.tree_util.keystr(path)} moved {worst:.3g} beyond one step"

    assert_one_step_from(state["params"]["encoder"], exported, "context encoder")
    assert_one_step_from(state["target_params"], exported, "target encoder")
    # The predictor starts as the fresh one of a run without init_from (same seed).
    run_config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    fresh = jax.jit(lambda key: init_state(build(run_config), key))(jax.random.PRNGKey(run_config.seed))
    assert_one_step_from(state["params"]["predictor"], fresh.params["predictor"], "predictor")
    # The bound tells starts apart: this run's own fresh encoder is far outside it.
    with pytest.raises(AssertionError, match="moved"):
        assert_one_step_from(state["params"]["encoder"], fresh.params["encoder"], "fresh encoder")


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree
