"""What `python -m mefem_jax.train` does when things go wrong (issue 13): a workdir lock, one-line errors
with distinct exit codes, config checks at start-up, and a run history that is never silently lost.

Subprocesses only where a real process is the point (the lock race, signals, exit codes, flag parsing);
the rest calls `train()` or the pieces in this process. The tiny run of test_resume.py, sharing the
session's XLA compilation cache.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from helpers.repo import REPO
from helpers.runs import TINY, TOTAL, Run, complete_steps, last_logged_step, logged_steps, run_config
from mefem_jax import train as train_module
from mefem_jax.config import validate_config
from mefem_jax.config_checks import ConfigError
from mefem_jax.training.checkpoint import (CheckpointSaveError, Checkpointer, IncompatibleCheckpointError,
                                           check_compatible)
from mefem_jax.training.metric_writer import MetricWriter, read_metrics
from mefem_jax.workdir_lock import WorkdirLock, WorkdirLockedError

LOG_EVERY = 5  # > 1, so a stop between log steps shows whether the summary names the saved step


def tiny_config(**overrides):
    """The config `Run` passes on the command line (with this file's LOG_EVERY), built in this process."""
    return run_config(**{"log_every": LOG_EVERY, **overrides})


def summary_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


# -- one run, raced, preempted and resumed: the lock, exit codes and counters ------------------------

@pytest.fixture(scope="module")
def raced(train_env, tmp_path_factory):
    """Two runs started together on one workdir; the survivor is SIGTERMed after step 5, then resumed."""
    base = tmp_path_factory.mktemp("raced")
    workdir = base / "run"
    racers = [Run(train_env, workdir, base / f"racer{i}.log", log_every=LOG_EVERY) for i in range(2)]
    deadline = time.monotonic() + 240
    while all(r.proc.poll() is None for r in racers):
        assert time.monotonic() < deadline, "neither racer exited"
        time.sleep(0.02)
    loser = next(r for r in racers if r.proc.poll() is not None)
    winner = next(r for r in racers if r is not loser)
    out = SimpleNamespace(workdir=workdir, loser=loser, loser_code=loser.proc.returncode,
                          winner_pid=winner.proc.pid, winner_alive=winner.proc.poll() is None)
    winner.wait_until(lambda: last_logged_step(workdir) >= LOG_EVERY, f"step {LOG_EVERY}")
    winner.kill(signal.SIGTERM)
    out.preempted_code, out.preempted = winner.wait(), winner
    out.saved = complete_steps(workdir)[-1]
    out.rows_when_preempted = logged_steps(workdir)
    out.resumed = Run(train_env, workdir, base / "resumed.log", log_every=LOG_EVERY)
    out.resumed_code = out.resumed.wait()
    return out


def test_second_run_on_a_workdir_exits_at_once_naming_the_holder(raced):  # defect 2
    assert raced.winner_alive, "the first run was stopped by the second"
    assert raced.loser_code == train_module.EXIT_FAILED, raced.loser.tail()
    last = raced.loser.text().strip().splitlines()[-1]
    assert last.startswith("train: ") and str(raced.workdir) in last, raced.loser.tail()
    # Never "holder unknown": a loser that finds the lock taken but not yet named looks again until the
    # winner has written its name (workdir_lock.py; tests/test_workdir_lock.py reproduces that gap).
    assert f"pid {raced.winner_pid} on host " in last, raced.loser.tail()
    assert "Traceback" not in raced.loser.text()
    # The history is intact: every logged step once, in order, through the preemption and the resume.
    steps = logged_steps(raced.workdir)
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL, steps
    assert raced.resumed_code == 0, raced.resumed.tail()


def test_lock_names_its_holder_and_takes_over_a_stale_one(tmp_path, caplog):  # defect 2
    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirLockedError, match=r"in use by another run \(pid \d+ on host "):
            WorkdirLock(tmp_path).__enter__()
    assert (tmp_path / ".lock").read_text() == ""  # released
    (tmp_path / ".lock").write_text('{"host": "gone", "pid": 1, "started": "then"}\n')  # a killed run's
    with caplog.at_level(logging.WARNING), WorkdirLock(tmp_path):
        pass
    assert "stale lock" in caplog.text and "pid 1 on host gone" in caplog.text


