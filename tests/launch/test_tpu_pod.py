"""launch/tpu_pod.sh against stand-in gcloud and worker python (helpers/launch_fakes.py)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from helpers.launch_fakes import (FAKE_PYTHON, POD, REPO, TPU, TRAIN_HEAD, TRICKY_ARGS, executable, Fakes,
                                  gcloud_steps, jax_pin, option, run, traced)


def test_tpu_dry_run_prints_every_step_and_calls_nothing(tripwires):
    result = run(TPU, "all", "--dry-run", *POD, "--", *TRICKY_ARGS, env=tripwires.env())
    assert result.returncode == 0, result.stderr
    assert not tripwires.calls_file.exists(), "dry run called gcloud"

    gcloud = [c for c in traced(result.stderr) if c[0] == "gcloud"]
    assert gcloud_steps(gcloud) == ["create", "scp", "ssh", "ssh", "delete"]
    create, scp, install, train, delete = gcloud
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mefem-test"]
    assert {"--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--zone=us-east5-a"} <= set(create)
    for call in (scp, install, train):
        assert "--worker=all" in call
    assert scp[5].endswith("/mefem_jax-src.tar.gz") and scp[6] == "mefem-test:mefem_jax-src.tar.gz"
    pip = shlex.split(option(install, "--command").split("; ")[-1])
    assert pip[-3:] == ["-e", ".", f"jax[tpu]=={jax_pin()}"], "jax[tpu] must match setup.py's jax pin"
    command = option(train, "--command")
    assert "mefem_jax.train --config=configs/vitb.py --workdir=gs://bucket/run" in command
    assert delete[4:] == ["delete", "mefem-test", "--quiet", "--zone=us-east5-a"]


def test_tpu_all_checks_the_hbm_fit_before_creating(tripwires):
    """`all` first compiles the run for the slice here (compile_check), with the training's --config.*
    overrides and nothing else, before any gcloud call."""
    result = run(TPU, "all", "--dry-run", *POD, "--", *TRICKY_ARGS, "--debug", env=tripwires.env())
    assert result.returncode == 0, result.stderr
    first = traced(result.stderr)[0]
    assert first[1:5] == ["-m", "mefem_jax.compile_check", "--config=configs/vitb.py", "--topology=v5p-64"]
    assert first[5:] == [a for a in TRICKY_ARGS if a.startswith("--config.")]


def test_tpu_all_stops_before_creating_a_slice_the_run_cannot_fit(recorders):
    """A real compile for a v5e-4: a batch whose activations exceed 16 GiB per chip ends the launch
    with compile_check's status and line, and gcloud is never called."""
    pytest.importorskip("libtpu", reason="the fit check needs the tpu extra")
    pod = ["--name=mefem-test", "--zone=us-east5-a", "--accelerator-type=v5e-4", "--workdir=gs://bucket/run",
           "--config=configs/vits.py:smoke"]
    result = run(TPU, "all", *pod, "--", "--config.data.batch_size=1048576",
                 env=recorders.env(PYTHON=sys.executable))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "compile_check: does not fit v5e-4" in result.stderr
    assert recorders.calls() == []


def _worker_home(tmp_path: Path) -> Path:
    """A worker's home as `install` leaves it, with a venv python that records how it is run."""
    home = tmp_path / "home"
    (home / "mefem_jax" / "configs").mkdir(parents=True)
    (home / "mefem_jax_run").mkdir()
    executable(home / "mefem_jax_venv" / "bin" / "python", FAKE_PYTHON)
    return home


def _on_worker(command: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    """Runs a --command the way sshd would: the login shell, started in the home directory."""
    env = dict(os.environ, HOME=str(home), FAKE_ARGV=str(home / "argv.jsonl"), **env)
    return subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True,
                          timeout=60)


def _records(home: Path) -> list[dict]:
    return [json.loads(line) for line in (home / "argv.jsonl").read_text().splitlines()]


def test_tpu_foreground_train_passes_arguments_verbatim(tripwires, tmp_path):
    env_value = "a b 'c' $HOME"
    result = run(TPU, "train", "--dry-run", "--foreground", *POD, f"--env=FOO={env_value}", "--",
                 *TRICKY_ARGS, env=tripwires.env())
    assert result.returncode == 0, result.stderr
    (train,) = [c for c in traced(result.stderr) if c[0] == "gcloud"]
    assert train[4:7] == ["ssh", "mefem-test", "--worker=all"]

    home = _worker_home(tmp_path)
    worker = _on_worker(option(train, "--command"), home, FAKE_TRAIN_STATUS="3")
    assert worker.returncode == 3, "a failed training must fail the ssh call (pipefail through tee)"
    (record,) = _records(home)
    assert record["argv"] == [*TRAIN_HEAD, "--workdir=gs://bucket/run", "--multihost", *TRICKY_ARGS]
    assert record["cwd"] == str(home / "mefem_jax")
    assert record["env"]["FOO"] == env_value
    assert "step 1 loss 0.5" in worker.stdout
    assert "step 1 loss 0.5" in (home / "mefem_jax_run" / "train.log").read_text()


