"""Writing one shard, and keeping the output folder safe.

A shard is written to a temporary file renamed into place only when complete, then its status
file (OUT/.build/SHARD.json) records what went in, so an interrupted build keeps its finished
shards. The builder deletes files only in a folder that holds a build of ours.

One builder per folder, and never beside the leftovers of another: the builder holds an exclusive
flock on OUT/.build/.lock (the workdir lock of training, `out_lock`) while it writes, and hands the
locked file itself to its worker processes (`SharedFd`). A flock belongs to the open file, which the
kernel closes only after the last process holding it has gone, so workers that outlived a killed
builder still hold the lock: a rerun is refused instead of deleting the temporary files they are
writing, or having them rename a shard of the old build over one of its own. They should not
outlive it, though: each worker dies with the builder (`die_with_parent`).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import glob
import json
import logging
import os
import signal
import sys
import threading
import time

from mefem_jax.data import manifest as manifest_lib
from mefem_jax.data import records
from mefem_jax.data.shards import quality
from mefem_jax.data.shards.image import SkipImage, prepare
from mefem_jax.data.shards.plan import BuildOptions, Row
from mefem_jax.workdir_lock import LOCK_NAME, WorkdirLock

log = logging.getLogger("build_shards")

STATUS_DIR = ".build"
# Written into .build/ before anything else: marks a folder holding an unfinished build of ours,
# the only kind (besides one with our manifest) whose leftovers the builder may delete.
BUILD_MARK = "builder.json"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Where the kernel cannot signal a worker when its parent dies: how often the worker looks.
PARENT_POLL_S = 0.5


@dataclasses.dataclass(frozen=True)
class ShardJob:
    index: int
    file: str
    rows: tuple[Row, ...]
    fingerprint: str
    opts: BuildOptions


def status_path(opts: BuildOptions, file: str) -> str:
    return os.path.join(opts.out, STATUS_DIR, file + ".json")


@contextlib.contextmanager
def _shard_writer(final: str):
    """An ArrayRecord writer on a temporary file, renamed to `final` only once it is complete."""
    from array_record.python import array_record_module  # the C++ extension: only in the processes that write

    tmp = f"{final}.tmp.{os.getpid()}"
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
        yield writer
    finally:
        writer.close()
    os.replace(tmp, final)


def write_shard(job: ShardJob) -> dict:
    """Writes one shard; returns its status: counts, skipped files, the faces the quality limits
    rejected (with the failed measure), every record's fingerprints (for --dedup, which needs them all),
    and with the face step the files where several faces were found and each record's landmark labels."""
    final = os.path.join(job.opts.out, job.file)
    skipped, rejected, several, face_labels, hashes, count = [], [], [], {}, {}, 0
    limits = job.opts.quality_limits()
    with _shard_writer(final) as writer:
        for row in job.rows:
            try:
                prepared = prepare(row.path, job.opts)
            except SkipImage as err:
                skipped.append({"file": row.file, "reason": str(err)})
                continue
            except OSError as err:  # unreadable file (permissions, vanished mid-build)
                skipped.append({"file": row.file, "reason": f"cannot read: {err}"})
                continue
            failed = quality.failure(prepared.quality, limits)
            if failed:
                name, value, limit = failed
                rejected.append({"file": row.file, "reason": name, "value": value, "limit": limit,
                                 "measures": prepared.quality})
                continue
            labels = {**dict(row.labels), **prepared.labels}
            hashes[row.file] = prepared.hash.to_record()
            writer.write(records.encode_record(row.file, labels, prepared.image, hashes[row.file],
                                               prepared.quality))
            count += 1
            if prepared.faces_found > 1:
                several.append(row.file)
            if prepared.labels:
                face_labels[row.file] = labels
    status = {"fingerprint": job.fingerprint, "file": job.file, "num_records": count,
              "bytes": os.path.getsize(final), "skipped": skipped, "rejected": rejected, "hashes": hashes}
    if job.opts.uses_faces:
        status.update(several_faces=several, face_labels=face_labels)
    manifest_lib.write_json_atomic(status_path(job.opts, job.file), status)
    return status


