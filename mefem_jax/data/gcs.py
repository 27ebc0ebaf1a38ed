"""`gs://` data specs: read through a Cloud Storage FUSE (gcsfuse) mount at one fixed place.

    gs://BUCKET/PATH   is read at   /mnt/gcs/BUCKET/PATH      (MOUNT_ROOT / BUCKET / PATH)

Why a mount and not a Cloud Storage client: ArrayRecord shards are opened by a C++ reader that takes
POSIX paths, and Grain reads them at random offsets from many threads; gcsfuse turns those reads into
ranged GETs, and its file cache keeps shards on local disk after their first read. The convention is
the single source of truth shared with the TPU launcher: `launch/tpu_pod.sh` mounts every bucket that
a run's `--config.data.*` / `--config.eval.*` specs name at MOUNT_ROOT/BUCKET on every worker (its
GCS_MOUNT_ROOT must equal MOUNT_ROOT; tests/launch/test_tpu_pod_gcs.py checks), and the spec keeps
its `gs://` text everywhere it is recorded (config.json, checkpoints, the run's data identity), so a
run reads the same wherever the bucket is mounted by this convention.

Only the data specs go through the mount: workdirs and `init_from` on gs:// are read and written by
Orbax / etils.epath directly.
"""
from __future__ import annotations

import os
import re
import shutil

SCHEME = "gs://"
MOUNT_ROOT = "/mnt/gcs"
# Cloud Storage bucket names: 3-63 (222 with dots) lower-case letters, digits, '-', '_' and '.'.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]$")
INSTALL_URL = "https://cloud.google.com/storage/docs/cloud-storage-fuse/install"


def is_gcs(spec: str) -> bool:
    return str(spec).strip().startswith(SCHEME)


def split(spec: str) -> tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b'); ValueError for a name no bucket can have."""
    bucket, _, rest = str(spec).strip()[len(SCHEME):].partition("/")
    if not _BUCKET.match(bucket):
        raise ValueError(f"data spec {spec!r}: {bucket!r} is not a Cloud Storage bucket name")
    return bucket, rest


def local_path(spec: str) -> str:
    """Where the mount convention puts a gs:// spec (no check that anything is there); other specs
    are returned as they are."""
    if not is_gcs(spec):
        return spec
    bucket, rest = split(spec)
    return os.path.join(MOUNT_ROOT, bucket, rest) if rest else os.path.join(MOUNT_ROOT, bucket)


def mounted_path(spec: str) -> str:
    """The local path of a gs:// spec whose bucket is mounted; else ValueError, one line saying what
    to install or how to mount it. (A plain folder at MOUNT_ROOT/BUCKET, a copy of the bucket, counts
    as mounted: what is read is what is there.)"""
    bucket, _ = split(spec)
    where = os.path.join(MOUNT_ROOT, bucket)
    if os.path.isdir(where) and (os.path.ismount(where) or os.listdir(where)):
        return local_path(spec)
    mount = f"mkdir -p {where} && gcsfuse --implicit-dirs -o ro {bucket} {where}"
    how = (f"mount it: {mount}" if shutil.which("gcsfuse")
           else f"install Cloud Storage FUSE ({INSTALL_URL}), then mount it: {mount}")
    raise ValueError(f"data spec {spec!r} is read through a gcsfuse mount of bucket {bucket!r} at {where}, "
                     f"which this machine lacks; on a TPU pod launch/tpu_pod.sh mounts the buckets of "
                     f"--config.data.* and --config.eval.* (--mount-bucket={bucket} for others); "
                     f"elsewhere {how}")
