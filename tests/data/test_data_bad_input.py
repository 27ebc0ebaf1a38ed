"""Bad input: every case is either skipped and accounted for, or refused up front by name."""
import io
import os

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from helpers.corpus import make_corpus
from helpers.faces import UTKFACE, utkface_rows
from mefem_jax.data import augment, pipeline, records, sources
from mefem_jax.data.config import default_data_config
from mefem_jax.data.shards import build as build_shards

IMAGES = os.path.join(UTKFACE, "images")


@pytest.fixture(scope="module")
def corpus_build(tmp_path_factory):
    faces = [os.path.join(IMAGES, r["file"]) for r in utkface_rows(12)]
    root = tmp_path_factory.mktemp("corpus")
    corpus = make_corpus(str(root), faces)
    opts = build_shards.BuildOptions(images=corpus.images, labels=corpus.labels,
                                     out=str(root / "shards"), num_shards=3, workers=1,
                                     dedup="off")  # face.png and rgba.png are pixel copies of good_000.jpg
    return corpus, opts, build_shards.build(opts)


def test_the_builder_skips_and_lists_each_bad_file_with_its_reason(corpus_build):
    corpus, _, manifest = corpus_build
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == set(corpus.skipped)
    for name, word in corpus.skipped.items():
        assert word in reasons[name], (name, reasons[name])
    # The good faces between the bad rows, and the converted formats, are all written.
    assert manifest["num_records"] == len(corpus.kept) == 15
    assert manifest["label_schema"] == {"age": "int", "split": "str"}


def test_every_kept_file_reads_back_as_rgb_with_its_label(corpus_build):
    corpus, opts, _ = corpus_build
    it = pipeline.make_eval_iterator(opts.out, image_size=48, batch_size=8)
    images, ages = {}, {}
    for batch in it:
        for k in np.flatnonzero(batch["valid"]):
            images[batch["id"][k]] = batch["image"][k]
            ages[batch["id"][k]] = int(batch["age"][k])
    assert ages == corpus.kept and it.num_skipped == 0
    # PNG, RGBA, CMYK and grayscale come out as the RGB picture they were made from.
    for name, original in corpus.originals.items():
        want = augment.normalize(np.asarray(original.resize((48, 48), Image.BILINEAR)))
        assert np.abs(images[name] - want).mean() < 0.05, name


def test_an_8000px_image_is_downscaled_when_written(corpus_build):
    _, opts, _ = corpus_build
    source = sources.open_source(opts.out)
    stored = {source[i]["id"]: source[i]["image"] for i in range(len(source))}
    assert Image.open(io.BytesIO(stored["huge.jpg"])).size == (1024, 1024)
    with open(os.path.join(opts.images, "face.png"), "rb") as f:
        assert stored["face.png"] == f.read()  # not resized: stored byte for byte


def _write_shard(path, payloads):
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for payload in payloads:
        writer.write(payload)
    writer.close()


