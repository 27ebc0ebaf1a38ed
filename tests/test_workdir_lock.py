"""The workdir lock's gap between a winner's flock and the write of its name (issue 25, item 13).

A second run that looks inside that gap found the file locked and empty and reported "holder unknown"
(once in a full test run). The gap is reproduced here without timing: the test itself (or a child
process) holds the flock on an empty lock file, exactly the winner's state in the gap, and lets the
winner go on only once the contender has looked. Every wait has a timeout.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import threading

import pytest

from mefem_jax import workdir_lock
from mefem_jax.workdir_lock import WorkdirLock, WorkdirLockedError

TIMEOUT_S = 20.0
WINNER = {"host": "winner", "pid": 4242, "started": "then"}


class Contender(threading.Thread):
    """`WorkdirLock(workdir).__enter__()` in a thread: `lock` or `error` once done. `looked` is set once it
    has read the lock file while it named nobody (or once it is done, whichever comes first)."""

    def __init__(self, workdir, monkeypatch):
        super().__init__(daemon=True)  # daemon: a contender stuck by a bug cannot hang the session
        self.workdir, self.lock, self.error = workdir, None, None
        self.looked = threading.Event()
        real = getattr(workdir_lock, "_read_holder", None)

        def read_and_tell(fd):
            content = real(fd)
            if threading.current_thread() is self and not content.strip():
                self.looked.set()
            return content

        monkeypatch.setattr(workdir_lock, "_read_holder", read_and_tell, raising=False)

    def run(self):
        try:
            self.lock = WorkdirLock(self.workdir).__enter__()
        except BaseException as err:  # noqa: BLE001 - handed to the test thread, which asserts on it
            self.error = err
        finally:
            self.looked.set()

    def finish(self):
        self.join(TIMEOUT_S)
        assert not self.is_alive(), "the contender is still waiting for the lock"
        return self


def hold_unnamed(path) -> int:
    """A winner between its flock and the write of its name: the lock file locked and empty."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_second_run_in_the_gap_waits_for_the_holder_to_name_itself(tmp_path, monkeypatch):
    fd = hold_unnamed(tmp_path / ".lock")
    try:
        contender = Contender(tmp_path, monkeypatch)
        contender.start()
        assert contender.looked.wait(TIMEOUT_S)  # it found the lock taken and the file empty
        os.pwrite(fd, json.dumps(WINNER).encode() + b"\n", 0)  # the winner goes on and names itself
        contender.finish()
    finally:
        os.close(fd)
    assert isinstance(contender.error, WorkdirLockedError), contender.error
    assert "in use by another run (pid 4242 on host winner, started then)" in str(contender.error)


def test_a_holder_killed_in_the_gap_is_taken_over(tmp_path, monkeypatch):
    """kill -9 between flock and write: the kernel releases the lock, the file stays empty; the second run
    takes the lock instead of failing on a holder that no longer exists."""
    holds_unnamed = (f"import fcntl, os, time\n"
                     f"fd = os.open({str(tmp_path / '.lock')!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
                     "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                     "print('locked', flush=True)\n"
                     "time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", holds_unnamed], stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([holder.stdout], [], [], TIMEOUT_S)[0], "the holder never took the lock"
        assert holder.stdout.readline() == "locked\n"
        contender = Contender(tmp_path, monkeypatch)
        contender.start()
        assert contender.looked.wait(TIMEOUT_S)
        holder.send_signal(signal.SIGKILL)
        holder.wait(TIMEOUT_S)
        contender.finish()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(TIMEOUT_S)
    assert contender.error is None, contender.error
    try:
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    finally:
        contender.lock.__exit__(None, None, None)
    assert (tmp_path / ".lock").read_text() == ""


def test_a_holder_that_never_names_itself_is_reported_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HOLDER_WAIT_S", 0.05)
    fd = hold_unnamed(tmp_path / ".lock")
    try:
        with pytest.raises(WorkdirLockedError, match=r"holder unknown: it has held the lock for 0\.05s"):
            WorkdirLock(tmp_path).__enter__()
    finally:
        os.close(fd)


def test_a_lock_names_its_kind_and_option(tmp_path):
    refusal = rf"^{tmp_path} is in use by another build \(pid {os.getpid()} on host .*, or use another --out$"
    with WorkdirLock(tmp_path, what="build", flag="--out", lock_name="sub.lock"), \
            pytest.raises(WorkdirLockedError, match=refusal):
        WorkdirLock(tmp_path, what="build", flag="--out", lock_name="sub.lock").__enter__()
