"""The commands run as a user runs them: `python -m mefem_jax.X` subprocesses from the repository root.

`Run` is one training process of the tests' tiny model (TINY: width 64, depth 2, batch 8, 20 steps, a
checkpoint every 4), which tests kill or signal as a preemptible machine does; `reference_run` is the
session's one uninterrupted run they are compared against. Runs share the session's persistent XLA
compilation cache (conftest.py), so only the first run of a configuration compiles.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.repo import REPO
from helpers.tiny_configs import TINY_RUN, tiny_config

# 20 steps: test_train_entry.py's run compiles to the same step (only constants such as the schedule
# length enter the compiled code), so the session compiles it once.
TOTAL, EVERY = 20, 4
TINY = {
    **TINY_RUN, "total_steps": TOTAL, "checkpoint.every_steps": EVERY, "log_every": 1,
    # Crops and flips drawn inside the step from its own key: the resume must replay them too.
    "data.augment_on": "device",
}
RUN_TIMEOUT_S = 300


# -- running the entry point ---------------------------------------------------------------------

def subprocess_env() -> dict:
    """The environment of entry-point subprocesses: CPU, and the session's XLA compilation cache
    (conftest.py sets JAX_COMPILATION_CACHE_DIR), so only a configuration's first run compiles."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


_started: list[subprocess.Popen] = []


def stop_started_runs() -> None:
    """Kills what a failed test left running (tests/end_to_end/conftest.py calls it after each test)."""
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Run:
    """One `python -m mefem_jax.train` process; its stdout and stderr go to `log`. Overrides are
    config keys with `__` for `.` (optim__lr=1e30 is --config.optim.lr=1e30)."""

    def __init__(self, env: dict, workdir: Path, log: Path, **overrides):
        config = dict(TINY, **{k.replace("__", "."): v for k, v in overrides.items()})
        self.workdir, self.log = workdir, log
        cmd = [sys.executable, "-m", "mefem_jax.train", "--config=configs/vits.py:smoke", f"--workdir={workdir}"]
        cmd += [f"--config.{k}={v}" for k, v in config.items()]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _started.append(self.proc)

    def wait(self) -> int:
        return self.proc.wait(timeout=RUN_TIMEOUT_S)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return self.text()[-n:]

    def wait_until(self, condition, what: str, timeout: float = 240.0) -> None:
        """Polls `condition()` (cheap file checks) until true; fails if the run exits first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run exited (code {self.proc.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.005)

    def kill(self, sig=signal.SIGKILL) -> None:
        assert self.proc.poll() is None, f"the run had already exited:\n{self.tail()}"
        self.proc.send_signal(sig)


def run(env, workdir: Path, name: str, **overrides) -> Run:
    """Runs to the end; returns the finished Run (check `proc.returncode`)."""
    r = Run(env, workdir, workdir.parent / f"{name}.log", **overrides)
    r.wait()
    return r


def last_logged_step(workdir: Path) -> int:
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    complete = [line for line in lines if line.endswith("}")]  # a line being written may be partial
    return json.loads(complete[-1])["step"] if complete else 0


def logged_steps(workdir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def complete_steps(workdir: Path) -> list[int]:
    """Committed checkpoints: Orbax writes into `<step>.orbax-checkpoint-tmp*` and renames when done."""
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def saves_in_flight(workdir: Path) -> list[str]:
    folder = workdir / "checkpoints"
    return sorted(p.name for p in folder.glob("*.orbax-checkpoint-tmp*")) if folder.is_dir() else []


def in_flight(step: int, workdir: Path) -> bool:
    return any(name.startswith(f"{step}.") for name in saves_in_flight(workdir))


def resumed_from(log_text: str) -> int | None:
    steps = re.findall(r"resumed from step (\d+)", log_text)
    return int(steps[-1]) if steps else None


def reference_run(env: dict, tmp_path_factory, name: str = "tiny_reference", **overrides) -> Path:
    """One uninterrupted run of TOTAL steps, made once per session and `name` (test_export_cli.py reads the
    default one too); `overrides` as for `Run` (another name for other overrides). Tests never write into
    it: they copy it first."""
    workdir = tmp_path_factory.getbasetemp() / name / "run"
    finished = workdir.parent / "finished"
    if not finished.exists():
        workdir.parent.mkdir(exist_ok=True)
        r = run(env, workdir, "reference", **overrides)
        assert r.proc.returncode == 0, r.tail()
        assert logged_steps(workdir) == list(range(1, TOTAL + 1))
        assert complete_steps(workdir) == [12, 16, 20]
        finished.touch()
    return workdir


@pytest.fixture(scope="module")
def reference(train_env, tmp_path_factory) -> Path:
    """What every interrupted run must reproduce."""
    return reference_run(train_env, tmp_path_factory)


def run_config(**overrides):
    """The config a `Run` passes on its command line, built in this process (dotted `overrides`)."""
    return tiny_config(**{**TINY, **overrides})


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` from the repository root, on the CPU, to the end."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def assert_refused(done: subprocess.CompletedProcess, *words: str) -> None:
    """Non-zero exit, no traceback, and the reason on one line holding every word."""
    assert done.returncode != 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if all(w in line for w in words)]
    assert len(lines) == 1, done.stderr[-2000:]