def _mixed_shard(path):
    """30 real faces with 3 broken records between them; returns the good ids."""
    rows = utkface_rows(32)
    good, payloads = [], []
    for k, row in enumerate(rows[:30]):
        with open(os.path.join(IMAGES, row["file"]), "rb") as f:
            data = f.read()
        payloads.append(records.encode_record(row["file"], {"age": int(row["age"])}, data))
        good.append(row["file"])
        if k == 4:
            payloads.append(records.encode_record("garbage", {"age": 1}, b"\x00" * 500))
        if k == 15:
            payloads.append(records.encode_record("cut", {"age": 1}, data[: len(data) // 3]))
        if k == 25:
            payloads.append(b"not a face record at all")
    _write_shard(path, payloads)
    return good


def test_undecodable_records_are_skipped_and_counted_in_eval_and_training(tmp_path):
    good = _mixed_shard(tmp_path / "mixed-00000-of-00001.array_record")
    spec = str(tmp_path / "mixed-*.array_record")

    it = pipeline.make_eval_iterator(spec, image_size=32, batch_size=16)
    ids = [i for b in it for i, v in zip(b["id"], b["valid"]) if v]
    assert ids == good and it.num_decoded == 30 and it.num_skipped == 3
    assert {s[0] for s in it.skipped} == {"garbage", "cut", "mixed-00000-of-00001.array_record[28]"}

    cfg = default_data_config()
    cfg.train, cfg.return_ids, cfg.read_threads = spec, True, 2
    train = pipeline.make_train_iterator(cfg, image_size=32, global_batch_size=10, seed=0,
                                         process_index=0, process_count=1)
    batches = [next(train) for _ in range(7)]
    train.close()
    assert sorted(i for b in batches[:3] for i in b["id"]) == sorted(good)
    # 70 decoded faces span epochs 1 and 2 entirely (3 broken records each) and part of 3.
    skipped = sum(int(b["skipped"]) for b in batches)
    assert 6 <= skipped <= 9 and all(int(b["decoded"]) == 10 for b in batches)


def test_a_damaged_chunk_inside_a_shard_costs_only_its_records(corpus_build, tmp_path):
    _, opts, manifest = corpus_build
    shard = manifest["shards"][0]
    damaged = tmp_path / shard["file"]
    data = bytearray(open(os.path.join(opts.out, shard["file"]), "rb").read())
    middle = len(data) // 3
    data[middle:middle + 64] = bytes(64)
    damaged.write_bytes(bytes(data))
    it = pipeline.make_eval_iterator(str(damaged), image_size=32, batch_size=8)
    list(it)
    assert it.num_skipped >= 1 and it.num_decoded + it.num_skipped == shard["num_records"]
    assert it.num_decoded >= shard["num_records"] - 2


def test_a_source_with_nothing_decodable_stops_with_a_clear_error(tmp_path):
    # Not even records: refused when opened.
    _write_shard(tmp_path / "junk.array_record", [b"junk %d" % i for i in range(8)])
    with pytest.raises(ValueError, match="records of .*junk.array_record can be read"):
        sources.open_source(str(tmp_path / "junk.array_record"))
    # Records whose images are all broken: training stops instead of spinning forever.
    _write_shard(tmp_path / "broken.array_record",
                 [records.encode_record(f"b{i}", {}, b"junk") for i in range(8)])
    cfg = default_data_config()
    cfg.train, cfg.max_consecutive_failures = str(tmp_path / "broken.array_record"), 20
    it = pipeline.make_train_iterator(cfg, image_size=32, global_batch_size=4, seed=0,
                                      process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="20 records in a row could not be decoded"):
        next(it)
    it.close()


def test_refused_up_front_with_the_path_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{empty} holds no image files"):
        build_shards.build(build_shards.BuildOptions(images=str(empty), out=str(tmp_path / "o")))
    assert build_shards.main([f"--images={empty}", f"--out={tmp_path / 'o'}"]) == 2

    missing = tmp_path / "nowhere" / "faces-00000-of-00001.array_record"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        sources.open_source(str(missing))
    with pytest.raises(FileNotFoundError, match="no such shard folder"):
        sources.open_source(str(tmp_path / "nowhere"))

    garbage = tmp_path / "broken.array_record"
    garbage.write_bytes(os.urandom(100_000))
    with pytest.raises(ValueError, match=f"shard {garbage} is corrupted"):
        sources.open_source(str(garbage))

    labels = tmp_path / "labels.csv"
    labels.write_text("image,age\na.jpg,3\n")
    with pytest.raises(ValueError, match="has no 'file' column"):
        build_shards.build(build_shards.BuildOptions(images=IMAGES, labels=str(labels),
                                                     out=str(tmp_path / "o")))


def test_a_shard_missing_from_a_finished_folder_is_refused(corpus_build, tmp_path):
    _, opts, manifest = corpus_build
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in [s["file"] for s in manifest["shards"]][1:] + ["manifest.json"]:
        (copy / name).write_bytes(open(os.path.join(opts.out, name), "rb").read())
    with pytest.raises(FileNotFoundError, match=manifest["shards"][0]["file"]):
        sources.open_source(str(copy))