def remove_records(opts: BuildOptions, status: dict, drop: set[str]) -> dict:
    """Rewrites a finished shard without the records whose ids are in `drop` (duplicates, found once every
    shard was written) and returns its new status, which lists them under "removed". Records are copied
    as they are, nothing is decoded. Interrupted, the shard's size no longer matches its status, so a
    rerun writes it again from its images."""
    final = os.path.join(opts.out, status["file"])
    count = 0
    with _shard_writer(final) as writer:
        for data in records.read_shard(final):
            if records.decode_header(data)["id"] not in drop:
                writer.write(data)
                count += 1
    status = {**status, "num_records": count, "bytes": os.path.getsize(final),
              "removed": sorted(set(status.get("removed", [])) | drop)}
    manifest_lib.write_json_atomic(status_path(opts, status["file"]), status)
    return status


def reusable(opts: BuildOptions, file: str, fingerprint: str) -> dict | None:
    """The status of a shard finished by an earlier (interrupted) run with the same inputs."""
    try:
        with open(status_path(opts, file), encoding="utf-8") as f:
            status = json.load(f)
        if (status["fingerprint"] == fingerprint
                and os.path.getsize(os.path.join(opts.out, file)) == status["bytes"]):
            return status
    except (OSError, ValueError, KeyError):
        pass
    return None


def remove_stale(opts: BuildOptions, expected: set[str]) -> None:
    """Deletes leftovers of other builds under this name: temp files, shards of another count.
    Only called on a folder `check_out_folder` accepted as ours."""
    pattern = os.path.join(opts.out, f"{opts.name}-?????-of-?????{manifest_lib.SHARD_SUFFIX}")
    for path in glob.glob(pattern) + glob.glob(pattern + ".tmp.*"):
        if os.path.basename(path) not in expected:
            log.info("removing %s: left by an earlier build of this folder", path)
            os.remove(path)


def _is_our_build_mark(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("format") == manifest_lib.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out_folder(opts: BuildOptions) -> None:
    """Refuses an --out holding anything but a build of ours: the builder deletes shard-like
    files, temp files and .build/ in its folder, which in someone else's folder are not ours."""
    if os.path.exists(opts.out) and not os.path.isdir(opts.out):
        raise FileExistsError(f"--out {opts.out} is a file, not a folder")
    if not os.path.isdir(opts.out) or not os.listdir(opts.out):
        return  # new or empty
    if os.path.exists(os.path.join(opts.out, manifest_lib.MANIFEST_NAME)):
        manifest_lib.read_manifest(opts.out)  # ours, or ValueError naming the file
        return
    if _is_our_build_mark(os.path.join(opts.out, STATUS_DIR, BUILD_MARK)):
        return  # an interrupted build of ours
    raise FileExistsError(f"{opts.out} is not empty and holds no shard build (no "
                          f"{manifest_lib.MANIFEST_NAME}); pick a new or empty --out")


def mark_build(opts: BuildOptions) -> None:
    status_dir = os.path.join(opts.out, STATUS_DIR)
    os.makedirs(status_dir, exist_ok=True)
    manifest_lib.write_json_atomic(os.path.join(status_dir, BUILD_MARK),
                                   {"format": manifest_lib.FORMAT, "state": "building"})


def out_lock(opts: BuildOptions) -> WorkdirLock:
    """The out folder's lock, in .build/: `mark_build` first, so a folder holding only the lock is ours.
    A finished build removes .build/ with it, as its last write: a later builder then locks a new file."""
    return WorkdirLock(opts.out, what="build", flag="--out", lock_name=os.path.join(STATUS_DIR, LOCK_NAME))


class SharedFd:
    """A file descriptor a spawned worker receives as the same open file, not a new open of its path
    (multiprocessing passes it like the pipes of a Pool), so a flock on it is the worker's as well."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _shared_fd_in_child, (reduction.DupFd(self.fd),)


def _shared_fd_in_child(dup) -> SharedFd:
    return SharedFd(dup.detach())


_held = None  # in a worker: the builder's lock, open for the worker's lifetime


def die_with_parent(parent_pid: int, lock: SharedFd | None) -> None:
    """Pool initializer: a worker whose builder died (kill -9 included) dies too, instead of writing on
    beside the builder's rerun. On Linux the kernel kills it at once (prctl PR_SET_PDEATHSIG; strictly,
    when the thread that started it ends: the builder's, or for a replacement worker the pool's own, both
    busy until the pool is done); elsewhere a thread looks at the parent every PARENT_POLL_S. Either way,
    a builder that died before this ran is caught by comparing the parent pid: an orphan has been adopted."""
    global _held
    _held = lock
    if not (sys.platform.startswith("linux") and _kill_me_with_my_parent()):
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)


def _kill_me_with_my_parent() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc to load, or one without prctl
        return False


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)
