"""Stand-ins for gcloud, sbatch, srun, scontrol and a worker's python, for the launcher tests.

There is no cloud and no cluster here. gcloud, sbatch, srun and scontrol are replaced by small
executables first on PATH: "recorders" that log their argv (and keep what was uploaded or
submitted), or "tripwires" that log and fail, for runs that must not call them at all. The command
lines meant for the TPU workers, and the generated sbatch script, are then executed locally with a
stand-in python that records its argv: that proves the quoting round-trips, which reading the text
alone cannot.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
TPU = REPO / "launch" / "tpu_pod.sh"
SLURM = REPO / "launch" / "slurm_gpu.sh"

POD = ["--name=mefem-test", "--zone=us-east5-a", "--accelerator-type=v5p-64", "--workdir=gs://bucket/run"]
# Training arguments that break naive quoting: spaces, quotes, $, ;, globs and backticks.
TRICKY_ARGS = ["--config.total_steps=10", "--config.data.train=/data/my faces",
               "--config.note=it's $HOME; rm -rf * `date`"]
TRAIN_HEAD = ["-m", "mefem_jax.train", "--config=configs/vitb.py"]



def find_shellcheck() -> str | None:
    """shellcheck from the test extra: on PATH, or beside this python when its venv is not activated
    (`venv/bin/python -m pytest` leaves venv/bin off PATH; docs/PLATFORM_NOTES.md)."""
    beside = Path(sys.executable).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(beside) if os.access(beside, os.X_OK) else None)


RECORDER = f"""#!{sys.executable} -S
# Stand-in for gcloud / sbatch: logs its argv, keeps what it was given, succeeds.
import json, os, shutil, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as log:
    log.write(json.dumps([name] + args) + "\\n")
if name == "gcloud" and "scp" in args:
    shutil.copy(args[args.index("scp") + 1], os.environ["FAKE_UPLOADS"])
if name == "gcloud" and "describe" in args:
    print(os.environ.get("FAKE_STATE", "ACTIVE"))
if name == "sbatch":
    shutil.copy(args[-1], os.environ["FAKE_UPLOADS"])
    print("Submitted batch job 4242")
fail_on = os.environ.get("FAKE_FAIL_ON")
if fail_on and any(fail_on in arg for arg in args):
    sys.exit(1)
"""

TRIPWIRE = """#!/bin/sh
echo "$0 $*" >> "$FAKE_CALLS"
exit 97
"""

# What a TPU worker's venv python or a cluster's python3 does here: records how it was started.
# The stand-ins run with -S (no site-packages): they need only the standard library, and start faster.
FAKE_PYTHON = f"""#!{sys.executable} -S
import json, os, sys, time
record = {{"argv": sys.argv[1:], "cwd": os.getcwd(),
          "env": {{k: os.environ.get(k) for k in
                  ("FOO", "JAX_LOCAL_DEVICE_IDS", "SRUN_CPUS_PER_TASK", "SLURM_PROCID")}}}}
with open(os.environ["FAKE_ARGV"], "a") as log:
    log.write(json.dumps(record) + "\\n")
print("step 1 loss 0.5", flush=True)
time.sleep(float(os.environ.get("FAKE_TRAIN_SECONDS", "0")))
sys.exit(int(os.environ.get("FAKE_TRAIN_STATUS", "0")))
"""

# srun: strips its own options (logged), then runs the command once per node with that rank.
FAKE_SRUN = f"""#!{sys.executable} -S
import json, os, subprocess, sys
args = sys.argv[1:]
options = []
while args and args[0].startswith("-"):
    options.append(args.pop(0))
with open(os.environ["FAKE_CALLS"], "a") as log:
    log.write(json.dumps(["srun"] + options) + "\\n")
for rank in range(int(os.environ["SLURM_JOB_NUM_NODES"])):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID="0")
    if subprocess.call(args, env=env):
        sys.exit(1)
"""

FAKE_SCONTROL = """#!/bin/sh
[ "$*" = "show hostnames gpu[007-010]" ] || { echo "fake scontrol: unexpected: $*" >&2; exit 1; }
printf 'gpu007\\ngpu008\\ngpu009\\ngpu010\\n'
"""


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


class Fakes:
    """A bin/ folder of stand-ins, the log of their calls, and where uploads land."""

    def __init__(self, root: Path, body: str):
        self.root = root
        self.bin = root / "bin"
        self.calls_file = root / "calls.jsonl"
        self.uploads = root / "uploads"
        self.uploads.mkdir(parents=True)
        for name in ("gcloud", "sbatch", "srun", "scontrol"):
            executable(self.bin / name, body)

    def env(self, **extra: str) -> dict:
        env = dict(os.environ, PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(self.root),
                   FAKE_CALLS=str(self.calls_file), FAKE_UPLOADS=str(self.uploads))
        env.update(extra)
        return env

    def calls(self) -> list[list[str]]:
        if not self.calls_file.exists():
            return []
        return [json.loads(line) for line in self.calls_file.read_text().splitlines()]


def run(script: Path, *args: str, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def traced(stderr: str) -> list[list[str]]:
    """The commands a launcher printed ("+ cmd ..."), split the way a shell would."""
    return [shlex.split(line[2:]) for line in stderr.splitlines() if line.startswith("+ ")]


def gcloud_steps(commands: list[list[str]]) -> list[str]:
    # gcloud compute tpus tpu-vm|queued-resources VERB ...
    return [c[4] for c in commands if c[0] == "gcloud"]


def option(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def jax_pin() -> str:
    match = re.search(r'"jax==([^"]+)"', (REPO / "setup.py").read_text())
    assert match, "setup.py pins jax"
    return match.group(1)
