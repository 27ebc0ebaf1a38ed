"""`--targets=landmarks`: the NME against hand-computed values, the target's parsing, and the landmark probe
on real UTKFace faces' points (dlib's fit, as `build_shards --landmark_labels` stores them) from the 16 px
pixel readout, against a float64 ridge and leave-one-out written out here and against the mean shape."""
from __future__ import annotations

import numpy as np
import pytest

from helpers.faces import IMAGES, load_faces, utkface_rows
from mefem_jax.data.shards.landmark_points import point_labels
from mefem_jax.evaluation.embeddings import Embeddings
from mefem_jax.evaluation.landmarks import LANDMARK_COLUMNS, landmark_probe, nme
from mefem_jax.evaluation.probes import RIDGE_ALPHAS
from mefem_jax.evaluation.targets import TargetError, check_columns, parse_targets


def test_nme_is_the_mean_point_error_over_the_outer_eye_corner_distance():
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 5, (3, 68, 2))
    true[0, 36], true[0, 45] = (0, 0), (2, 0)       # inter-ocular distance 2
    true[1, 36], true[1, 45] = (1, 1), (1, 4)       # 3, vertical
    pred = true.copy()
    pred[0] += (0.3, 0.4)                           # every point 0.5 off: 0.5 / 2
    pred[1, 10] += (3, 4)                           # one point 5 off: 5 / 68 / 3
    pred[2] += rng.normal(0, 0.2, (68, 2))
    errors = [np.hypot(*(pred[2, k] - true[2, k])) for k in range(68)]
    third = sum(errors) / 68 / np.hypot(*(true[2, 36] - true[2, 45]))
    np.testing.assert_allclose(nme(pred, true), [0.25, 5 / 68 / 3, third], rtol=1e-12)
    assert nme(pred.astype(np.float32), true).dtype == np.float64
    with pytest.raises(ValueError, match=r"\[n, 68, 2\]"):
        nme(pred[:, :5], true[:, :5])


def test_landmarks_parses_alone_and_beside_other_targets():
    (alone,) = parse_targets("landmarks")
    assert (alone.name, alone.kind, alone.columns) == ("landmarks", "landmarks", LANDMARK_COLUMNS)
    assert LANDMARK_COLUMNS[:3] == ("lm00_x", "lm00_y", "lm01_x") and len(LANDMARK_COLUMNS) == 136
    mixed = parse_targets("age:regression,landmarks,anthropometry")
    assert [t.name for t in mixed[:3]] == ["age", "landmarks", "eye_width"]
    with pytest.raises(TargetError, match=r"names \['landmarks'\] twice"):
        parse_targets("landmarks,landmarks")
    # Data without the points: one short message, not 136 column names.
    with pytest.raises(TargetError) as err:
        check_columns(parse_targets("landmarks"), ["file", "age"], "train")
    assert "136 landmark point columns (lm00_x ...)" in str(err.value) and "lm01_x" not in str(err.value)
    assert "build_shards --landmark_labels" in str(err.value)


@pytest.fixture(scope="module")
def faces():
    """100 UTKFace faces (those HOG finds): (files, [n, 68, 2] points in the image frame, split)."""
    pytest.importorskip("dlib", reason='the landmarks extra: pip install -e ".[landmarks]"')
    from PIL import Image

    from mefem_jax.data.shards import face_landmarks

    # UTKFace faces fill their 200 px crops: HOG finds them without upsampling, 3x faster than the build's.
    finder = face_landmarks.FaceFinder(upsample=0)
    files, points, split = [], [], []
    for row in utkface_rows(100):
        with Image.open(IMAGES / row["file"]) as im:
            photo = im.convert("RGB")
        found = finder.find(np.asarray(photo))
        if found:
            labels = point_labels(found[0].points, *photo.size)  # what a --landmark_labels build stores
            files.append(IMAGES / row["file"])
            points.append([labels[c] for c in LANDMARK_COLUMNS])
            split.append(row["split"])
    return files, np.asarray(points).reshape(-1, 68, 2), np.asarray(split)


def _embeddings(pixels: np.ndarray, points: np.ndarray) -> Embeddings:
    """Labels as text, as a landmark_labels.csv reaches evaluate."""
    flat = points.reshape(len(points), -1)
    labels = {c: np.array([str(float(v)) for v in flat[:, k]]) for k, c in enumerate(LANDMARK_COLUMNS)}
    return Embeddings(ids=np.arange(len(points)).astype(str), features={"pixels": pixels}, labels=labels)


