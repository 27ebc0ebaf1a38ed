"""launch/slurm_gpu.sh against stand-in sbatch, srun, scontrol and python (helpers/launch_fakes.py)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from helpers.launch_fakes import (FAKE_PYTHON, FAKE_SCONTROL, FAKE_SRUN, RECORDER, REPO, SLURM, TRAIN_HEAD,
                                  TRICKY_ARGS, executable, Fakes, find_shellcheck, run, traced)


def _slurm_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--account=proj", "--time=48:00:00",
            "--cpus-per-task=32", "--sbatch-arg=--exclusive", "--env=FOO=a b", f"--workdir={tmp_path}/run",
            f"--log-dir={tmp_path}/logs", *extra, "--", *TRICKY_ARGS]


def test_slurm_dry_run_prints_script_and_submits_nothing(tripwires, tmp_path):
    result = run(SLURM, "--dry-run", *_slurm_args(tmp_path), env=tripwires.env())
    assert result.returncode == 0, result.stderr
    assert not tripwires.calls_file.exists(), "dry run called sbatch"
    lines = result.stdout.splitlines()
    for directive in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=32",
                      "--partition=gpu", "--account=proj", "--time=48:00:00", "--exclusive",
                      f"--chdir={REPO}", f"--output={tmp_path}/logs/%x-%j.out"):
        assert f"#SBATCH {directive}" in lines
    assert 'nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")' in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
    (sbatch,) = traced(result.stderr)
    assert sbatch[0] == "sbatch" and sbatch[1].startswith(f"{tmp_path}/logs/mefem_jax-")
    assert not (tmp_path / "logs").exists(), "dry run wrote files"

    script = tmp_path / "job.sbatch"
    script.write_text(result.stdout)
    checked = subprocess.run([find_shellcheck() or "shellcheck", "--severity=style", str(script)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout


@pytest.mark.parametrize("port", [None, 23456], ids=["port-from-job-id", "fixed-port"])
def test_slurm_script_starts_one_process_per_node_with_the_coordinator(tripwires, tmp_path, port):
    fake_python = executable(tmp_path / "py" / "python", FAKE_PYTHON)
    extra = [f"--python={fake_python}"] + ([f"--coordinator-port={port}"] if port else [])
    result = run(SLURM, "--dry-run", *_slurm_args(tmp_path, *extra), env=tripwires.env())
    assert result.returncode == 0, result.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(result.stdout)

    # Run it as SLURM would on the first node of a 4-node allocation.
    cluster = Fakes(tmp_path / "cluster", RECORDER)
    executable(cluster.bin / "srun", FAKE_SRUN)
    executable(cluster.bin / "scontrol", FAKE_SCONTROL)
    job_id = 123456
    env = cluster.env(SLURM_JOB_NODELIST="gpu[007-010]", SLURM_JOB_ID=str(job_id), SLURM_JOB_NUM_NODES="4",
                      SLURM_CPUS_PER_TASK="32", FAKE_ARGV=str(tmp_path / "argv.jsonl"))
    job = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert job.returncode == 0, job.stderr

    coordinator = f"gpu007:{port or 61440 + job_id % 4096}"
    assert f"coordinator {coordinator}" in job.stdout
    (srun,) = cluster.calls()
    assert srun == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    records = [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for rank, record in enumerate(records):
        assert record["argv"] == [*TRAIN_HEAD, f"--workdir={tmp_path}/run", *TRICKY_ARGS,
                                  f"--coordinator_address={coordinator}", "--num_processes=4",
                                  f"--process_id={rank}"]
        assert record["env"] == {"FOO": "a b", "JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7",
                                 "SRUN_CPUS_PER_TASK": "32", "SLURM_PROCID": str(rank)}


def test_slurm_submits_the_script_it_prints(recorders, tripwires, tmp_path):
    preview = run(SLURM, "--dry-run", *_slurm_args(tmp_path), env=tripwires.env())
    submitted = run(SLURM, *_slurm_args(tmp_path), env=recorders.env())
    assert submitted.returncode == 0, submitted.stderr
    assert "Submitted batch job 4242" in submitted.stdout
    (call,) = recorders.calls()
    assert call == traced(submitted.stderr)[0]
    assert call[0] == "sbatch" and Path(call[1]).parent == tmp_path / "logs"
    assert Path(call[1]).read_text() == preview.stdout
    assert (recorders.uploads / Path(call[1]).name).read_text() == preview.stdout


@pytest.mark.parametrize("args, message", [
    (["--nodes=2"], "--workdir is required"),
    (["--workdir=/shared/run", "--nodes=0"], "--nodes '0' must be a positive integer"),
    (["--workdir=/shared/run", "--gpus-per-node=eight"], "--gpus-per-node 'eight'"),
    (["--workdir=/shared/run", "--time=tomorrow"], "--time 'tomorrow' is not a SLURM time"),
    (["--workdir=/shared/run", "--coordinator-port=70000"], "must be a port number"),
    (["--workdir=/shared/run", "--job-name=my job"], "--job-name 'my job'"),
    (["--workdir=/shared/run", "--sbatch-arg=exclusive"], "must be one sbatch option"),
    (["--workdir=/shared/run", "--venv=/nonexistent/venv"], "no /nonexistent/venv/bin/activate"),
    (["--workdir=/shared/run", "--config=configs/nope.py"], "'configs/nope.py' not found"),
    (["--workdir=/shared/run", "--env=NOVALUE"], "must be KEY=VALUE"),
    (["--workdir=/shared/run", "--bogus"], "unknown option '--bogus'"),
    (["--workdir"], "--workdir needs a value"),
    (["--workdir=/shared/run", "--", "--process_id=3"], "set by the job script"),
    (["--workdir=/shared/run", "--", "--config=configs/vits.py"], "pass --config to the launcher"),
])
def test_slurm_rejects_bad_arguments_before_calling_sbatch(tripwires, args, message):
    result = run(SLURM, *args, env=tripwires.env())
    assert result.returncode == 2
    assert message in result.stderr
    assert not tripwires.calls_file.exists()
