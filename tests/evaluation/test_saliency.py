"""Saliency maps (evaluation/saliency.py) on real UTKFace faces: the probe's linear map against the
fitted estimator, occlusion against its closed form on a linear pixel readout, and the maps of a probe
for the brightness of the eye rows against where the eyes are.

The encoder is a one-block random ViT at 32 px with 8 px patches (a 4x4 patch grid). In UTKFace's
aligned crops the eyes sit at 27-33 % of the height (the mean face's darkest rows are 8-10 of 32), so
patch row 1 (pixels 8-15) holds them in every face.
"""
import numpy as np
import pytest
from PIL import Image

from helpers.faces import IMAGES, normalize, utkface_rows, load_faces
from mefem_jax.evaluation import saliency
from mefem_jax.evaluation.embeddings import embed_batch
from mefem_jax.evaluation.probes import blas_threads, fit_classification_probe, fit_regression_probe
from mefem_jax.weights.encoders import load_encoder

SPEC = "random:vitti@32:width=16,depth=1,heads=2,patch=8"
EYE_ROW, PATCH, N_TRAIN, N_MAP = 1, 8, 160, 16


@pytest.fixture(scope="module")
def faces():
    """(encoder, features callable, faces [176, 32, 32, 3], their labels, their grid features)."""
    rows = utkface_rows(N_TRAIN + N_MAP)
    loaded = load_encoder(SPEC)
    features = saliency.jax_features(loaded, batch_size=64)
    images = load_faces([IMAGES / r["file"] for r in rows], loaded.image_size)
    grid = loaded.encoder.grid[0]
    with blas_threads(1):  # as evaluate fits its probes
        yield loaded, features, images, rows, features(images, grid)["grid"].astype(np.float64)


def test_linear_readout_reproduces_the_fitted_probes(faces):
    _, _, _, rows, x = faces
    train, test = slice(0, N_TRAIN), slice(N_TRAIN, None)
    age = np.array([float(r["age"]) for r in rows])
    ridge = fit_regression_probe(x[train], age[train], x[test], age[test])
    w, b = saliency.linear_readout(ridge)
    assert w.shape == (x.shape[1], 1) and b.shape == (1,)
    want = ridge.model.predict(x)  # unclipped, unlike ridge.y_pred
    np.testing.assert_allclose((x @ w + b)[:, 0], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())

    for column, n_classes in (("gender", 2), ("race", 5)):
        labels = np.array([r[column] for r in rows])
        probe = fit_classification_probe(x[train], labels[train], x[test], labels[test], cs=(0.01, 1.0))
        w, b = saliency.linear_readout(probe)
        logits = x @ w + b
        assert logits.shape == (len(x), n_classes)
        decision = probe.model.decision_function(x)
        ours = logits[:, 1] - logits[:, 0] if n_classes == 2 else logits
        np.testing.assert_allclose(ours, decision, rtol=1e-6, atol=1e-6 * np.abs(decision).max())
        proba = probe.model.predict_proba(x)
        softmax = np.exp(logits - logits.max(1, keepdims=True))
        np.testing.assert_allclose(softmax / softmax.sum(1, keepdims=True), proba, rtol=1e-6, atol=1e-9)
        # The score is the predicted class's log-odds, computed from sklearn's probabilities here.
        predicted = np.argmax(proba, axis=1)
        p = proba[np.arange(len(x)), predicted]
        np.testing.assert_allclose(saliency.readout_score(logits, predicted), np.log(p) - np.log1p(-p),
                                   rtol=1e-5, atol=1e-9)


