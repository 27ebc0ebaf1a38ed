"""`evaluate` on bad flags and bad labels (issue 25, items 3-8): a constant regression target is refused
like a single class; non-finite labels are left out, counted and reported; --batch_size, --pixel_size,
--features and --grid_size are checked before --out exists, each in one line (status 2); a forward too
large for memory fails instead of hanging. Real UTKFace faces, read in place, and the tiny random encoder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.faces import IMAGES, UTKFACE, require_utkface, utkface_rows, write_labels
from helpers.repo import REPO
from helpers.tiny_configs import TINY_SPEC
from mefem_jax.evaluate import UsageError, run_evaluation
from mefem_jax.evaluation.targets import TargetError

TINY = TINY_SPEC  # 64 px / 16 px patches: a 4x4 patch grid
TIMEOUT_S = 120  # every subprocess; a hang fails the test instead of stalling the suite
# In-process runs share one compiled forward; grid_size 4 is the 4x4 patch grid itself, the finest
# grid the check lets through.
RUN = dict(features=("cls", "grid"), batch_size=16, grid_size=4)

# Command lines refused before any work: (flags, words the one line must hold).
REFUSED = {
    "zero_batch": (["--batch_size=0"], ["--batch_size", "0"]),
    "no_features": (["--features="], ["--features", "empty"]),
    # The batch makes the pooled grid (256 x 1000 x 1000 x 64 floats) too large for any memory, so the
    # code before the check hung here on every machine instead of filling one.
    "grid_too_fine": (["--grid_size=1000", "--batch_size=256"], ["--grid_size=1000", "4x4 patch grid"]),
}
# Bypasses the CLI's check: compute_embeddings asked for a grid readout no memory holds (8 x 30000^2 x 64
# floats) must raise the allocation error, not wait on the output buffer forever.
HUGE_FORWARD = f"""
from mefem_jax.evaluation.data import open_eval_data
from mefem_jax.evaluation.embeddings import compute_embeddings
from mefem_jax.weights.encoders import load_encoder
model = load_encoder({TINY!r})
compute_embeddings(model.encoder, model.params, open_eval_data({f'{UTKFACE}:split=test,limit=2'!r}, 64, 8),
                   grid_size=30000)
"""


@pytest.fixture(scope="module", autouse=True)
def subprocesses(tmp_path_factory):
    """Every subprocess of this file, started once before the first test so that they run beside each
    other and beside the in-process tests: name -> (Popen, its --out or None)."""
    require_utkface()
    started = {}
    for name, (flags, _) in REFUSED.items():
        root = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, "-m", "mefem_jax.evaluate", f"--model={TINY}",
               f"--train={UTKFACE}:split=train,limit=4", f"--test={UTKFACE}:split=test,limit=4",
               "--targets=age:regression", f"--out={root / 'out'}", f"--cache_dir={root / 'cache'}", *flags]
        started[name] = (subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True), root / "out")
    started["huge_forward"] = (subprocess.Popen([sys.executable, "-c", HUGE_FORWARD], cwd=REPO,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), None)
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"still running after {TIMEOUT_S} s (hung): {proc.args}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def refusal(done: subprocess.CompletedProcess) -> str:
    """The one line of a refused `evaluate` run: status 2, no traceback, a single `evaluate: ...` line."""
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("evaluate: ")]
    assert len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def labelled_faces(folder: Path, ages: list[str]) -> str:
    """A labels CSV of real UTKFace files with these ages, in `folder`; returns its data spec."""
    rows = utkface_rows(len(ages))
    for row, age in zip(rows, ages):
        row["age"] = age
    write_labels(folder / "labels.csv", rows)
    return f"{folder}:images={IMAGES}"


def test_a_constant_regression_target_is_refused_like_a_single_class(tmp_path):
    spec = labelled_faces(tmp_path, ["30"] * 10)
    out = tmp_path / "out"
    with pytest.raises(TargetError, match=r"target 'age' .*the train split has a single value \(30\)"):
        run_evaluation(TINY, out, train=spec, test=spec, targets="age:regression", cache_dir=tmp_path / "cache",
                       **RUN)
    assert not out.exists()  # refused after embedding: the empty --out it made is gone


def test_non_finite_labels_are_left_out_counted_and_reported(tmp_path):
    ages = [str(20 + 3 * i) for i in range(16)]
    ages[1], ages[4], ages[7], ages[10] = "inf", "-inf", "1e400", ""  # 1e400 overflows to inf; "" is missing
    spec = labelled_faces(tmp_path, ages)
    report = run_evaluation(TINY, tmp_path / "out", train=spec, test=spec, targets="age:regression",
                            cache_dir=tmp_path / "cache", **RUN)
    for row in report["probes"]:
        assert (row["n_train"], row["n_test"]) == (12, 12)
        assert (row["n_nonfinite_train"], row["n_nonfinite_test"]) == (3, 3)
        assert (row["n_missing_train"], row["n_missing_test"]) == (1, 1)
        assert np.isfinite(row["metrics"]["mae"])
    warning = "target 'age': left out 3 train and 3 test row(s) whose label is not finite"
    assert any(w.startswith(warning) for w in report["warnings"]), report["warnings"]
    assert warning in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("flag, value, words", [
    ("batch_size", -1, "--batch_size must be at least 1, got -1"),  # not "no images could be read"
    ("pixel_size", 0, "--pixel_size must be at least 1, got 0"),
    ("pixel_size", 65, "--pixel_size=65 is larger than random:vitti@64's 64 px images")])
def test_sizes_are_checked_before_out_exists(tmp_path, flag, value, words):
    spec = f"{UTKFACE}:split=test,limit=4"
    with pytest.raises(UsageError, match=words):
        run_evaluation(TINY, tmp_path / "out", train=spec, test=spec, targets="age:regression",
                       **{**RUN, flag: value})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", REFUSED)
def test_bad_flags_are_one_line_before_out_exists(subprocesses, name):
    proc, out = subprocesses[name]
    line = refusal(finish(proc))
    assert all(word in line for word in REFUSED[name][1]), line
    assert not out.exists()


def test_a_forward_too_large_for_memory_fails_instead_of_hanging(subprocesses):
    done = finish(subprocesses["huge_forward"][0])
    assert done.returncode != 0 and "RESOURCE_EXHAUSTED" in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("options, words", [
    ({"model": [TINY, "timm:vit_smal_patch16_224"]},
     "timm has no architecture 'vit_smal_patch16_224'; close names: vit_small_patch16_224"),
    ({"groups": "gender,ethnicity"}, r"\['ethnicity'\]"),
    ({"groups": "age_bin=40,20"}, "increasing"),
    ({"protocols": ("linear", "fewshot"), "shots": "1,all", "targets": "gender:classification"}, "n=1 is too few"),
    ({"protocols": ("linear", "fewshot"), "shots": "ten"}, "'ten' is neither a positive integer nor 'all'"),
    ({"protocols": ("linear", "probe")}, "--protocols: unknown \\['probe'\\]"),
    ({"saliency": -1}, "--saliency must be 0"),
])
def test_issue_23_flags_are_refused_in_one_line_before_out_is_used(tmp_path, options, words):
    """A bad encoder, group, shot or protocol flag fails before any probe runs and leaves no --out."""
    spec = f"{require_utkface()}:split=test,limit=4"
    args = {"model": TINY, "train": spec, "test": spec, "targets": "age:regression", **RUN, **options}
    with pytest.raises(ValueError, match=words) as err:
        run_evaluation(out=tmp_path / "out", cache_dir=None, **args)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