def test_sigterm_exits_3_naming_the_saved_step(raced):  # defect 9
    assert raced.preempted_code == train_module.EXIT_PREEMPTED == 3, raced.preempted.tail()
    summary = summary_line(raced.preempted.text())
    assert summary["status"] == "preempted"
    assert summary["step"] == raced.saved == raced.rows_when_preempted[-1]
    assert summary_line(raced.resumed.text()) == dict(summary_line(raced.resumed.text()), step=TOTAL,
                                                      status="finished")


def test_data_counters_continue_across_a_resume(raced):  # defect 8
    rows = read_metrics(raced.workdir / "metrics.jsonl")
    assert [r["data_decoded"] for r in rows] == [r["step"] * TINY["data.batch_size"] for r in rows]
    assert all(r["data_skipped"] == 0 for r in rows)


# -- resuming: what a run refuses instead of silently losing history -------------------------------------

def test_total_steps_below_the_resumed_step_is_refused(raced, tmp_path):  # defect 6
    workdir = tmp_path / "run"
    shutil.copytree(raced.workdir, workdir)
    with pytest.raises(ConfigError, match=rf"total_steps=10 is not allowed; allowed: >= {TOTAL}\b"):
        train_module.train(tiny_config(total_steps=10), workdir)
    with pytest.raises(ConfigError, match=r"^total_steps=-5 is not allowed; allowed: an integer >= 1$"):
        train_module.train(tiny_config(total_steps=-5), workdir)


def test_deleted_checkpoints_with_metrics_are_refused(raced, tmp_path):  # defect 5
    workdir = tmp_path / "run"
    shutil.copytree(raced.workdir, workdir)
    shutil.rmtree(workdir / "checkpoints")
    before = (workdir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds no checkpoint; restore the checkpoints, or start afresh"):
        train_module.train(tiny_config(), workdir)
    assert (workdir / "metrics.jsonl").read_text() == before


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):  # defect 4
    writer = MetricWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 0.5})
    writer.close()
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "lo')  # killed mid-write
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
        MetricWriter(tmp_path).truncate_after(2)
    assert str(path) in caplog.text and "torn last line" in caplog.text
    assert [r["step"] for r in read_metrics(path)] == [1, 2]  # repaired on disk
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')  # damage inside the file is not ours to drop
    with pytest.raises(ValueError, match=rf"{path} line 2 is not a JSON row"):
        read_metrics(path)


# -- start-up checks and one-line errors ---------------------------------------------------------------

@pytest.mark.parametrize("key, value, allowed", [
    ("loss.cls.p_target", 1.5, "a number in [0, 1]"),
    ("mask.strategy", "spiral", "one of ['multiblock', 'quadrant', 'stripes']"),
    ("mask.stripes.k", 0, "a number > 0"),
    ("optim.b2", 1.0, "a number in [0, 1)"),
    ("data.batch_size", 0, "a number > 0"),
    ("data.crop_scale", (0.5, 0.2), "a pair (a, b) with 1e-06 <= a <= b <= 1"),
    ("eval.every_steps", -1, "a number >= 0"),
    ("checkpoint.every_steps", 0, "a number > 0"),
    ("model.image_size", 100, "a multiple of model.patch_size=16"),
    ("eval.grid_size", 8, "at most the model's patch grid side, 7"),  # with the grid readout below
    ("eval.select", "age_mae", "'' or a probe metric of metrics.jsonl: probe_<target>_<metric>[_<readout>] "
                               "or rankme_<readout>"),
])
def test_config_values_are_checked_at_start_up(key, value, allowed):  # defect 7
    with pytest.raises(ConfigError) as error:
        validate_config(tiny_config(**{key: value, "eval.features": "cls,grid"}))
    assert str(error.value) == f"{key}={value!r} is not allowed; allowed: {allowed}"


