"""One process per folder (a training run's workdir, a shard build's --out): an OS advisory lock on
FOLDER/.lock, held for the process's lifetime. It sits with the core because both wings use it.

Two runs writing one workdir interleave their metrics rows and race inside Orbax. `fcntl.flock` is
released by the kernel when the holder exits, however it dies, so a lock can never outlive its run;
the file itself stays and names its last holder (host, pid, start time). A file that names a holder
but is not locked is a stale lock (its run was killed): it is reported and taken over. The shard
builder locks its --out folder with the same class (`what`, `flag`, `lock_name`).

A holder takes the lock first and writes its name second: it cannot write before it owns the file.
Between the two a second run finds the file locked but empty (or half written). It then looks again
every few milliseconds, retrying the lock each time, until the file names a holder: a holder killed
in that gap (kill -9) has released the lock with it, and the retry takes the lock over; one that is
releasing (it empties the file, then unlocks) is taken over the same way. Only a holder stuck in
that gap for HOLDER_WAIT_S is reported as unknown. (Writing the name into a temporary file renamed
over .lock would not close the gap: flock locks an inode, not a path, so a run holding the replaced
inode would keep "its" lock while the next run locks the new file, and two runs would hold the lock.)

Object stores (gs://) have no such lock, so there the lock is local-only: a log line says that the
workdir is not protected against a second run.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from absl import logging

LOCK_NAME = ".lock"
# How long a second run waits for a holder that has the lock but has not written its name yet (the
# gap is two system calls, so only a stopped or badly starved holder can take this long).
HOLDER_WAIT_S = 10.0
_LOOK_AGAIN_S = 0.005


class WorkdirLockedError(RuntimeError):
    pass


class WorkdirLock:
    """`with WorkdirLock(workdir):` takes the lock or raises WorkdirLockedError naming the holder.

    `what` and `flag` name the holder's kind and the option that picks another folder in messages;
    `lock_name` is the lock file's path inside the folder."""

    def __init__(self, workdir: str | os.PathLike, *, what: str = "run", flag: str = "--workdir",
                 lock_name: str = LOCK_NAME):
        self.workdir = str(workdir)
        self.what, self.flag = what, flag
        self.path = None if "://" in self.workdir else Path(self.workdir) / lock_name
        self._fd = None

    def __enter__(self):
        if self.path is None:
            logging.warning("%s is not on a local filesystem: it is not locked against a second %s "
                            "(the lock is local-only)", self.workdir, self.what)
            return self
        # Composed before the lock is taken, so that the gap between lock and name is as short as can be.
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode() + b"\n"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = self._take(fd)
        except BaseException:
            os.close(fd)
            raise
        if previous.strip():  # its holder died without releasing: the kernel dropped the lock, the file stayed
            logging.warning("taking over the stale lock %s of a %s that is gone (%s)", self.path, self.what,
                            _describe(previous) or "holder unknown")
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        self._fd = fd
        return self

    def _take(self, fd: int) -> bytes:
        """Locks `fd`; returns what the file held before. Raises WorkdirLockedError naming the holder."""
        deadline = time.monotonic() + HOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read_holder(fd))
            else:
                return _read_holder(fd)
            if holder is None and time.monotonic() < deadline:
                time.sleep(_LOOK_AGAIN_S)  # locked, not named yet: the holder is between flock and write
                continue
            holder = holder or f"holder unknown: it has held the lock for {HOLDER_WAIT_S:g}s without naming itself"
            raise WorkdirLockedError(f"{self.workdir} is in use by another {self.what} ({holder}); wait for it "
                                     f"to finish or stop it, or use another {self.flag}")

    def fileno(self) -> int | None:
        """The locked file descriptor (None when not locked). Every process that inherits it holds the lock
        with this one: flock belongs to the open file, which the kernel closes after its last holder."""
        return self._fd

    def __exit__(self, *exc):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file is a released lock, not a stale one
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _read_holder(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)  # at offset 0 on every look: a plain read would move on past the name


def _describe(content: bytes) -> str | None:
    """"pid P on host H, started T" from a lock file's content; None if it names no holder (yet)."""
    try:
        holder = json.loads(content)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return None
