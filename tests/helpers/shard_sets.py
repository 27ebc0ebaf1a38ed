"""Two small shard sets of different real faces, built by the real shard builder, for the tests of data
mixtures (tests/data/test_mixture.py reads them through the pipeline, tests/end_to_end/test_resume_mixture.py
trains on them). UTKFace is read in place; only the shards are written, under the given folder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers.faces import IMAGES, utkface_rows, write_labels
from helpers.repo import REPO

PER_SET = 30


def build_shard_sets(tmp: Path, per_set: int = PER_SET, image_size: int = 32) -> dict[str, tuple[str, set[str]]]:
    """{"set_a": (folder, files), "set_b": (folder, files)}: two shard folders of `per_set` different
    UTKFace faces each, stored at `image_size` px, 2 shards each (the two builds run concurrently)."""
    rows = utkface_rows(2 * per_set)
    sets, builds = {}, []
    for name, part in (("set_a", rows[:per_set]), ("set_b", rows[per_set:])):
        labels = write_labels(tmp / f"{name}.csv", part)
        out = tmp / name
        builds.append(subprocess.Popen(
            [sys.executable, "-m", "mefem_jax.data.build_shards", f"--images={IMAGES}", f"--labels={labels}",
             f"--out={out}", "--num_shards=2", "--workers=1", f"--image_size={image_size}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        sets[name] = (str(out), {r["file"] for r in part})
    for build in builds:
        output = build.communicate(timeout=120)[0]
        assert build.returncode == 0, output[-2000:]
    return sets


def mix_spec(sets: dict[str, tuple[str, set[str]]], a: float = 0.7, b: float = 0.3) -> str:
    """The `data.train` mixture of the two sets: 'SET_A:a;SET_B:b'."""
    return f"{sets['set_a'][0]}:{a};{sets['set_b'][0]}:{b}"