def _ridge(gram: np.ndarray, fit: np.ndarray, new: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """float64 ridge with an unpenalised intercept fitted on the rows `fit`, predicting the rows `new`, in
    its dual form (fewer faces than pixels): `gram` is x x^T over all rows, centred here on the fit rows."""
    k_fit, k_new = gram[np.ix_(fit, fit)], gram[np.ix_(new, fit)]
    col = k_fit.mean(0)
    centred_fit = k_fit - col[None] - col[:, None] + col.mean()
    centred_new = k_new - k_new.mean(1, keepdims=True) - col[None] + col.mean()
    my = y[fit].mean(0)
    return centred_new @ np.linalg.solve(centred_fit + alpha * np.eye(len(fit)), y[fit] - my) + my


def test_probe_on_real_faces_beats_the_mean_shape_and_matches_a_float64_ridge(faces):
    files, points, split = faces
    train, test = split == "train", split != "train"
    assert train.sum() >= 60 and test.sum() >= 12
    pixels = load_faces(files, 16).reshape(len(files), -1)
    emb_train, emb_test = _embeddings(pixels[train], points[train]), _embeddings(pixels[test], points[test])
    emb_train.labels["lm10_y"][0] = ""       # a face with a point missing is left out, and counted
    emb_test.labels["lm67_x"][1] = "nan"
    row, result = landmark_probe(emb_train, emb_test, "pixels", intervals=True)

    assert (row["target"], row["kind"], row["features"]) == ("landmarks", "landmarks", "pixels")
    assert (row["n_train"], row["n_missing_train"]) == (train.sum() - 1, 1)
    assert (row["n_test"], row["n_missing_test"], row["n_nonfinite_test"]) == (test.sum() - 1, 1, 0)
    y_train, x_train = points[train][1:], pixels[train][1:].astype(np.float64)
    y_test, x_test = np.delete(points[test], 1, 0), np.delete(pixels[test], 1, 0).astype(np.float64)

    # The alpha: exact leave-one-out over the grid, refitting without each face in turn (the scaler
    # fitted once on all of train, as the probe's pipeline does), squared error over all 136 coordinates.
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0
    xs = (np.concatenate([x_train, x_test]) - mean) / std
    gram, n = xs @ xs.T, len(y_train)
    flat = np.concatenate([y_train, y_test]).reshape(len(xs), -1)  # test rows: never fitted on
    rows = np.arange(n)
    loo = [np.mean([(_ridge(gram, np.delete(rows, i), rows[i:i + 1], flat, a)[0] - flat[i]) ** 2
                    for i in rows]) for a in RIDGE_ALPHAS]
    assert row["penalty"]["alpha"] == RIDGE_ALPHAS[int(np.argmin(loo))]
    want = _ridge(gram, rows, np.arange(n, len(xs)), flat, row["penalty"]["alpha"])
    want = np.clip(want, flat[:n].min(0), flat[:n].max(0))
    np.testing.assert_allclose(result.y_pred.reshape(len(y_test), -1), want, atol=1e-6)
    np.testing.assert_array_equal(result.y_true, y_test)

    metrics = row["metrics"]
    per_face = nme(want.reshape(-1, 68, 2), y_test)
    np.testing.assert_allclose(result.per_face_nme, per_face, atol=1e-6)
    assert metrics["nme"] == pytest.approx(per_face.mean(), abs=1e-6)
    assert metrics["nme_median"] == pytest.approx(np.median(per_face), abs=1e-6)
    assert metrics["fr_10"] == np.mean(result.per_face_nme > 0.1)
    mean_shape = nme(np.broadcast_to(y_train.mean(0), y_test.shape), y_test)
    assert metrics["nme_mean_shape"] == pytest.approx(mean_shape.mean(), rel=1e-9)
    # Measured on these faces: NME 0.048 from 16 px pixels against 0.068 for the mean shape; the probe
    # is the closer on 17 of the 18 test faces.
    assert 0.02 < metrics["nme"] < 0.8 * metrics["nme_mean_shape"]
    assert np.mean(result.per_face_nme < mean_shape) > 0.7
    for name in ("nme", "fr_10"):
        lo, hi = row["intervals"][name]
        assert lo <= metrics[name] <= hi
    assert row["intervals"]["nme"][0] < row["intervals"]["nme"][1]


def test_probe_refuses_data_without_points_or_train_faces(faces):
    files, points, _ = faces
    pixels = load_faces(files[:6], 8).reshape(6, -1)
    emb = _embeddings(pixels, points[:6])
    bare = Embeddings(ids=emb.ids, features=emb.features, labels={"age": np.array(["1"] * 6)})
    with pytest.raises(TargetError, match="136 landmark point columns"):
        landmark_probe(bare, emb, "pixels")
    for c in LANDMARK_COLUMNS[:2]:
        emb.labels[c][2:] = ""
    with pytest.raises(TargetError, match="at least 3 train faces with all 68 points, got 2"):
        landmark_probe(emb, emb, "pixels")
