"""What a resume may change, and what it refuses (issue 25 items 1, 2 and 11).

One tiny run (test_resume.py's, on a shard folder of real UTKFace faces built by the real builder) is
made once; every refusal is tried against it in this process, where it stops before any array is read.
Two subprocesses only: that run, and one resume through the command line with `--allow_config_change`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.faces import UTKFACE, utkface_rows, write_labels
from helpers.repo import REPO
from mefem_jax import cli
from mefem_jax import train as train_module
from mefem_jax.config_checks import ConfigError
from mefem_jax.training.checkpoint import Checkpointer
from mefem_jax.training.run_record import FIXED, HISTORY_NAME, RESUMABLE, ResumeCheck, ResumeRefusedError
from helpers.runs import (RUN_TIMEOUT_S, TINY, TOTAL, complete_steps, logged_steps, resumed_from, run,
                          run_config)

BUILD_TIMEOUT_S = 300
RESUMED = 16  # the newest checkpoint once step 20's is removed, so that a resume has steps left to do


def _build(out: Path, rows: list[dict]) -> subprocess.Popen:
    labels = write_labels(str(out.with_suffix(".csv")), rows)
    return subprocess.Popen([sys.executable, "-m", "mefem_jax.data.build_shards",
                             f"--images={os.path.join(UTKFACE, 'images')}", f"--labels={labels}", f"--out={out}",
                             "--num_shards=1", "--image_size=128", "--workers=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def config(**dotted):
    """The config of test_resume.py's run (its TINY keys, as `Run` passes them), with `dotted` changes."""
    return run_config(**dotted)


def fingerprint(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["fingerprint"]


@pytest.fixture(scope="module")
def trained(train_env, tmp_path_factory):
    """Shard folders A (16 faces) and B (another build, 24 faces); a finished 20-step run on A, its step-20
    save removed."""
    base = tmp_path_factory.mktemp("refusals")
    shards = {"a": base / "shards_a", "b": base / "shards_b"}
    builds = [_build(shards["a"], utkface_rows(16)), _build(shards["b"], utkface_rows(40)[-24:])]
    try:
        for build in builds:
            out, _ = build.communicate(timeout=BUILD_TIMEOUT_S)
            assert build.returncode == 0, out[-3000:]
    finally:
        for build in builds:
            if build.poll() is None:  # the other build, when one failed or timed out
                build.kill()
                build.wait()
    workdir = base / "run"
    r = run(train_env, workdir, "trained", data__train=shards["a"])
    assert r.proc.returncode == 0, r.tail()
    assert complete_steps(workdir) == [12, 16, 20]
    shutil.rmtree(workdir / "checkpoints" / "20")
    return workdir, shards


def snapshot(workdir: Path) -> dict:
    """Every file of the run with its content's size and mtime: a refusal must change none of them."""
    return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(workdir.rglob("*")) if p.is_file() and p.name != ".lock"}


def saved_at(workdir: Path, step: int) -> dict:
    """What the step saved beside its state, as a resume's check sees it."""
    ckpt = Checkpointer(workdir, every_steps=4)
    try:
        return ckpt.saved_beside(step)
    finally:
        ckpt.close()


def refusal(workdir: Path, resume, allow=()) -> str:
    """train(resume) on `workdir`, which must refuse in one line (status 2) and leave the run as it was."""
    before = snapshot(workdir)
    with pytest.raises(ResumeRefusedError) as error:
        train_module.train(resume, workdir, allow)
    message = str(error.value)
    assert cli.exit_status(error.value) == cli.EXIT_BAD_INPUT and cli.one_line(message) == message, message
    assert snapshot(workdir) == before
    assert not (workdir / HISTORY_NAME).exists()
    return message


# -- defect 1: changed settings -------------------------------------------------------------------------

def test_changed_batch_size_and_mask_strategy_are_refused_naming_key_old_and_new(trained):
    workdir, shards = trained
    changed = config(**{"data.train": str(shards["a"]), "data.batch_size": 4, "mask.strategy": "multiblock"})
    message = refusal(workdir, changed)
    assert f"resuming {workdir} from step {RESUMED}" in message
    assert "data.batch_size: checkpoint has 8, this run has 4" in message
    assert "mask.strategy: checkpoint has 'stripes', this run has 'multiblock'" in message
    assert "--allow_config_change=data.batch_size,mask.strategy" in message
    # The flag naming one of the two still refuses the other.
    message = refusal(workdir, changed, allow=["data.batch_size"])
    assert "data.batch_size" not in message and "mask.strategy: checkpoint has 'stripes'" in message


def test_worker_count_cannot_change_even_with_the_flag(trained):
    """Grain cannot restore a data position saved under another worker count: a resume that tried would
    set every checkpoint aside as unreadable."""
    workdir, shards = trained
    saved = saved_at(workdir, RESUMED)
    more_workers = config(**{"data.train": str(shards["a"]), "data.workers": 2})
    with pytest.raises(ResumeRefusedError, match=r"data.workers: checkpoint has 0, this run has 2 \(cannot change"):
        ResumeCheck(more_workers, workdir, ["data.workers"])(RESUMED, saved)


def test_an_unknown_key_in_the_flag_is_refused_before_the_workdir_is_touched(tmp_path):
    with pytest.raises(ConfigError, match=r"--allow_config_change names data.bach_size, which is not a config key"):
        train_module.train(config(), tmp_path / "run", ["data.bach_size"])
    assert not (tmp_path / "run").exists()


# -- defect 2: other data ---------------------------------------------------------------------------------