def _remote_command(subcommand: str, tripwires: Fakes) -> str:
    result = run(TPU, subcommand, "--dry-run", *POD, *(["--", *TRICKY_ARGS] if subcommand == "train" else []),
                 env=tripwires.env())
    assert result.returncode == 0, result.stderr
    (call,) = [c for c in traced(result.stderr) if c[0] == "gcloud"]
    assert option(call, "--worker") == ("0" if subcommand == "logs" else "all")
    return option(call, "--command")


def _wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_tpu_detached_train_then_logs_report_the_run(tripwires, tmp_path):
    home = _worker_home(tmp_path)
    run_dir = home / "mefem_jax_run"
    started = _on_worker(_remote_command("train", tripwires), home, FAKE_TRAIN_STATUS="3")
    assert started.returncode == 0, started.stderr
    assert "training started" in started.stdout
    assert _wait_for(lambda: (run_dir / "train.exit").exists()), "detached run never finished"
    assert (run_dir / "train.exit").read_text().strip() == "3"
    (record,) = _records(home)
    assert record["argv"] == [*TRAIN_HEAD, "--workdir=gs://bucket/run", "--multihost", *TRICKY_ARGS]

    logs = _on_worker(_remote_command("logs", tripwires), home)
    assert logs.returncode == 3, "logs exits with training's status"
    assert "step 1 loss 0.5" in logs.stdout
    assert "training exited with status 3" in logs.stdout


def test_tpu_refuses_a_second_run_and_stop_terminates_the_first(tripwires, tmp_path):
    home = _worker_home(tmp_path)
    train = _remote_command("train", tripwires)
    started = _on_worker(train, home, FAKE_TRAIN_SECONDS="30")
    assert started.returncode == 0, started.stderr
    pgid = int((home / "mefem_jax_run" / "train.pid").read_text())
    try:
        assert _wait_for(lambda: (home / "argv.jsonl").exists()), "training never started"
        again = _on_worker(train, home)
        assert again.returncode == 1
        assert "a training run is active" in again.stderr

        stopped = _on_worker(_remote_command("stop", tripwires), home)
        assert stopped.returncode == 0, stopped.stderr
        assert "SIGTERM sent" in stopped.stdout
        assert _wait_for(lambda: not _group_alive(pgid)), "stop left the training running"
        assert "no training running" in _on_worker(_remote_command("stop", tripwires), home).stdout
    finally:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


