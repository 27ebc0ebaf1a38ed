"""launch/tpu_pod.sh and gs:// data: the buckets a run's data specs name are mounted with gcsfuse on every
worker before training, at the place training reads them (mefem_jax/data/gcs.py).

As in test_tpu_pod.py, gcloud is a stand-in and the worker command is run here, with stand-ins for sudo,
gcsfuse, mountpoint, curl and lsb_release that record how they are called: that proves the command's
quoting and order (install, then mkdir, then mount), which reading its text cannot."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers.launch_fakes import POD, TPU, executable, gcloud_steps, option, run, traced
from mefem_jax.data import gcs

MIXTURE = "--config.data.train=gs://faces-bucket/utk:0.7;gs://other.bucket/ffhq:0.3"
EVAL = ["--config.eval.test", "gs://faces-bucket/test:split=test"]  # the two-word form
FLAGS = ["--implicit-dirs", "-o", "ro", "--file-cache-max-size-mb=40960",
         "--file-cache-cache-file-for-range-read=true", "--file-cache-enable-parallel-downloads=true"]

# Worker-side stand-ins: each logs its argv (and, for `sudo tee`, what it was given) to FAKE_CALLS.
# sudo runs nothing (no /mnt here) except that installing gcsfuse puts the gcsfuse stand-in on PATH.
RECORD = f"""#!{sys.executable} -S
import json, os, shutil, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
entry = [name] + args
if name == "sudo" and args[:1] == ["tee"]:
    entry.append(sys.stdin.read().strip())
with open(os.environ["FAKE_CALLS"], "a") as log:
    log.write(json.dumps(entry) + "\\n")
if name == "sudo" and "install" in args and "gcsfuse" in args:
    shutil.copy(sys.argv[0], os.path.join(os.path.dirname(sys.argv[0]), "gcsfuse"))
if name == "lsb_release":
    print("jammy")
if name == "mountpoint":
    sys.exit(0 if os.environ.get("FAKE_MOUNTED") else 1)
"""


def _dry_run(tripwires, *args: str, subcommand: str = "all"):
    result = run(TPU, subcommand, "--dry-run", *POD, *args, env=tripwires.env())
    assert result.returncode == 0, result.stderr
    assert not tripwires.calls_file.exists(), "dry run called gcloud"
    return [c for c in traced(result.stderr) if c[0] == "gcloud"]


def test_dry_run_mounts_each_bucket_of_the_data_specs_before_training(tripwires):
    calls = _dry_run(tripwires, "--", MIXTURE, *EVAL)
    assert gcloud_steps(calls) == ["create", "scp", "ssh", "ssh", "ssh", "delete"]
    install, mount, train = (option(c, "--command") for c in calls[2:5])
    assert "uv pip install" in install and "mefem_jax.train" in train
    assert option(calls[3], "--worker") == "all"
    for bucket in ("faces-bucket", "other.bucket"):  # each once, though faces-bucket is named twice
        assert mount.count(f"gcsfuse {' '.join(FLAGS)} --cache-dir=/mnt/gcs_cache/{bucket} {bucket} "
                           f"/mnt/gcs/{bucket}") == 1
        assert f"mountpoint -q /mnt/gcs/{bucket}" in mount
    assert "apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse" in mount
    # Training is handed the specs as given: it maps gs:// to the mount itself.
    assert "gs://faces-bucket/utk:0.7;gs://other.bucket/ffhq:0.3" in train


def test_no_gs_data_no_mount_and_extra_buckets_on_request(tripwires):
    assert gcloud_steps(_dry_run(tripwires, "--", "--config.data.train=/data/faces",
                                 subcommand="train")) == ["ssh"]
    calls = _dry_run(tripwires, "--mount-bucket=cfg-bucket", "--gcsfuse-arg=--billing-project=my proj",
                     subcommand="train")
    assert gcloud_steps(calls) == ["ssh", "ssh"]
    assert "--billing-project='my proj' cfg-bucket /mnt/gcs/cfg-bucket" in option(calls[0], "--command")


def test_a_bucket_option_with_a_path_is_refused(tripwires):
    result = run(TPU, "train", "--dry-run", *POD, "--mount-bucket=gs://cfg-bucket/x", env=tripwires.env())
    assert result.returncode == 2
    assert "--mount-bucket 'gs://cfg-bucket/x' is not a bucket name" in result.stderr


def test_the_launcher_mounts_where_training_reads():
    text = TPU.read_text()
    assert re.search(r"^readonly GCS_MOUNT_ROOT=(\S+)$", text, re.M).group(1) == gcs.MOUNT_ROOT
    pattern = re.search(r"^readonly BUCKET_PATTERN='(\S+)'$", text, re.M).group(1)
    assert f"^{pattern}$" == gcs._BUCKET.pattern


def _run_on_worker(command: str, bin_dir: Path, calls: Path, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", FAKE_CALLS=str(calls), **env)
    return subprocess.run(["bash", "-c", command], cwd=bin_dir, env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_worker_command_installs_then_mounts_and_leaves_a_mount_alone(tripwires, tmp_path):
    calls = _dry_run(tripwires, "--gcsfuse-arg=--billing-project=my proj", "--", MIXTURE, subcommand="train")
    command = option(calls[0], "--command")
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    for name in ("sudo", "mountpoint", "curl", "lsb_release"):
        executable(bin_dir / name, RECORD)

    done = _run_on_worker(command, bin_dir, log)
    assert done.returncode == 0, done.stderr
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    names = [c[0] if c[0] != "sudo" else f"sudo {c[1]}" for c in seen]
    assert names == ["lsb_release", "sudo tee", "curl", "sudo tee", "sudo apt-get", "sudo apt-get",
                     *["mountpoint", "sudo mkdir", "sudo chown", "gcsfuse"] * 2]
    assert seen[1][-1].endswith("https://packages.cloud.google.com/apt gcsfuse-jammy main")
    assert seen[5][-4:] == ["install", "-y", "-qq", "gcsfuse"]
    uid = f"{os.getuid()}:{os.getgid()}"
    for bucket, (check, mkdir, chown, mount) in zip(("faces-bucket", "other.bucket"), (seen[6:10], seen[10:14])):
        assert check == ["mountpoint", "-q", f"/mnt/gcs/{bucket}"]
        assert mkdir[1:] == ["mkdir", "-p", f"/mnt/gcs/{bucket}", f"/mnt/gcs_cache/{bucket}"]
        assert chown[1:] == ["chown", uid, f"/mnt/gcs/{bucket}", f"/mnt/gcs_cache/{bucket}"]
        assert mount[1:] == [*FLAGS, f"--cache-dir=/mnt/gcs_cache/{bucket}", "--billing-project=my proj",
                             bucket, f"/mnt/gcs/{bucket}"]

    log.unlink()  # a second launch finds gcsfuse installed and the buckets mounted: nothing to do
    again = _run_on_worker(command, bin_dir, log, FAKE_MOUNTED="1")
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)[0] for line in log.read_text().splitlines()] == ["mountpoint", "mountpoint"]
    assert again.stdout.count("is mounted on") == 2
