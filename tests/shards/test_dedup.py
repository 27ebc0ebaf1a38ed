"""build_shards --dedup (issue 24, item 3): twins planted among real UTKFace faces are removed and listed.

The folder holds links to 24 faces (read in place) and three planted twins, each named to sort right after
the face it copies and so fall in another shard: one face saved again as PNG (other bytes, the same pixels:
an exact duplicate), one re-encoded as JPEG at quality 70 (near), one mirrored (near, through the mirror's
hash).
"""
from __future__ import annotations

import io
import logging
import os

import pytest
from PIL import Image, ImageOps

from helpers.faces import IMAGES, utkface_rows
from mefem_jax.data import face_hash, records
from mefem_jax.data import manifest as manifest_lib
from mefem_jax.data.shards import build as build_shards

FACES = 24
TWINS = {0: ("exact", ".copy.png"), 12: ("near", ".q70.jpg"), 23: ("mirror", ".mirrored.jpg")}  # face: twin


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(image folder, the original faces in file order)."""
    root = tmp_path_factory.mktemp("dedup") / "images"
    root.mkdir()
    faces = sorted(r["file"] for r in utkface_rows(FACES))
    for f in faces:
        os.symlink(IMAGES / f, root / f)
    for k, (kind, suffix) in TWINS.items():
        with Image.open(IMAGES / faces[k]) as im:
            im = ImageOps.mirror(im) if kind == "mirror" else im
            out = io.BytesIO()
            im.save(out, "PNG" if kind == "exact" else "JPEG", quality=70 if kind == "near" else 90)
        (root / (faces[k] + suffix)).write_bytes(out.getvalue())
    return root, faces


def _build(folder, out, **kw):
    opts = build_shards.BuildOptions(images=str(folder), out=str(out), num_shards=3, workers=1, **kw)
    return opts, build_shards.build(opts)


def _ids_and_headers(out) -> dict[str, dict]:
    manifest = manifest_lib.read_manifest(str(out))
    headers = [records.decode_header(data) for s in manifest["shards"]
               for data in records.read_shard(os.path.join(out, s["file"]))]
    return {h["id"]: h for h in headers}


def test_near_removes_every_planted_twin_and_lists_it_with_the_face_it_copies(folder, tmp_path):
    root, faces = folder
    _, manifest = _build(root, tmp_path / "near", dedup="near")
    section = manifest["duplicates"]
    assert (section["mode"], section["removed"], section["exact"], section["near"]) == ("near", 3, 1, 2)
    assert section["max_distance"] == face_hash.NEAR_DISTANCE
    listed = {g["kept"]: [(r["file"], r["kind"]) for r in g["removed"]] for g in section["groups"]}
    assert listed == {faces[k]: [(faces[k] + suffix, kind)] for k, (kind, suffix) in TWINS.items()}
    assert all(r["distance"] <= face_hash.NEAR_DISTANCE for g in section["groups"] for r in g["removed"])
    headers = _ids_and_headers(tmp_path / "near")
    assert sorted(headers) == faces and manifest["num_records"] == FACES
    assert sum(s["num_records"] for s in manifest["shards"]) == FACES
    # Every record stores its fingerprints: the leakage check reads them instead of decoding again.
    with open(IMAGES / faces[5], "rb") as f:
        assert headers[faces[5]]["hash"] == face_hash.hash_bytes(f.read()).to_record()


def test_exact_removes_only_the_same_pixels_and_off_keeps_everything(folder, tmp_path):
    root, faces = folder
    _, exact = _build(root, tmp_path / "exact")  # the default
    assert exact["duplicates"]["mode"] == "exact" and exact["duplicates"]["removed"] == 1
    assert exact["duplicates"]["groups"] == [
        {"kept": faces[0], "removed": [{"file": faces[0] + ".copy.png", "distance": 0, "kind": "exact"}]}]
    assert exact["num_records"] == FACES + 2
    _, off = _build(root, tmp_path / "off", dedup="off")
    assert off["duplicates"] == {"mode": "off"} and off["num_records"] == FACES + 3
    assert len({exact["fingerprint"], off["fingerprint"]}) == 2


def test_another_dedup_is_another_build(folder, tmp_path):
    root, _ = folder
    opts, manifest = _build(root, tmp_path / "shards", dedup="near")
    assert build_shards.build(opts) == manifest  # the same command: nothing to do
    with pytest.raises(FileExistsError, match="different build"):
        _build(root, tmp_path / "shards", dedup="exact")
    _, exact = _build(root, tmp_path / "shards", dedup="exact", overwrite=True)
    assert exact["duplicates"]["removed"] == 1 and exact["fingerprint"] != manifest["fingerprint"]


def test_a_build_interrupted_while_removing_duplicates_is_completed(folder, tmp_path, monkeypatch):
    root, faces = folder
    real = build_shards.remove_records
    done = []

    def remove_then_die(opts, status, drop):
        if done:
            raise KeyboardInterrupt  # the machine went away before the second shard was rewritten
        done.append(status["file"])
        return real(opts, status, drop)

    monkeypatch.setattr(build_shards, "remove_records", remove_then_die)
    with pytest.raises(KeyboardInterrupt):
        _build(root, tmp_path / "shards", dedup="near")
    rewritten = os.stat(tmp_path / "shards" / done[0]).st_mtime_ns
    monkeypatch.setattr(build_shards, "remove_records", real)
    _, manifest = _build(root, tmp_path / "shards", dedup="near")
    assert manifest["duplicates"]["removed"] == 3 and sorted(_ids_and_headers(tmp_path / "shards")) == faces
    assert os.stat(tmp_path / "shards" / done[0]).st_mtime_ns == rewritten  # finished: kept as it was


def test_cli_reports_the_counts_in_its_last_line(folder, tmp_path, caplog):
    root, _ = folder
    with caplog.at_level(logging.INFO, logger="build_shards"):
        rc = build_shards.main([f"--images={root}", f"--out={tmp_path / 'cli'}", "--num_shards=2", "--workers=1",
                                "--dedup=near"])
    assert rc == 0
    assert "3 duplicates removed (1 exact, 2 near)" in caplog.records[-1].getMessage()
    assert build_shards.main([f"--images={root}", f"--out={tmp_path / 'bad'}", "--dedup=fuzzy"]) == 2