def test_tpu_all_runs_create_install_train_delete_in_order(recorders):
    result = run(TPU, "all", "--no-check", *POD, "--", *TRICKY_ARGS, env=recorders.env())
    assert result.returncode == 0, result.stderr
    calls = recorders.calls()
    assert gcloud_steps(calls) == ["create", "scp", "ssh", "ssh", "delete"]
    assert calls == [c for c in traced(result.stderr) if c[0] == "gcloud"], "printed != executed"
    assert "uv pip install" in option(calls[2], "--command")
    assert "mefem_jax.train" in option(calls[3], "--command")

    # What went to the workers: this checkout as git sees it, without .git or ignored files.
    with tarfile.open(recorders.uploads / "mefem_jax-src.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"setup.py", "mefem_jax/train.py", "configs/vitb.py", "launch/tpu_pod.sh"} <= names
    assert not [n for n in names if n.startswith(".git/") or "__pycache__" in n]
    assert not Path(calls[1][5]).exists(), "the staged tarball outlived the run"


@pytest.mark.parametrize("failing, steps", [
    ("mefem_jax.train", ["create", "scp", "ssh", "ssh", "delete"]),
    ("uv pip install", ["create", "scp", "ssh", "delete"]),
], ids=["training-fails", "install-fails"])
def test_tpu_all_deletes_the_tpu_when_a_step_fails(recorders, failing, steps):
    result = run(TPU, "all", "--no-check", *POD, env=recorders.env(FAKE_FAIL_ON=failing))
    assert result.returncode != 0
    assert gcloud_steps(recorders.calls()) == steps
    assert "tearing down mefem-test" in result.stderr


def test_tpu_queued_resource_create_waits_for_active_and_delete_forces(recorders):
    created = run(TPU, "create", "--queued", "--spot", "--create-arg=--reserved", *POD, env=recorders.env())
    assert created.returncode == 0, created.stderr
    deleted = run(TPU, "delete", "--queued", *POD, env=recorders.env())
    assert deleted.returncode == 0, deleted.stderr
    create, describe, delete = recorders.calls()
    assert create[3:6] == ["queued-resources", "create", "mefem-test"]
    assert {"--node-id=mefem-test", "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
            "--spot", "--reserved", "--zone=us-east5-a"} <= set(create)
    assert describe[3:6] == ["queued-resources", "describe", "mefem-test"]
    assert "--format=value(state.state)" in describe
    assert delete[3:] == ["queued-resources", "delete", "mefem-test", "--force", "--quiet", "--zone=us-east5-a"]


def test_tpu_all_deletes_a_queued_request_that_failed(recorders):
    result = run(TPU, "all", "--no-check", "--queued", *POD, env=recorders.env(FAKE_STATE="FAILED"))
    assert result.returncode != 0
    assert "queued resource mefem-test is FAILED" in result.stderr
    assert [c[3:5] for c in recorders.calls()] == [
        ["queued-resources", "create"], ["queued-resources", "describe"], ["queued-resources", "delete"]]


def test_tpu_installs_from_a_git_requirement(tripwires):
    requirement = "mefem_jax @ git+https://github.com/example/mefem_jax@v0.1.0"
    result = run(TPU, "install", "--dry-run", *POD, f"--install-from={requirement}", env=tripwires.env())
    assert result.returncode == 0, result.stderr
    commands = traced(result.stderr)
    tar = [c for c in commands if c[0] == "tar"]
    assert len(tar) == 1 and tar[0][-3:] == ["-C", str(REPO), "configs"], "only configs/ is shipped"
    (install,) = [c for c in commands if c[0] == "gcloud" and c[4] == "ssh"]
    pip = shlex.split(option(install, "--command").split("; ")[-1])
    assert pip[-2:] == [requirement, f"jax[tpu]=={jax_pin()}"]
    assert "-e" not in pip


def test_tpu_installs_from_a_wheel(recorders, tmp_path):
    wheel = tmp_path / "dist" / "mefem_jax-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: only its name and travel matter here
    result = run(TPU, "install", *POD, f"--install-from={wheel}", env=recorders.env())
    assert result.returncode == 0, result.stderr
    with tarfile.open(recorders.uploads / "mefem_jax-src.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"configs/vitb.py", wheel.name} <= names
    assert "mefem_jax/train.py" not in names
    (_, install) = recorders.calls()
    pip = shlex.split(option(install, "--command").split("; ")[-1])
    assert pip[-2:] == [f"./{wheel.name}", f"jax[tpu]=={jax_pin()}"]


def test_tpu_warns_when_workdir_is_not_on_gcs(tripwires):
    result = run(TPU, "train", "--dry-run", *POD[:2], "--workdir=/tmp/run", env=tripwires.env())
    assert result.returncode == 0, result.stderr
    assert "warning: --workdir '/tmp/run' is not on gs://" in result.stderr


NAME_ZONE = ["--name=mefem-test", "--zone=us-east5-a"]


@pytest.mark.parametrize("args, message", [
    ([], "Usage:"),
    (["launch", *NAME_ZONE], "unknown subcommand 'launch'"),
    (["create", "--zone=us-east5-a", "--accelerator-type=v5p-64"], "--name is required"),
    (["create", "--name=Mefem_Test", "--zone=us-east5-a", "--accelerator-type=v5p-64"], "--name 'Mefem_Test'"),
    (["create", "--name=mefem-test", "--accelerator-type=v5p-64"], "--zone is required"),
    (["create", *NAME_ZONE], "create needs --accelerator-type"),
    (["create", *NAME_ZONE, "--accelerator-type=v5p"], "does not look like v5p-64"),
    (["create", *NAME_ZONE, "--accelerator-type=v9z-8"], "no default runtime version for 'v9z-8'"),
    (["create", *NAME_ZONE, "--accelerator-type=v4-8", "--queued", "--preemptible"], "use --spot with --queued"),
    (["create", *NAME_ZONE, "--accelerator-type=v4-8", "--spot", "--preemptible"], "exclude each other"),
    (["create", *NAME_ZONE, "--accelerator-type=v4-8", "--bogus"], "unknown option '--bogus'"),
    (["create", *NAME_ZONE, "--accelerator-type"], "--accelerator-type needs a value"),
    (["create", *NAME_ZONE, "--accelerator-type=v4-8", "--spot=yes"], "--spot takes no value"),
    (["train", *NAME_ZONE], "train needs --workdir"),
    (["train", *NAME_ZONE, "--workdir=gs://b/r", "--config=configs/nope.py"], "'configs/nope.py' not found"),
    (["train", *NAME_ZONE, "--workdir=gs://b/r", "--", "--workdir=gs://other"], "pass --workdir to the launcher"),
    (["train", *NAME_ZONE, "--workdir=gs://b/r", "--", "--num_processes=2"], "not needed on TPU"),
    (["train", *NAME_ZONE, "--workdir=gs://b/r", "--env=NOVALUE"], "--env 'NOVALUE' must be KEY=VALUE"),
    (["delete", *NAME_ZONE, "--", "--config.total_steps=1"], "only go with train or all"),
    (["logs", *NAME_ZONE, "--worker=first"], "--worker 'first'"),
    (["install", *NAME_ZONE, "--install-from=/nowhere/mefem_jax-0.1.0-py3-none-any.whl"], "not found"),
    (["install", *NAME_ZONE, "--install-from=./some/dir"], "must be a .whl file"),
])
def test_tpu_rejects_bad_arguments_before_calling_gcloud(tripwires, args, message):
    result = run(TPU, *args, env=tripwires.env())
    assert result.returncode == 2
    assert message in result.stderr
    assert not tripwires.calls_file.exists()
