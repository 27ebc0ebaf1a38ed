"""From raw photos to anthropometric probes, on real UTKFace faces: detection, alignment to the
documented framing, landmark labels, the bad photos a clinic folder holds, and the labels training
probes through `evaluate --targets=anthropometry`.

UTKFace crops are already aligned, so the "raw" photos here are UTKFace faces scaled, shifted and
turned onto a larger canvas, as a head-and-shoulders photo would hold them."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("dlib", reason='the landmarks extra: pip install -e ".[landmarks]"')

from helpers.faces import UTKFACE, utkface_rows, write_labels
from helpers.repo import REPO
from mefem_jax.data import csv_text, sources
from mefem_jax.data.shards import build as build_shards, face_align, face_landmarks, face_proportions
from mefem_jax.data.shards.faces import NoUsableFace, face_step
from mefem_jax.data.shards.plan import BuildOptions
from mefem_jax.evaluate import run_evaluation
from mefem_jax.evaluation.data import parse_data_spec, read_folder_table
from mefem_jax.evaluation.targets import parse_targets

IMAGES = os.path.join(UTKFACE, "images")
FRAMING = face_align.Framing()  # 224 px, eyes at y = 67.2, 87.4 px apart


def face(name: str) -> Image.Image:
    with Image.open(os.path.join(IMAGES, name)) as im:
        return im.convert("RGB")


def raw_photo(im: Image.Image, angle: float = 0.0, side: int = 260, at=(150, 60),
              canvas=(520, 440)) -> Image.Image:
    """A UTKFace crop resized to `side`, pasted at `at` on a plain canvas and turned by `angle`."""
    photo = Image.new("RGB", canvas, (96, 124, 92))
    photo.paste(im.resize((side, side), Image.BICUBIC), at)
    return photo.rotate(angle, Image.BICUBIC, fillcolor=(96, 124, 92)) if angle else photo


@pytest.fixture(scope="module")
def finder():
    return face_landmarks.finder()


@pytest.fixture(scope="module")
def names():
    return [r["file"] for r in utkface_rows(24)]


def test_faces_are_found_in_most_utkface_photos(finder, names):
    found = [bool(finder.find(np.asarray(face(n)))) for n in names]
    # 196 of 200 in a larger sample (and 47 of 50 in the issue's); 24 spread over ages and groups.
    assert sum(found) >= 21, f"found a face in {sum(found)} of {len(names)}"


@pytest.mark.parametrize("angle", [0, -12, 20])
def test_alignment_levels_the_eyes_at_the_documented_framing(finder, names, angle):
    opts = BuildOptions(images="", out="", align=True)
    checked = 0
    for name in names[:8]:
        photo = raw_photo(face(name), angle=angle, side=300, at=(90, 40))
        try:
            aligned = face_step(photo, opts).aligned
        except NoUsableFace:  # a face HOG misses is the detection test's business
            continue
        assert aligned.size == (FRAMING.size, FRAMING.size) and aligned.mode == "RGB"
        again = finder.find(np.asarray(aligned))  # re-detect on the aligned crop
        assert again, name
        mid, tilt, iod = face_align.eye_frame(again[0].points)
        assert abs(np.degrees(tilt)) < 3.0, (name, np.degrees(tilt))
        assert abs(iod - FRAMING.eye_distance_px) < 0.08 * FRAMING.eye_distance_px, (name, iod)
        assert np.abs(mid - [FRAMING.size / 2, FRAMING.eye_y * FRAMING.size]).max() < 6, (name, mid)
        checked += 1
    assert checked >= 6


def test_same_photo_same_labels_and_labels_are_scale_free(finder, names):
    photo = face(names[3])
    first = face_proportions.proportions(finder.find(np.asarray(photo))[0].points)
    fresh = face_landmarks.FaceFinder()  # a new model load, as another worker would have
    assert face_proportions.proportions(fresh.find(np.asarray(photo))[0].points) == first
    assert set(first) == set(face_proportions.NAMES)
    bigger = raw_photo(photo, side=320, at=(100, 50))  # same face, 1.6x larger, elsewhere
    moved = face_proportions.proportions(finder.find(np.asarray(bigger))[0].points)
    diffs = [abs(moved[k] - first[k]) for k in face_proportions.NAMES]
    assert np.median(diffs) < 0.03, dict(zip(face_proportions.NAMES, diffs))


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory, names):
    """A clinic-like folder: good photos and every kind of bad one, with what a build must do."""
    root = tmp_path_factory.mktemp("raw")
    images = root / "images"
    images.mkdir()
    good = names[:4]
    for n in good:
        raw_photo(face(n)).save(images / n, quality=95)
    Image.new("RGB", (400, 300), (180, 170, 160)).save(images / "flat.jpg")       # no face
    face(names[5]).crop((0, 0, 40, 40)).resize((200, 200)).save(images / "corner.jpg")  # background
    Image.new("RGB", (12, 12), (90, 90, 90)).save(images / "tiny.jpg")            # under --min_side
    raw_photo(face(names[6]), side=40, at=(240, 200)).save(images / "small_face.jpg")  # 40 px face
    raw_photo(face(names[7])).convert("L").save(images / "gray.jpg")              # grayscale
    two = Image.new("RGB", (600, 360), (96, 124, 92))
    two.paste(face(names[9]).resize((260, 260)), (30, 50))
    two.paste(face(names[8]).resize((180, 180)), (360, 90))
    two.save(images / "two.jpg")                                                   # several faces
    raw_photo(face(names[10]), angle=20).save(images / "rotated.jpg")             # turned 20 degrees
    rows = [{"file": f, "group": str(i % 2)} for i, f in enumerate(sorted(os.listdir(images)))]
    return images, write_labels(str(root / "labels.csv"), rows), good


def test_bad_photos_are_skipped_or_handled_as_documented(bad_folder, finder, names, tmp_path):
    images, labels, good = bad_folder
    out = tmp_path / "shards"
    rc = build_shards.main([f"--images={images}", f"--labels={labels}", f"--out={out}", "--align",
                            "--landmark_labels", "--num_shards=2", "--workers=1"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert reasons["flat.jpg"] == reasons["corner.jpg"] == "no face found"
    assert reasons["tiny.jpg"].startswith("too small: 12x12")
    assert reasons["small_face.jpg"] == "no face found" or reasons["small_face.jpg"].startswith("face too small")
    kept = {s["id"]: s for s in (sources.open_source(str(out))[i]
                                 for i in range(manifest["num_records"]))}
    assert set(kept) == set(good) | {"gray.jpg", "two.jpg", "rotated.jpg"}
    assert manifest["faces"]["several_faces"] == ["two.jpg"]
    assert manifest["faces"]["detection_rate"] == round(len(kept) / 11, 4)
    assert "non-commercial" in manifest["faces"]["landmark_model"]
    assert manifest["faces"]["framing"]["eye_distance_px"] == pytest.approx(FRAMING.eye_distance_px)
    for name in face_proportions.NAMES:
        assert manifest["label_schema"][name] == "float"
        assert all(isinstance(r["labels"][name], float) for r in kept.values())
    for name in ("rotated.jpg", "gray.jpg", "two.jpg"):  # stored aligned: level eyes, RGB, 224 px
        crop = Image.open(io.BytesIO(kept[name]["image"]))
        assert crop.size == (224, 224) and crop.mode == "RGB"
        _, tilt, iod = face_align.eye_frame(finder.find(np.asarray(crop))[0].points)
        assert abs(np.degrees(tilt)) < 3.0 and abs(iod - FRAMING.eye_distance_px) < 7, name
    # The larger of the two faces is the one kept: its eye distance is the framing's in the crop,
    # and its labels are the larger face's own.
    larger = face_proportions.proportions(finder.find(np.asarray(face(names[9])))[0].points)
    assert np.median([abs(kept["two.jpg"]["labels"][k] - larger[k]) for k in larger]) < 0.03
    with open(out / "landmark_labels.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["file"] for r in table) == sorted(kept)
    assert float(table[0]["eye_width"]) == kept[table[0]["file"]]["labels"]["eye_width"]

    # --faces=skip drops the photo with two faces instead; --poor_fit=keep changes nothing here.
    out2 = tmp_path / "skip_several"
    assert build_shards.main([f"--images={images}", f"--labels={labels}", f"--out={out2}", "--align",
                              "--faces=skip", "--poor_fit=keep", "--num_shards=1", "--workers=1"]) == 0
    skipped = {s["file"]: s["reason"] for s in json.loads((out2 / "manifest.json").read_text())["skipped"]}
    assert skipped["two.jpg"] == "2 faces found (--faces=skip)"


def test_poor_landmark_fit_is_named(finder, names):
    good = finder.find(np.asarray(face(names[0])))[0]
    assert face_align.fit_problem(good) is None
    upside_down = face_landmarks.Face(good.box, good.score, good.points * [1, -1] + [0, 2 * good.points[:, 1].mean()])
    assert "nose and mouth not below the eyes" in face_align.fit_problem(upside_down)
    squeezed = face_landmarks.Face((0, 0, 2000, 2000), good.score, good.points)
    assert "eye distance" in face_align.fit_problem(squeezed)


def test_missing_landmarks_extra_is_one_line_exit_2(tmp_path, names):
    shadow = tmp_path / "shadow"  # a dlib that cannot be imported, first on the path
    (shadow / "dlib").mkdir(parents=True)
    (shadow / "dlib" / "__init__.py").write_text("raise ImportError('No module named dlib')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "mefem_jax.data.build_shards", f"--images={IMAGES}",
                           f"--out={tmp_path / 'o'}", "--align"], check=False, capture_output=True,
                          text=True, env=env, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if 'pip install -e ".[landmarks]"' in line]
    assert len(lines) == 1 and "dlib" in lines[0]
    assert not (tmp_path / "o").exists()


def test_one_filter_grammar_for_builder_and_evaluate(tmp_path):
    rows = utkface_rows(40)
    labels = write_labels(str(tmp_path / "labels.csv"), rows)
    assert csv_text.parse_filters("split=train, race:0|1") == (
        csv_text.Clause("split", frozenset({"train"})), csv_text.Clause("race", frozenset({"0", "1"})))
    want = sorted(r["file"] for r in rows if r["split"] == "train" and r["race"] in ("0", "1"))
    table = read_folder_table(parse_data_spec(f"{labels}:images={IMAGES},split=train,race=0|1"))
    assert sorted(r["file"] for r in table.rows) == want
    for spelling in ("--filter=race:0|1", "--filter=race=0|1"):
        out = tmp_path / spelling[-5:].replace("|", "_").replace(":", "c").replace("=", "e")
        assert build_shards.main([f"--images={IMAGES}", f"--labels={labels}", f"--out={out}",
                                  "--split=train", spelling, "--num_shards=1", "--workers=1"]) == 0
        source = sources.open_source(str(out))
        assert sorted(source[i]["id"] for i in range(len(source))) == want
    with pytest.raises(csv_text.CsvTextError, match="expected COLUMN=VALUE"):
        csv_text.parse_filters("race")


def test_landmark_labels_train_probes_through_evaluate(tmp_path):
    rows = utkface_rows(48)
    labels = write_labels(str(tmp_path / "labels.csv"), rows)
    out = tmp_path / "labelled"
    # UTKFace is already aligned: labels only, the images stay as they are.
    assert build_shards.main([f"--images={IMAGES}", f"--labels={labels}", f"--out={out}",
                              "--landmark_labels", "--num_shards=1", "--workers=1"]) == 0
    table = f"{out / 'landmark_labels.csv'}:images={IMAGES}"
    assert len(parse_targets("anthropometry")) == len(face_proportions.NAMES)
    report = run_evaluation(model="random:vitti@64:width=64,depth=2,heads=2", out=tmp_path / "eval",
                            train=f"{table},split=train", test=f"{table},split=test",
                            targets="anthropometry", features=("cls", "pixels"), cache_dir=None,
                            batch_size=16)
    probes = {(p["target"], p["features"]): p for p in report["probes"]}
    assert set(probes) == {(n, f) for n in face_proportions.NAMES for f in ("cls", "pixels")}
    for p in probes.values():
        assert p["kind"] == "regression" and p["n_train"] > 20 and p["n_test"] > 5
        assert np.isfinite(p["metrics"]["r2"]) and p["metrics"]["mae"] > 0