def test_a_rebuilt_shard_folder_is_refused_naming_both_fingerprints(trained):
    workdir, shards = trained
    a, old = shards["a"], shards["a"].with_name("shards_a_original")
    a.rename(old)
    shutil.copytree(shards["b"], a)  # another build under the path the run trained on
    try:
        message = refusal(workdir, config(**{"data.train": str(a)}))
    finally:
        shutil.rmtree(a)
        old.rename(a)
    assert (f"data.train: checkpoint trained on {a} (fingerprint {fingerprint(a)[:12]}), "
            f"this run reads {a} (fingerprint {fingerprint(shards['b'])[:12]})") in message
    assert "--allow_config_change=data.train " in message


def test_the_same_build_moved_elsewhere_is_the_same_data(trained, tmp_path):
    workdir, shards = trained
    moved = tmp_path / "moved"
    shutil.copytree(shards["a"], moved)
    saved = saved_at(workdir, RESUMED)
    assert saved["data_identity"] == {"spec": str(shards["a"]), "fingerprint": fingerprint(shards["a"])}
    assert ResumeCheck(config(**{"data.train": str(moved)}), workdir)(RESUMED, saved) == {}
    # A checkpoint saved before data identities were kept is judged by its spec's text.
    older = dict(saved, data_identity=None)
    assert ResumeCheck(config(**{"data.train": str(shards["a"])}), workdir)(RESUMED, older) == {}
    with pytest.raises(ResumeRefusedError, match=rf"data.train: checkpoint trained on '{shards['a']}', this run"):
        ResumeCheck(config(**{"data.train": str(moved)}), workdir)(RESUMED, older)


# -- what a resume may change, and the record of it ----------------------------------------------------------

@pytest.fixture(scope="module")
def overridden(trained, train_env, tmp_path_factory):
    """A copy of the run resumed through the command line on folder B with another data seed (both named
    by the flag), another log cadence and more read threads (both resumable)."""
    source, shards = trained
    workdir = tmp_path_factory.mktemp("overridden") / "run"
    shutil.copytree(source, workdir)
    changed = {"data.train": str(shards["b"]), "data.seed": 1, "log_every": 2, "data.read_threads": 2}
    cmd = [sys.executable, "-m", "mefem_jax.train", "--config=configs/vits.py:smoke", f"--workdir={workdir}",
           *[f"--config.{k}={v}" for k, v in dict(TINY, **changed).items()],
           "--allow_config_change=data.train,data.seed"]
    done = subprocess.run(cmd, cwd=REPO, env=train_env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert resumed_from(done.stderr) == RESUMED, done.stderr[-3000:]
    return workdir, shards, changed


def test_allowed_and_flagged_changes_go_on_and_are_recorded_in_the_history(overridden):
    workdir, shards, changed = overridden
    assert logged_steps(workdir) == list(range(1, RESUMED + 1)) + [18, 20]  # log_every 2 from the resume on
    (entry,) = [json.loads(line) for line in (workdir / HISTORY_NAME).read_text().splitlines()]
    assert entry["step"] == RESUMED and entry["time"]
    flag = "--allow_config_change"
    assert {c["key"]: (c["old"], c["new"], c["by"]) for c in entry["changes"]} == {
        "data.read_threads": (4, 2, "resumable"),
        "data.seed": (0, 1, flag),
        "data.train": ({"spec": str(shards["a"]), "fingerprint": fingerprint(shards["a"])},
                       {"spec": str(shards["b"]), "fingerprint": fingerprint(shards["b"])}, flag),
        "log_every": (1, 2, "resumable"),
    }
    latest = json.loads((workdir / "config.json").read_text())  # the latest start's config
    assert latest["data"]["train"] == str(shards["b"]) and latest["data"]["seed"] == 1


def test_a_rerun_under_the_new_settings_neither_refuses_nor_records_again(overridden):
    """The saves after the resume carry the new settings and data: they are what the next resume checks."""
    workdir, shards, changed = overridden
    history = (workdir / HISTORY_NAME).read_text()
    summary = train_module.train(config(**changed), workdir)  # nothing left to do: no step, no compile
    assert summary["step"] == TOTAL
    assert (workdir / HISTORY_NAME).read_text() == history


# -- defect 3: a failed init_from leaves nothing --------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "csv", "width"])
def test_a_failed_init_from_leaves_no_workdir(trained, tmp_path, case):
    source, shards = trained
    init_from = {"missing": tmp_path / "no_such_weights", "csv": shards["a"].with_suffix(".csv"), "width": source}
    start = config(**{"init_from": str(init_from[case]), "model.width": 32 if case == "width" else 64})
    workdir = tmp_path / "run"
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        train_module.train(start, workdir)
    assert cli.exit_status(error.value) == cli.EXIT_BAD_INPUT
    assert not workdir.exists(), sorted(p.name for p in workdir.iterdir())
    if case == "width":  # one short line naming the cause; the cause (--debug's traceback) lists each key
        message = str(error.value)
        assert message == (f"init_from {source}: width 64 != model.width 32 "
                           f"({len(error.value.__cause__.problems)} parameters do not fit); --debug lists them")
        assert len(error.value.__cause__.problems) > 10


def test_the_readme_table_names_every_resumable_key():
    """README's "When things go wrong" table is the user's copy of RESUMABLE and FIXED: keep them in step."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## When things go wrong"):]
    section = section[:section.index("\n## ", 1)]
    missing = [k for k in (*RESUMABLE, *FIXED) if f"`{k}`" not in section and f"`{k}.*`" not in section]
    assert not missing, f"README's 'When things go wrong' does not name {missing}"
