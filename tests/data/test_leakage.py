"""Leakage between pretraining and evaluation data (issue 24, item 4), on real UTKFace faces read in place.

The pretraining folder holds links to 20 train-split faces and re-encoded copies of 4 of the 16 test-split
faces that form the evaluation set: resized (0.85x, 1.2x), JPEG quality 65-90, shifted by a few pixels,
one of them mirrored as well.
"""
from __future__ import annotations

import csv
import json
import os

import pytest
from array_record.python import array_record_module
from PIL import Image, ImageOps

from helpers.faces import IMAGES, utkface_rows, write_labels
from helpers.runs import assert_refused, run_module
from mefem_jax.data import face_hash, records
from mefem_jax.data import manifest as manifest_lib
from mefem_jax.data.shards import build as build_shards
from mefem_jax.evaluation.data import spec_hashes, split_specs

# test face -> (scale, JPEG quality, shift in px, mirrored)
COPIES = {0: (0.85, 65, (3, -2), False), 5: (1.2, 90, (-4, 1), False), 9: (1.0, 75, (2, 2), True),
          13: (0.9, 80, (0, -3), False)}


def _copy(src, dst, scale, quality, shift, mirrored):
    with Image.open(src) as im:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
        im = im.transform(im.size, Image.AFFINE, (1, 0, shift[0], 0, 1, shift[1]))
        (ImageOps.mirror(im) if mirrored else im).save(dst, "JPEG", quality=quality)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(pretraining folder, evaluation spec, train spec, the test faces that were copied)."""
    tmp = tmp_path_factory.mktemp("leakage")
    rows = utkface_rows(400)
    train = [r for r in rows if r["split"] == "train"][:20]
    test = [r for r in rows if r["split"] == "test"][:16]
    pretrain = tmp / "pretrain"
    pretrain.mkdir()
    for r in train:
        os.symlink(IMAGES / r["file"], pretrain / r["file"])
    for k, how in COPIES.items():
        _copy(IMAGES / test[k]["file"], pretrain / f"copy_{k}.jpg", *how)
    spec = f"{write_labels(tmp / 'test.csv', test)}:images={IMAGES}"
    train_spec = f"{write_labels(tmp / 'train.csv', train)}:images={IMAGES}"
    return pretrain, spec, train_spec, {test[k]["file"]: f"copy_{k}.jpg" for k in COPIES}


def test_the_command_finds_every_copy_and_fails_above_max_leaked(data, tmp_path):
    pretrain, spec, _, copied = data
    out = tmp_path / "leaks.csv"
    done = run_module("mefem_jax.data.leakage", f"--pretrain={pretrain}", f"--eval={spec}", f"--out={out}",
                      "--max_leaked=3")
    assert_refused(done, "leakage: 4 evaluation image(s)", "--max_leaked=3")
    assert done.returncode == 1
    with open(out, newline="") as f:
        pairs = list(csv.DictReader(f))
    assert {p["eval_id"]: p["pretrain_id"] for p in pairs} == copied and len(pairs) == 4
    assert all(int(p["distance"]) <= face_hash.NEAR_DISTANCE for p in pairs)
    assert {p["eval_id"] for p in pairs if p["kind"] == "mirror"} == {f for f, c in copied.items() if c == "copy_9.jpg"}
    done = run_module("mefem_jax.data.leakage", f"--pretrain={pretrain}", f"--eval={spec}", f"--out={out}",
                      "--max_leaked=4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 image(s) with a near-duplicate" in done.stdout


def test_bad_input_is_one_line_and_status_2(data, tmp_path):
    pretrain, spec, _, _ = data
    done = run_module("mefem_jax.data.leakage", f"--pretrain={pretrain}", f"--eval={tmp_path / 'nothing'}")
    assert_refused(done, "leakage:", "nothing")
    assert done.returncode == 2
    foreign = tmp_path / "notes.csv"
    foreign.write_text("mine\n")
    done = run_module("mefem_jax.data.leakage", f"--pretrain={pretrain}", f"--eval={spec}", f"--out={foreign}")
    assert_refused(done, "leakage:", "not a leakage CSV")
    assert done.returncode == 2 and foreign.read_text() == "mine\n"


def test_shard_folders_give_their_stored_fingerprints_old_builds_are_hashed(data, tmp_path):
    pretrain, spec, _, copied = data
    out = str(tmp_path / "shards")
    build_shards.build(build_shards.BuildOptions(images=str(pretrain), out=out, num_shards=2, dedup="off"))
    stored, from_files = spec_hashes(out), spec_hashes(str(pretrain))
    assert stored.computed == 0 and from_files.computed == len(from_files) == 24
    assert dict(zip(stored.ids, stored.hashes)) == dict(zip(from_files.ids, from_files.hashes))
    found = face_hash.leaks(spec_hashes(spec), [stored])
    assert {leak.eval_id: leak.pretrain_id for leak in found} == copied
    # A build made before records held fingerprints: the same records without them, hashed on the fly.
    for shard in manifest_lib.read_manifest(out)["shards"]:
        path = os.path.join(out, shard["file"])
        old = [records.encode_record(*records.decode_record(d)) for d in records.read_shard(path)]
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for d in old:
            writer.write(d)
        writer.close()
    again = spec_hashes(out)
    assert again.computed == 24 and again.hashes == stored.hashes


def test_split_specs_keeps_each_specs_options():
    assert split_specs("a:split=train,limit=5,b,/c/d:split=test") == ["a:split=train,limit=5", "b", "/c/d:split=test"]
    assert split_specs("x:images=/data/i,split=test,y:split=train") == ["x:images=/data/i,split=test", "y:split=train"]


def test_evaluate_leaves_the_leaked_test_faces_out(data, tmp_path):
    from mefem_jax.evaluate import run_evaluation  # jax: only this test needs it

    pretrain, spec, train_spec, copied = data
    report = run_evaluation(model="random:vitti@64:width=64,depth=2,heads=2", out=tmp_path / "eval",
                            train=train_spec, test=spec, targets="age:regression", features=("cls",),
                            cache_dir=None, batch_size=16, exclude_leaked=str(pretrain))
    assert report["data"]["test"]["n"] == 16 - len(copied)
    assert report["leakage"]["excluded"] == len(copied) and set(report["leakage"]["ids"]) == set(copied)
    written = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert written["leakage"]["excluded"] == len(copied) and written["probes"][0]["n_test"] == 16 - len(copied)
