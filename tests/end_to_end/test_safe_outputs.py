"""Output folders the user already had: `export --out` and `build_shards --out` never delete or
replace a file they did not write, and refuse in one line instead. Real command lines, real faces."""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
from pathlib import Path

import pytest

from helpers.faces import UTKFACE, utkface_rows, write_labels
from helpers.runs import assert_refused, run_module
from helpers.tiny_configs import SMALLEST_EXPORT, tiny_params
from mefem_jax.data.shards import build as build_shards
from mefem_jax.weights import release as export_lib

IMAGES = os.path.join(UTKFACE, "images")
@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """An exported tiny encoder (weights + config.json): the --checkpoint the CLI re-exports."""
    cfg = SMALLEST_EXPORT
    return export_lib.export_folder(tiny_params(cfg), cfg, tmp_path_factory.mktemp("source"))


def export(source: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_module("mefem_jax.export", f"--checkpoint={source}", f"--out={out}", *flags)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# export --out
# ---------------------------------------------------------------------------------------------
def test_export_never_replaces_a_readme_it_did_not_write(source, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "README.md").write_text("# My notes on this model\n")
    for flags in ([], ["--overwrite"]):  # --overwrite is for our own files only
        assert_refused(export(source, out, *flags), str(out))
        assert snapshot(out) == {"README.md": b"# My notes on this model\n"}


def test_export_replaces_only_its_own_earlier_export(source, tmp_path):
    out = tmp_path / "release"
    assert export(source, out).returncode == 0
    first = snapshot(out)
    assert set(first) == {"model.safetensors", "config.json", "README.md"}

    assert_refused(export(source, out), str(out), "--overwrite")
    assert snapshot(out) == first

    (out / "notes.txt").write_text("the user's file, beside the export\n")
    done = export(source, out, "--overwrite")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "the user's file, beside the export\n"

    (out / "README.md").write_text("# Rewritten by hand: no longer the generated card\n")
    before = snapshot(out)
    assert_refused(export(source, out, "--overwrite"), f"{out}/README.md")
    assert snapshot(out) == before


def test_exported_files_share_one_mode(tmp_path):
    """model.safetensors is as readable as config.json and README.md (0644 under umask 022)."""
    cfg = SMALLEST_EXPORT
    out = export_lib.export_folder(tiny_params(cfg), cfg, tmp_path / "export", formats=("safetensors", "pth"))
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert modes == {name: oct(0o666 & ~umask)
                     for name in ("model.safetensors", "model.pth.tar", "config.json", "README.md")}


# ---------------------------------------------------------------------------------------------
# build_shards --out
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def labels(tmp_path) -> str:
    return write_labels(str(tmp_path / "labels.csv"), utkface_rows(6))


def build_cli(labels: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_module("mefem_jax.data.build_shards", f"--images={IMAGES}", f"--labels={labels}",
               f"--out={out}", "--num_shards=2", "--workers=1", *flags)


def test_build_shards_refuses_a_folder_that_is_not_a_build(labels, tmp_path):
    """Files that merely look like the builder's leftovers are the user's: nothing is deleted."""
    out = tmp_path / "mine"
    (out / ".build").mkdir(parents=True)
    (out / ".build" / "cache.o").write_bytes(b"another tool's build folder")
    (out / "faces-00000-of-00007.array_record").write_bytes(b"a shard of some other dataset")
    (out / "faces-00001-of-00002.array_record.tmp.42").write_bytes(b"someone's temp file")
    before = snapshot(out)
    for flags in ([], ["--overwrite"]):
        assert_refused(build_cli(labels, out, *flags), str(out), "pick a new or empty --out")
        assert snapshot(out) == before


def test_build_shards_cleans_only_its_own_folder_and_logs_it(labels, tmp_path, caplog):
    opts = build_shards.BuildOptions(images=IMAGES, labels=labels, out=str(tmp_path / "shards"),
                                     num_shards=3, workers=1)
    build_shards.build(opts)
    (tmp_path / "shards" / "notes.txt").write_text("kept\n")
    caplog.set_level(logging.INFO, logger="build_shards")
    manifest = build_shards.build(dataclasses.replace(opts, num_shards=2, overwrite=True))
    assert manifest["num_records"] == 6
    on_disk = sorted(os.listdir(tmp_path / "shards"))
    assert on_disk == ["faces-00000-of-00002.array_record", "faces-00001-of-00002.array_record",
                       "manifest.json", "notes.txt"]
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removing ")]
    for k in range(3):  # each deleted shard of the 3-shard build is named in the log
        assert any(f"faces-0000{k}-of-00003.array_record" in m for m in removed), removed
    assert any(m.startswith(f"removing {tmp_path / 'shards' / '.build'}") for m in removed), removed
