"""kill -9 of `python -m mefem_jax.data.build_shards` mid-build (issue 25, item 14).

Its worker processes ran on after the builder died, and a rerun deleted the temporary files they were
still writing. Now the workers die with the builder, and a rerun never starts beside the leftovers of
another build: the builder and its workers share one flock on the out folder. Real UTKFace faces, read
in place; every wait has a timeout, and any worker a failing test leaves behind is killed by its pid.
"""
from __future__ import annotations

import glob
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.faces import UTKFACE, utkface_rows, write_labels

from helpers.repo import REPO
from mefem_jax import workdir_lock
from mefem_jax.data import manifest as manifest_lib
from mefem_jax.data.shards import build as build_shards
from mefem_jax.data.shards import writer
from mefem_jax.workdir_lock import WorkdirLockedError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes from /proc")

IMAGES = os.path.join(UTKFACE, "images")
FACES, SHARDS, WORKERS = 240, 6, 3
TIMEOUT_S = 60.0


def alive(pid: int) -> bool:
    """Not gone and not a zombie (an orphan's zombie may wait forever for a reaper in a container; it has
    closed its files, its locks included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> set[int]:
    found = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone since the listing
        if ppid == pid:
            found.add(int(stat.split("/")[2]))
    return found


def wait_for(condition, what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


def kill_survivors(pids) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def options(labels: str, out: Path, workers: int = WORKERS) -> build_shards.BuildOptions:
    return build_shards.BuildOptions(images=IMAGES, labels=labels, out=str(out), num_shards=SHARDS,
                                     workers=workers)


def finished(out: Path) -> set[str]:
    """The shards and status files under `out`: what a worker writes when it completes a shard."""
    return {str(p.relative_to(out)) for p in out.rglob("*") if ".tmp." not in p.name and p.name != ".lock"}


def start_builder(labels: str, out: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mefem_jax.data.build_shards", f"--images={IMAGES}", f"--labels={labels}",
           f"--out={out}", f"--num_shards={SHARDS}", f"--workers={WORKERS}"]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def test_a_killed_build_takes_its_workers_along_and_a_rerun_matches_a_clean_build(tmp_path):
    labels = write_labels(str(tmp_path / "labels.csv"), utkface_rows(FACES))
    out, log = tmp_path / "killed", tmp_path / "builder.log"
    builder, workers = start_builder(labels, out, log), set()
    try:
        wait_for(lambda: glob.glob(str(out / "*.tmp.*")) or builder.poll() is not None, "a worker's first shard")
        assert builder.poll() is None, f"the build ended before it could be killed:\n{log.read_text()}"
        workers = children(builder.pid)  # the pool starts all its workers before it hands out work
        assert len(workers) >= WORKERS, workers
        builder.send_signal(signal.SIGKILL)
        builder.wait(TIMEOUT_S)
        # The kernel signals the workers before the builder can be waited for; from here on they run no code.
        when_killed = finished(out)
        wait_for(lambda: not any(map(alive, workers)), f"the workers {sorted(workers)} to die with the builder",
                 timeout=10)
        # Left alone, they would finish the shards they had (and those queued) beside the rerun.
        assert finished(out) == when_killed
    finally:
        if builder.poll() is None:
            builder.kill()
            builder.wait(TIMEOUT_S)
        kill_survivors(workers)
    assert not os.path.exists(out / manifest_lib.MANIFEST_NAME)

    rerun = start_builder(labels, out, tmp_path / "rerun.log")
    assert rerun.wait(TIMEOUT_S) == 0, (tmp_path / "rerun.log").read_text()
    clean = build_shards.build(options(labels, tmp_path / "clean", workers=1))
    assert manifest_lib.read_manifest(str(out)) == clean
    shards = [s["file"] for s in clean["shards"]]
    assert sorted(os.listdir(out)) == sorted([manifest_lib.MANIFEST_NAME, *shards])  # no leftovers
    for shard in shards:
        assert (out / shard).read_bytes() == (tmp_path / "clean" / shard).read_bytes(), shard


def test_a_folder_another_build_holds_is_refused_and_left_alone(tmp_path):
    labels = write_labels(str(tmp_path / "labels.csv"), utkface_rows(12))
    opts = options(labels, tmp_path / "out", workers=1)
    os.makedirs(opts.out)
    writer.mark_build(opts)
    theirs = tmp_path / "out" / f"faces-00000-of-0000{SHARDS}.array_record.tmp.77"
    theirs.write_bytes(b"a shard another live build is writing")
    refusal = rf"out is in use by another build \(pid {os.getpid()} on host .*, or use another --out$"
    with writer.out_lock(opts), pytest.raises(WorkdirLockedError, match=refusal):
        build_shards.build(opts)
    assert theirs.read_bytes() == b"a shard another live build is writing"


def test_workers_hold_the_builders_lock_until_they_exit(tmp_path, monkeypatch):
    """Leftover workers of a dead builder keep the folder locked: a rerun is refused while they run."""
    # The builder emptied the lock file when it let go, so the rerun waits for a holder to name itself
    # before refusing; a short wait keeps the test fast (workdir_lock's own tests cover the wait).
    monkeypatch.setattr(workdir_lock, "HOLDER_WAIT_S", 0.2)
    opts = options("", tmp_path, workers=2)
    writer.mark_build(opts)
    lock = writer.out_lock(opts).__enter__()
    pool = multiprocessing.get_context("spawn").Pool(
        2, initializer=writer.die_with_parent, initargs=(os.getpid(), writer.SharedFd(lock.fileno())))
    workers = [p.pid for p in multiprocessing.active_children()]
    try:
        assert pool.apply_async(os.getpid).get(TIMEOUT_S) in workers  # started, initialized
        lock.__exit__(None, None, None)  # the builder lets go (as when it is killed); its workers do not
        with pytest.raises(WorkdirLockedError, match="in use by another build"):
            writer.out_lock(opts).__enter__()
    finally:
        pool.terminate()
        pool.join()
        kill_survivors(workers)
    with writer.out_lock(opts):
        pass