def test_a_kept_step_needs_probes_and_a_column_they_log(tmp_path):
    with pytest.raises(ConfigError, match=r"^eval.every_steps=0 is not allowed; allowed: > 0 with "
                                          r"eval.select='probe_age_mae'"):
        validate_config(tiny_config(**{"eval.every_steps": 0, "eval.select": "probe_age_mae"}))
    # the default probes are of the synthetic faces' face_width and skin_tone, on CLS
    config = tiny_config(**{"eval.every_steps": 2, "eval.select": "probe_face_widht_mae"})
    with pytest.raises(ConfigError, match=r"^eval.select='probe_face_widht_mae' is not allowed; allowed: one "
                                          r"of the probe columns \['probe_face_width_mae', 'probe_face_width_r2', "):
        train_module.pretraining_task(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_incompatible_checkpoint_is_one_line(tmp_path):  # defect 14 (the refusal itself: test_resume.py)
    config = tiny_config()
    saved = json.loads(tiny_config(**{"model.width": 128, "model.depth": 3}).to_json_best_effort())
    with pytest.raises(IncompatibleCheckpointError) as error:
        check_compatible(saved, config)
    assert "\n" not in str(error.value) and "model.depth: checkpoint has 3, this run has 2" in str(error.value)


def _train_cli(workdir, *args, env=None):
    cmd = [sys.executable, "-m", "mefem_jax.train", "--config=configs/vits.py:smoke", f"--workdir={workdir}",
           *[f"--config.{k}={v}" for k, v in TINY.items()], *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, devices, message", [
    (["--config.mask.stratgy=stripes"], 1, "unknown config key 'stratgy' Did you mean \"strategy\""),
    (["--config.mask.strategy=spiral"], 1, "mask.strategy='spiral' is not allowed"),
    (["--config.data.train={tmp}/no_shards"], 1, "no such shard folder or file"),
    (["--config.data.batch_size=9"], 2, "data.batch_size=9 must be divisible by the 2 devices"),
])
def test_train_errors_are_one_line_and_leave_no_workdir(train_env, tmp_path, args, devices, message):  # 14
    env = dict(train_env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    workdir = tmp_path / "run"
    out = _train_cli(workdir, *[a.format(tmp=tmp_path) for a in args], env=env)
    assert out.returncode == train_module.EXIT_BAD_INPUT, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train: ") and message in last, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert not workdir.exists(), sorted(p.name for p in workdir.iterdir())  # nothing left behind


def test_debug_keeps_the_traceback(train_env, tmp_path):  # defect 14
    out = _train_cli(tmp_path / "run", "--config.mask.strategy=spiral", "--debug", env=train_env)
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


# -- a save that fails ---------------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs, to fill; skipped where this process may not mount one (not root, no CAP_SYS_ADMIN)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill up: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_names_the_failed_save_and_keeps_the_earlier_one(small_tmpfs):  # defect 11
    import grain
    import jax.numpy as jnp

    data = grain.MapDataset.range(8).to_iter_dataset().__iter__()
    ckpt = Checkpointer(small_tmpfs, every_steps=1)
    config = tiny_config()
    ckpt.save(1, {"w": jnp.zeros(16)}, data, config, force=True)
    ckpt.wait()
    with pytest.raises(CheckpointSaveError) as error:  # 4 MiB into 1 MiB
        ckpt.save(2, {"w": jnp.asarray(np.random.default_rng(0).standard_normal(2 ** 20, np.float32))}, data,
                  config, force=True)
        ckpt.wait()
    message = str(error.value)
    assert "\n" not in message and f"step 2 to {small_tmpfs}/checkpoints/2 failed" in message, message
    assert "No space left on device" in message, message
    with contextlib.suppress(CheckpointSaveError):
        ckpt.close()
    assert Checkpointer(small_tmpfs, every_steps=1).steps() == [1]
