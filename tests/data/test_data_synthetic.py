"""Synthetic faces: deterministic, attributes independent and visible in the pixels."""
import numpy as np
import pytest

from mefem_jax.data import synthetic


def test_same_seed_and_index_give_the_same_face_and_splits_differ():
    a = synthetic.SyntheticFaces(10, 48, seed=3)
    b = synthetic.SyntheticFaces(10, 48, seed=3)
    test = synthetic.SyntheticFaces(10, 48, seed=3, split="test")
    for i in (0, 7):
        assert np.array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["labels"] == b[i]["labels"]
        assert a[i]["id"] == f"synthetic-train-{i:08d}"
    assert not np.array_equal(a[0]["image"], a[1]["image"])
    assert a[0]["labels"] != test[0]["labels"]
    assert a[0]["image"].dtype == np.uint8 and a[0]["image"].shape == (48, 48, 3)
    with pytest.raises(IndexError):
        a[10]


def test_attributes_are_in_range_and_independent():
    faces = synthetic.SyntheticFaces(400, 16)
    labels = [faces[i]["labels"] for i in range(400)]
    table = np.array([[row[k] for k in synthetic.ATTRIBUTES] for row in labels])
    lo, hi = np.array(list(synthetic.ATTRIBUTES.values())).T
    assert np.all(table >= lo) and np.all(table <= hi)
    corr = np.corrcoef(table.T)
    off_diagonal = np.abs(corr[~np.eye(len(lo), dtype=bool)])
    # 400 independent draws: |r| above 0.2 would be a > 4-sigma event.
    assert off_diagonal.max() < 0.2, corr


@pytest.mark.parametrize("name", list(synthetic.ATTRIBUTES))
def test_every_attribute_changes_the_pixels(name):
    """Same nuisances, one attribute moved from its low to its high end: the face changes."""
    lo, hi = synthetic.ATTRIBUTES[name]
    attrs = {k: (a + b) / 2 for k, (a, b) in synthetic.ATTRIBUTES.items()}
    draw = lambda value: synthetic.render_face(  # noqa: E731
        {**attrs, name: value}, np.random.default_rng(0), 64).astype(np.float32)
    changed = np.abs(draw(lo) - draw(hi)).max(axis=-1) > 20
    assert changed.sum() >= 12, f"{name}: only {changed.sum()} pixels changed"


def test_skin_tone_and_face_width_can_be_read_off_the_pixels():
    faces = [synthetic.SyntheticFaces(200, 64)[i] for i in range(200)]
    tone = np.array([f["labels"]["skin_tone"] for f in faces])
    # Brightness of a cheek patch (left of the nose, under the eyes) falls with skin tone.
    cheek = np.array([f["image"][34:38, 20:24].mean() for f in faces])
    assert np.corrcoef(tone, cheek)[0, 1] < -0.9
    # Face width: pixels on the rows through the face centre that differ from the background
    # (interpolated between the two ends of the row); a background that happens to be close to
    # the skin colour hides the face now and then, hence a correlation and not a formula.
    width = np.array([f["labels"]["face_width"] for f in faces])
    measured = []
    for f in faces:
        rows = f["image"][30:35].astype(np.float32).mean(axis=0)
        t = np.linspace(0.0, 1.0, rows.shape[0])[:, None]
        background = rows[0] * (1 - t) + rows[-1] * t
        measured.append((np.abs(rows - background).sum(axis=-1) > 30).sum())
    assert np.corrcoef(width, measured)[0, 1] > 0.8
