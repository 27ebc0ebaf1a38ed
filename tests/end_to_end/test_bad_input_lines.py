"""Bad input gets one line that names the file (and line), or is skipped and listed, never a raw
traceback: symlink loops and dangling links, non-UTF-8 label files, damaged weights files, and an
image folder with nothing usable. Real faces from ../shared/data/utkface, read in place."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers.faces import UTKFACE, utkface_rows, write_labels
from mefem_jax.weights import encoders
from mefem_jax.weights import release as export_lib
from mefem_jax.weights.timm_keys import ConversionError

from helpers.runs import assert_refused, run_module
from helpers.tiny_configs import SMALLEST_EXPORT, tiny_params
from mefem_jax.evaluation.data import DataSpecError, parse_data_spec, read_folder_table

IMAGES = os.path.join(UTKFACE, "images")


def build_cli(images: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_module("mefem_jax.data.build_shards", f"--images={images}", f"--out={out}",
               "--num_shards=2", "--workers=1", *flags)


def test_dangling_and_looping_symlinks_are_skipped_and_listed(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    faces = [r["file"] for r in utkface_rows(4)]
    for name in faces:  # links to the real faces: read in place, never copied
        (images / name).symlink_to(os.path.join(IMAGES, name))
    (images / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (images / "loop_a.jpg").symlink_to(images / "loop_b.jpg")
    (images / "loop_b.jpg").symlink_to(images / "loop_a.jpg")

    done = build_cli(str(images), tmp_path / "shards")
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["num_records"] == len(faces)
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"gone.jpg", "loop_a.jpg", "loop_b.jpg"}
    assert "dangling" in reasons["gone.jpg"] and "loop" in reasons["loop_a.jpg"]
    assert all(f"skipped {name}" in done.stderr for name in reasons)  # and in the log


def test_a_folder_of_only_bad_images_exits_non_zero(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "text.jpg").write_text("not a picture\n")
    (images / "empty.png").write_bytes(b"")
    with open(os.path.join(IMAGES, utkface_rows(1)[0]["file"]), "rb") as f:
        (images / "truncated.jpg").write_bytes(f.read()[:300])  # a real face, cut short
    done = build_cli(str(images), tmp_path / "shards")
    assert_refused(done, "nothing usable", str(images))
    assert not (tmp_path / "shards" / "manifest.json").exists()


@pytest.fixture
def latin1_labels(tmp_path) -> Path:
    """A labels CSV of real faces whose 4th line (3rd row) carries a Latin-1 byte."""
    rows = utkface_rows(5)
    for r in rows:
        r["note"] = "ok"
    path = Path(write_labels(str(tmp_path / "labels.csv"), rows))
    lines = path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b",ok", ",caf\u00e9".encode("latin-1"))
    path.write_bytes(b"\n".join(lines))
    return path


def test_a_non_utf8_labels_csv_is_named_with_its_line(latin1_labels, tmp_path):
    done = build_cli(IMAGES, tmp_path / "shards", f"--labels={latin1_labels}")
    assert_refused(done, f"{latin1_labels} line 4", "UTF-8")
    with pytest.raises(DataSpecError, match=f"{latin1_labels} line 4: byte 0xe9 .* not UTF-8"):
        read_folder_table(parse_data_spec(f"{latin1_labels}:images={IMAGES}"))


@pytest.fixture(scope="module")
def damaged_weights(tmp_path_factory) -> list[Path]:
    """A truncated real export and a text file, both named .safetensors."""
    tmp = tmp_path_factory.mktemp("weights")
    cfg = SMALLEST_EXPORT
    good = export_lib.export_folder(tiny_params(cfg), cfg, tmp / "export") / "model.safetensors"
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    text = tmp / "notes.safetensors"
    text.write_text("these are not weights\n")
    return [truncated, text]


def test_damaged_weights_are_named_by_train_evaluate_and_export(damaged_weights, tmp_path):
    cfg = SMALLEST_EXPORT
    for path in damaged_weights:
        # train --config.init_from goes through load_encoder_params.
        with pytest.raises(ConversionError) as info:
            encoders.load_encoder_params(path, cfg)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    path = damaged_weights[0]
    assert_refused(run_module("mefem_jax.export", f"--checkpoint={path}", f"--out={tmp_path / 'out'}"),
                   f"export: cannot read {path}", "safetensors")
    assert not (tmp_path / "out").exists()
    assert_refused(run_module("mefem_jax.evaluate", f"--model={path}", f"--out={tmp_path / 'report'}",
                       "--train=synthetic", "--test=synthetic", "--targets=face_width:regression"),
                   f"evaluate: cannot read {path}", "safetensors")
