"""One error path for all six commands: bad input is one line `PROG: ...` on stderr and exit status 2
(cli.py), never a traceback or a page of help; `--debug` keeps the traceback. The commands run side by
side, so the test costs about one start-up."""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.repo import REPO


# (module, its name in the line, arguments that are bad input, a word the line must hold)
BAD = [
    ("mefem_jax.train", "train", ["--config=configs/vitb.py:smoke", "--workdir={tmp}/run", "--config.total_steps=0"],
     "total_steps=0"),
    ("mefem_jax.evaluate", "evaluate", ["--model=random:vitq", "--out={tmp}/eval", "--train=synthetic",
                                        "--test=synthetic", "--targets=face_width:regression"], "random:vitq"),
    ("mefem_jax.export", "export", ["--checkpoint={tmp}/missing", "--out={tmp}/out", "--format=bogus"],
     "unknown --format ['bogus']"),
    ("mefem_jax.compile_check", "compile_check", ["--config=configs/vits.py:smoke", "--topology=v9z-8"], "v9z-8"),
    ("mefem_jax.viz", "viz", ["--config=configs/vits.py:smoke", "--faces={tmp}/no_faces", "--out={tmp}/viz"],
     "no_faces"),
    ("mefem_jax.data.build_shards", "build_shards", ["--images={tmp}/no_images", "--out={tmp}/shards"],
     "no_images"),
]


def _start(module: str, args: list[str], tmp: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", module, *(a.format(tmp=tmp) for a in args)]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_every_command_says_bad_input_in_one_line_and_exits_2(tmp_path):
    procs = [(name, word, _start(module, args, tmp_path)) for module, name, args, word in BAD]
    for name, word, proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, f"{name} exited {proc.returncode}:\n{err[-2000:]}"
        assert "Traceback" not in err, err[-2000:]
        lines = [line for line in err.splitlines() if line.startswith(f"{name}: ") and word in line]
        assert len(lines) == 1, f"{name}:\n{err[-2000:]}"
        assert "USAGE" not in err and "--helpfull" not in err, f"{name} printed its help:\n{err[-2000:]}"


def test_debug_keeps_the_traceback(tmp_path):
    module, name, args, _ = BAD[2]  # export: the quickest to start
    proc = _start(module, [*args, "--debug"], tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" in err and "UsageError" in err, err[-2000:]


def test_a_cpu_machine_with_libtpu_installed_starts_quietly(tmp_path, utkface_dir):
    """With the tpu extra installed and no TPU, a command used to print libtpu's start-up errors (and,
    while another run held its lock file, advice to delete it) before anything of ours."""
    pytest.importorskip("libtpu", reason="the quiet start matters only where libtpu is installed")
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        pytest.skip("this machine has a TPU: libtpu is supposed to start")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # as a user's shell has it
    done = subprocess.run([sys.executable, "-m", "mefem_jax.viz", "--config=configs/vits.py:smoke",
                           f"--faces={utkface_dir}", "--num_faces=2", f"--out={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tpu" not in done.stderr.lower(), done.stderr[-2000:]
