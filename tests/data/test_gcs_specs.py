"""gs:// data specs (data/gcs.py): read at MOUNT_ROOT/BUCKET/PATH, the convention the TPU launcher mounts
buckets to; without the mount, one line saying how to get it (exit 2 from the entry point).

There is no Cloud Storage here: a "mounted" bucket is a folder at a MOUNT_ROOT moved into tmp_path,
which is what the code under test sees of a gcsfuse mount (a folder of files)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from helpers.faces import IMAGES, utkface_rows, write_labels
from helpers.repo import REPO
from helpers.runs import assert_refused, run_module
from mefem_jax.data import gcs, pipeline, sources
from mefem_jax.training import run_record

UNMOUNTED = "gs://mefem-test-never-mounted/faces"


@pytest.fixture(scope="module")
def mounted(tmp_path_factory):
    """MOUNT_ROOT/faces-bucket/utk: a 10-face shard folder, as if the bucket were mounted there."""
    root = tmp_path_factory.mktemp("gcs")
    rows = utkface_rows(10)
    labels = write_labels(root / "labels.csv", rows)
    out = root / "mnt" / "faces-bucket" / "utk"
    done = subprocess.run([sys.executable, "-m", "mefem_jax.data.build_shards", f"--images={IMAGES}",
                           f"--labels={labels}", f"--out={out}", "--num_shards=2", "--workers=1",
                           "--image_size=32"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "mnt", out


@pytest.fixture
def mount_root(mounted, monkeypatch):
    monkeypatch.setattr(gcs, "MOUNT_ROOT", str(mounted[0]))
    return mounted


def test_the_convention_maps_bucket_and_path():
    assert gcs.local_path("gs://my.bucket/a/b") == "/mnt/gcs/my.bucket/a/b"
    assert gcs.local_path("gs://my-bucket") == "/mnt/gcs/my-bucket"
    assert gcs.local_path("/data/x") == "/data/x" and gcs.local_path("tfds:celeb_a") == "tfds:celeb_a"
    for bad in ("gs://", "gs://UPPER/x", "gs://a/x", "gs://-bucket/x"):
        with pytest.raises(ValueError, match="not a Cloud Storage bucket name"):
            gcs.split(bad)


def test_a_mounted_bucket_reads_like_the_folder(mount_root):
    root, folder = mount_root
    spec = "gs://faces-bucket/utk"
    assert len(sources.open_source(spec)) == 10
    assert len(sources.open_source(spec + "/*.array_record")) == 10
    ids = [i for batch in pipeline.make_eval_iterator(spec, image_size=32, batch_size=4) for i in batch["id"] if i]
    assert len(ids) == 10
    # The identity reads the manifest on the mount, and keeps the gs:// text.
    identity = run_record.data_identity(spec)
    assert identity == {"spec": spec, "fingerprint": run_record.data_identity(str(folder))["fingerprint"]}
    assert run_record.same_data(identity, run_record.data_identity(str(folder)))
    # A mixture's gs:// items go through the same mount.
    parts = run_record.data_identity(f"{spec}:0.5;synthetic:0.5")["mixture"]
    assert parts[0]["fingerprint"] == identity["fingerprint"]


def test_an_unmounted_bucket_is_one_line_naming_the_mount(mount_root, monkeypatch):
    root, _ = mount_root
    (root / "empty-bucket").mkdir()  # a mount point whose mount failed: an empty folder
    for spec in (UNMOUNTED, "gs://empty-bucket/faces"):
        bucket = spec[len("gs://"):].split("/")[0]
        with pytest.raises(ValueError) as err:
            sources.open_source(spec)
        line = str(err.value)
        assert "\n" not in line
        assert f"{root}/{bucket}" in line and f"--mount-bucket={bucket}" in line and "launch/tpu_pod.sh" in line
    monkeypatch.setattr(gcs.shutil, "which", lambda name: None)  # no gcsfuse on this machine
    with pytest.raises(ValueError, match="install Cloud Storage FUSE .*cloud-storage-fuse/install"):
        sources.open_source(UNMOUNTED)
    monkeypatch.setattr(gcs.shutil, "which", lambda name: "/usr/bin/gcsfuse")
    with pytest.raises(ValueError, match=r"elsewhere mount it: mkdir -p \S+ && gcsfuse --implicit-dirs -o ro"):
        sources.open_source(UNMOUNTED)


def test_training_on_an_unmounted_bucket_exits_2_in_one_line(tmp_path):
    """Through the entry point, as an item of a mixture: status 2, one `train:` line, no workdir left."""
    workdir = tmp_path / "run"
    done = run_module("mefem_jax.train", "--config=configs/vits.py:smoke", f"--workdir={workdir}",
                      f"--config.data.train=synthetic:0.5;{UNMOUNTED}:0.5")
    assert done.returncode == 2, done.stderr[-2000:]
    assert_refused(done, "train: data spec", UNMOUNTED, "gcsfuse", "--mount-bucket=mefem-test-never-mounted")
    assert not workdir.exists()
