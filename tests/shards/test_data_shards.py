"""Shard builder on real UTKFace faces: round trip, re-runs, interrupted builds, the CLI."""
import os

import numpy as np
import pytest

from helpers.faces import UTKFACE, utkface_rows, write_labels
from mefem_jax.data import manifest as manifest_lib, pipeline, sources
from mefem_jax.data.config import default_data_config
from mefem_jax.data.shards import build as build_shards

IMAGES = os.path.join(UTKFACE, "images")


def _opts(tmp, labels, **kw):
    kw.setdefault("num_shards", 4)
    kw.setdefault("workers", 1)
    return build_shards.BuildOptions(images=IMAGES, labels=labels, out=str(tmp / "shards"), **kw)


@pytest.fixture(scope="module")
def utk500(tmp_path_factory):
    rows = utkface_rows(500)
    tmp = tmp_path_factory.mktemp("utk500")
    labels = write_labels(str(tmp / "labels.csv"), rows)
    opts = _opts(tmp, labels, workers=2)
    return rows, opts, build_shards.build(opts)


def test_manifest_describes_the_build(utk500):
    rows, opts, manifest = utk500
    assert manifest["num_records"] == 500 and manifest["skipped"] == []
    assert [s["file"] for s in manifest["shards"]] == [
        f"faces-{k:05d}-of-00004.array_record" for k in range(4)]
    assert sum(s["num_records"] for s in manifest["shards"]) == 500
    assert manifest["label_schema"] == {"age": "int", "gender": "int", "race": "int",
                                        "split": "str"}
    assert manifest["unlisted_images"] == len(os.listdir(IMAGES)) - 500
    assert not os.path.exists(os.path.join(opts.out, ".build"))


def test_records_hold_the_original_jpeg_bytes(utk500):
    rows, opts, _ = utk500
    source = sources.open_source(opts.out)
    example = source[0]
    with open(os.path.join(IMAGES, example["id"]), "rb") as f:
        assert example["image"] == f.read()


def test_eval_reads_every_id_and_label_exactly_once(utk500):
    rows, opts, _ = utk500
    it = pipeline.make_eval_iterator(opts.out, image_size=32, batch_size=64)
    got = {}
    for batch in it:
        for k in np.flatnonzero(batch["valid"]):
            assert batch["id"][k] not in got
            got[batch["id"][k]] = (int(batch["age"][k]), int(batch["gender"][k]),
                                   int(batch["race"][k]), str(batch["split"][k]))
    want = {r["file"]: (int(r["age"]), int(r["gender"]), int(r["race"]), r["split"])
            for r in rows}
    assert got == want and it.num_skipped == 0


def test_one_training_epoch_sees_every_face_once(utk500):
    rows, opts, _ = utk500
    cfg = default_data_config()
    cfg.train, cfg.return_ids, cfg.read_threads = opts.out, True, 2
    it = pipeline.make_train_iterator(cfg, image_size=32, global_batch_size=20, seed=0,
                                      process_index=0, process_count=1)
    ids = [i for _ in range(25) for i in next(it)["id"]]
    it.close()
    assert sorted(ids) == sorted(r["file"] for r in rows)


def test_rerun_on_a_finished_build_changes_nothing(utk500):
    _, opts, manifest = utk500
    paths = [os.path.join(opts.out, s["file"]) for s in manifest["shards"]]
    before = [os.stat(p).st_mtime_ns for p in paths]
    assert build_shards.build(opts) == manifest
    assert [os.stat(p).st_mtime_ns for p in paths] == before


def test_interrupted_build_is_completed_keeping_finished_shards(tmp_path, monkeypatch):
    labels = write_labels(str(tmp_path / "labels.csv"), utkface_rows(60))
    opts = _opts(tmp_path, labels, num_shards=3)
    real_write = build_shards.write_shard
    calls = []

    def write_then_die(job):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine went away while writing the third shard
        calls.append(job.file)
        return real_write(job)

    monkeypatch.setattr(build_shards, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_shards.build(opts)
    # Unfinished: the reader refuses the folder instead of reading two thirds of it.
    with pytest.raises(FileNotFoundError, match="did not finish"):
        sources.open_source(opts.out)
    finished = {f: os.stat(os.path.join(opts.out, f)).st_mtime_ns for f in calls}
    with open(os.path.join(opts.out, "faces-00002-of-00003.array_record.tmp.999"), "wb") as f:
        f.write(b"half a shard from a crashed writer")

    monkeypatch.setattr(build_shards, "write_shard", real_write)
    manifest = build_shards.build(opts)
    assert manifest["num_records"] == 60
    assert {f: os.stat(os.path.join(opts.out, f)).st_mtime_ns for f in calls} == finished
    assert sorted(os.listdir(opts.out)) == sorted(
        [manifest_lib.MANIFEST_NAME] + [s["file"] for s in manifest["shards"]])
    assert len(sources.open_source(opts.out)) == 60


def test_a_different_build_is_refused_unless_overwrite(tmp_path):
    labels = write_labels(str(tmp_path / "labels.csv"), utkface_rows(20))
    build_shards.build(_opts(tmp_path, labels, num_shards=2))
    with pytest.raises(FileExistsError, match="different build"):
        build_shards.build(_opts(tmp_path, labels, num_shards=2, image_size=64))
    manifest = build_shards.build(_opts(tmp_path, labels, num_shards=2, image_size=64,
                                        overwrite=True))
    example = sources.open_source(str(tmp_path / "shards"))[0]
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(example["image"])).size == (64, 64)  # downscaled at write time
    assert manifest["options"]["image_size"] == 64


def test_cli_selects_a_split(tmp_path):
    rows = utkface_rows(80)
    labels = write_labels(str(tmp_path / "labels.csv"), rows)
    out = str(tmp_path / "test_split")
    rc = build_shards.main([f"--images={IMAGES}", f"--labels={labels}", f"--out={out}",
                            "--split=test", "--num_shards=2", "--workers=1"])
    assert rc == 0
    manifest = manifest_lib.read_manifest(out)
    want = sorted(r["file"] for r in rows if r["split"] == "test")
    assert manifest["num_records"] == len(want) > 0
    assert "split" not in manifest["label_schema"]
    source = sources.open_source(out)
    assert sorted(source[i]["id"] for i in range(len(source))) == want
