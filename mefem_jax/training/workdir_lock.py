"""One training run per workdir: an OS advisory lock on WORKDIR/.lock, held for the process's lifetime.

Two runs writing one workdir interleave their metrics rows and race inside Orbax. `fcntl.flock` is
released by the kernel when the holder exits, however it dies, so a lock can never outlive its run;
the file itself stays and names its last holder (host, pid, start time). A file that names a holder
but is not locked is a stale lock (its run was killed): it is reported and taken over.

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


class WorkdirLockedError(RuntimeError):
    pass


class WorkdirLock:
    """`with WorkdirLock(workdir):` takes the lock or raises WorkdirLockedError naming the holder."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = str(workdir)
        self.path = None if "://" in self.workdir else Path(self.workdir) / LOCK_NAME
        self._fd = None

    def __enter__(self):
        if self.path is None:
            logging.warning("%s is not on a local filesystem: it is not locked against a second run "
                            "(the workdir lock is local-only)", self.workdir)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise WorkdirLockedError(f"{self.workdir} is in use by another run ({holder}); wait for it to "
                                     "finish or stop it, or use another --workdir") from None
        previous = os.read(fd, 4096)
        if previous.strip():  # its holder died without releasing: the kernel dropped the lock, the file stayed
            logging.warning("taking over the stale lock %s of a run that is gone (%s)", self.path,
                            _describe(previous))
        me = dict(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file is a released lock, not a stale one
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _describe(content: bytes) -> str:
    try:
        holder = json.loads(content)
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