def test_occlusion_is_its_closed_form_on_a_linear_pixel_readout_for_any_batch_size(faces):
    """A readout linear in the pixels changes by exactly -sum over the cell of w * pixel when the cell is
    filled with 0; the brute-force sums below are the reference, at two batch sizes (one not dividing
    the 16 x 16 occluded copies, so the last batch is padded)."""
    images = faces[2][N_TRAIN:]
    rng = np.random.default_rng(0)

    def pixels(batch: np.ndarray, grid_size: int) -> dict[str, np.ndarray]:
        return {"grid": batch.reshape(len(batch), -1)}

    wanted = {}
    for n_out in (1, 3):  # a regression readout; a 3-class one scored by the predicted class's log-odds
        w, b = rng.standard_normal((32 * 32 * 3, n_out)) * 0.01, rng.standard_normal(n_out)
        want = wanted[n_out] = np.zeros((4, 4))
        for face in images.astype(np.float64):
            clean = face.reshape(-1) @ w + b
            k = np.argmax(clean)
            for r in range(4):
                for c in range(4):
                    occluded = face.copy()
                    occluded[r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = 0.0
                    z = occluded.reshape(-1) @ w + b
                    if n_out == 1:
                        want[r, c] += abs(z[0] - clean[0]) / len(images)
                    else:  # log-odds of class k = z_k - log sum_{j != k} exp z_j
                        rest = lambda v: np.log(np.exp(np.delete(v, k)).sum())  # noqa: E731
                        want[r, c] += abs((z[k] - rest(z)) - (clean[k] - rest(clean))) / len(images)
        for batch_size in (64, 24):
            got = saliency.occlusion_map(pixels, images, "grid", (w, b), (4, 4), grid_size=4,
                                         batch_size=batch_size)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
        wanted[n_out] = (want, (w, b))
    # Several probes from one pass over the occluded copies, as evaluate draws them.
    both = saliency.occlusion_maps(pixels, images, {k: ("grid", r) for k, (_, r) in wanted.items()}, (4, 4),
                                   grid_size=4, batch_size=24)
    for k, (want, _) in wanted.items():
        np.testing.assert_allclose(both[k], want, rtol=1e-5, atol=1e-9)


def row_shares(per_cell: np.ndarray) -> np.ndarray:
    rows = per_cell.sum(1)
    return rows / rows.sum()


def test_a_probe_of_the_eye_rows_looks_at_the_eyes(faces, tmp_path):
    """A ridge probe on the 4x4 patch tokens for the mean brightness of pixel rows 8-15: both maps put
    most of their mass on patch row 1.

    Measured (this encoder, these faces): occlusion puts 0.70 of its mass on the eye row, gradient x
    input 0.49 (uniform: 0.25; the largest other row 0.12 and 0.22). The rest is the probe's own doing,
    not leakage: a face's lighting makes the other rows' brightness predict the eye rows', so ridge
    gives them smaller weights too, and gradient x input takes |.| pixel by pixel where occlusion sums
    a cell's signed changes first. Hence 0.4, not 0.5, for gradient x input. The same probe with its
    weights off the eye row's tokens zeroed gets 0.996 (occlusion) and 0.994 (gradient): attention
    carries little between tokens here, so both methods localise what the readout reads."""
    loaded, features, images, _, x = faces
    brightness = images[:, EYE_ROW * PATCH:(EYE_ROW + 1) * PATCH].mean((1, 2, 3))
    probe = fit_regression_probe(x[:N_TRAIN], brightness[:N_TRAIN], x[N_TRAIN:], brightness[N_TRAIN:])
    assert probe.metrics["r2"] > 0.9
    readout = saliency.linear_readout(probe)
    shown = images[N_TRAIN:]

    forwards = embed_batch._cache_size()  # the fixture compiled the forward at (64 rows, grid 4)
    occlusion = saliency.occlusion_map(features, shown, "grid", readout, (4, 4), grid_size=4)
    assert embed_batch._cache_size() == forwards  # 256 occluded copies, batch after batch, no recompile
    gradient = saliency.gradient_x_input(loaded, shown, "grid", readout, grid_size=4)
    assert gradient.shape == (32, 32)
    per_cell = gradient.reshape(4, PATCH, 4, PATCH).sum((1, 3))
    occlusion_rows, gradient_rows = row_shares(occlusion), row_shares(per_cell)
    assert occlusion_rows[EYE_ROW] > 0.5, occlusion_rows
    assert gradient_rows[EYE_ROW] > 0.4, gradient_rows
    for shares in (occlusion_rows, gradient_rows):
        assert shares[EYE_ROW] > 1.5 * np.delete(shares, EYE_ROW).max(), shares
    # Per patch cell (signed sums before |.|, the linear estimate of occluding the cell), as evaluate draws it.
    cell_rows = row_shares(saliency.gradient_x_input(loaded, shown, "grid", readout, grid_size=4, cells=(4, 4)))
    assert cell_rows[EYE_ROW] > 0.5, cell_rows

    w, b = readout
    eye_only = w.reshape(4, 4, -1).copy()
    eye_only[np.arange(4) != EYE_ROW] = 0.0
    eye_only = (eye_only.reshape(w.shape), b)
    assert row_shares(saliency.occlusion_map(features, shown, "grid", eye_only, (4, 4), 4))[EYE_ROW] > 0.95
    gradients = saliency._gradient_x_input._cache_size()
    restricted = saliency.gradient_x_input(loaded, shown, "grid", eye_only, grid_size=4)
    assert row_shares(restricted.reshape(4, PATCH, 4, PATCH).sum((1, 3)))[EYE_ROW] > 0.95
    assert saliency._gradient_x_input._cache_size() == gradients  # new weights, same compiled function


    face = saliency.mean_face(shown)
    assert face.dtype == np.uint8 and face.shape == (32, 32, 3)
    path = tmp_path / "eyes.png"
    saliency.plot_saliency(path, "eye-row brightness", face, {"occlusion": occlusion, "gradient x input": gradient})
    with Image.open(path) as im:
        assert im.size[0] > 1.5 * im.size[1]  # two panels side by side


def test_mean_face_undoes_the_normalisation():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(8, 8, 3))
    np.testing.assert_array_equal(saliency.mean_face(normalize(np.stack([pixels, pixels]))), pixels)
    mixed = saliency.mean_face(normalize(np.stack([np.zeros_like(pixels), np.full_like(pixels, 200)])))
    np.testing.assert_array_equal(mixed, np.full_like(pixels, 100))


def test_a_readout_the_encoder_cannot_feed_is_one_error(faces):
    loaded, features, images, _, _ = faces
    w, b = np.zeros((4 * 4 * 16, 1)), np.zeros(1)
    with pytest.raises(saliency.SaliencyError, match="pixels"):
        saliency.occlusion_map(features, images[:2], "pixels", (w, b), (4, 4), grid_size=4)
    with pytest.raises(saliency.SaliencyError, match="another grid_size"):
        saliency.occlusion_map(features, images[:2], "grid", (w[:100], b), (4, 4), grid_size=4)
    with pytest.raises(saliency.SaliencyError, match="does not tile"):
        saliency.occlusion_map(features, images[:2], "grid", (w, b), (5, 5), grid_size=4)
    with pytest.raises(saliency.SaliencyError, match="another grid_size"):
        saliency.gradient_x_input(loaded, images[:2], "grid", (w, b), grid_size=2)
    with pytest.raises(saliency.SaliencyError, match="one or more images"):
        saliency.gradient_x_input(loaded, images[:0], "grid", (w, b), grid_size=4)
