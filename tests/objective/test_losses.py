"""Circular weights, target normalisation, slot weights and the weighted loss, against hand computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mefem_jax.objective import losses


@pytest.mark.parametrize("grid", [(7, 7), (14, 14)])
@pytest.mark.parametrize("profile", ["cosine", "gaussian"])
def test_circular_weights_shape_mean_symmetry_monotone(grid, profile):
    w = losses.circular_weights(grid, r0=0.45, r1=1.0, w_min=0.25, profile=profile)
    assert w.shape == grid
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(w, w[::-1, :], atol=1e-12)  # up-down
    np.testing.assert_allclose(w, w[:, ::-1], atol=1e-12)  # left-right
    np.testing.assert_allclose(w, w.T, atol=1e-12)  # the square grid's diagonal
    r = losses.patch_radii(grid).ravel()
    order = np.argsort(r, kind="stable")
    assert np.all(np.diff(w.ravel()[order]) <= 1e-12), "weights must not increase with the radius"
    # Plateau inside r0 and floor beyond r1, before the mean normalisation.
    raw = w / w.max()
    assert np.allclose(raw.ravel()[r <= 0.45], 1.0)
    assert np.allclose(raw.ravel()[r >= 1.0], 0.25)


def test_circular_weights_cosine_value_by_hand():
    # 2x2 grid: every patch centre sits at radius sqrt(0.5^2 + 0.5^2) = 0.7071; all equal -> all 1 after norm.
    assert np.allclose(losses.circular_weights((2, 2), 0.1, 1.0, 0.5), 1.0)
    # 3x3: the centre patch has r=0 (weight 1), edge-midpoints r=2/3, corners r=0.9428.
    w = losses.circular_weights((3, 3), r0=0.0, r1=1.0, w_min=0.2)
    f = lambda r: 0.2 + 0.8 * 0.5 * (1 + np.cos(np.pi * r))  # noqa: E731
    raw = np.array([[f(np.hypot(2 / 3, 2 / 3)), f(2 / 3), f(np.hypot(2 / 3, 2 / 3))],
                    [f(2 / 3), f(0.0), f(2 / 3)],
                    [f(np.hypot(2 / 3, 2 / 3)), f(2 / 3), f(np.hypot(2 / 3, 2 / 3))]])
    np.testing.assert_allclose(w, raw / raw.mean(), rtol=1e-12)


def test_circular_weights_refuses_bad_knobs():
    with pytest.raises(ValueError, match="r0 < r1"):
        losses.circular_weights((7, 7), 0.8, 0.5, 0.2)
    with pytest.raises(ValueError, match="w_min"):
        losses.circular_weights((7, 7), 0.2, 0.5, 0.0)
    with pytest.raises(ValueError, match="profile"):
        losses.circular_weights((7, 7), 0.2, 0.5, 0.2, profile="box")


def test_normalize_targets_matches_torch_layer_norm():
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32) * 3 + 1
    ref = torch.nn.functional.layer_norm(torch.tensor(x, dtype=torch.float64), (16,), eps=1e-5).numpy()
    np.testing.assert_allclose(losses.normalize_targets(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)


def test_token_loss_matches_torch():
    rng = np.random.default_rng(1)
    p, t = rng.normal(size=(3, 4, 8)) * 2, rng.normal(size=(3, 4, 8))
    sl1 = torch.nn.functional.smooth_l1_loss(torch.tensor(p), torch.tensor(t), reduction="none", beta=1.0)
    np.testing.assert_allclose(losses.token_loss(jnp.asarray(p), jnp.asarray(t)), sl1.mean(-1).numpy(), rtol=1e-5)
    l2 = (p - t) ** 2
    np.testing.assert_allclose(losses.token_loss(jnp.asarray(p), jnp.asarray(t), "l2"), l2.mean(-1), rtol=1e-5)


def test_slot_weights_cls_semantics_and_padding():
    grid = jnp.arange(1.0, 10.0).reshape(3, 3)  # weight of cell i is i+1
    tgt_idx = jnp.array([[0, 4, 8], [1, 2, 3]])
    tgt_valid = jnp.array([[True, True, False], [True, True, True]])
    cls_target = jnp.array([True, False])
    w = losses.slot_weights(grid, tgt_idx, tgt_valid, cls_target, cls_weight=2.0)
    np.testing.assert_allclose(w, [[2.0, 1.0, 5.0, 0.0], [0.0, 2.0, 3.0, 4.0]])


def test_weighted_loss_hand_example():
    # Two slots, D=2. Slot 0: |diff| = (0.5, 3) -> smooth-L1 (0.125, 2.5) -> mean 1.3125.
    # Slot 1: |diff| = (1, 0) -> (0.5, 0) -> 0.25. Weights (3, 1): (3*1.3125 + 0.25) / 4 = 1.046875.
    pred = jnp.array([[0.5, 3.0], [1.0, 0.0]])
    tgt = jnp.zeros((2, 2))
    loss, per = losses.weighted_loss(pred, tgt, jnp.array([3.0, 1.0]), "smooth_l1", 1.0)
    np.testing.assert_allclose(per, [1.3125, 0.25])
    assert float(loss) == pytest.approx(1.046875)
    # A zero-weight slot cannot move the loss, however wrong its prediction.
    loss2, _ = losses.weighted_loss(pred.at[1].set(1e6), tgt, jnp.array([3.0, 0.0]), "smooth_l1", 1.0)
    assert float(loss2) == pytest.approx(1.3125)


# ------------------------------------------------------------------------------- SIGReg (optional)


def test_sigreg_is_small_for_gaussians_and_large_for_collapse():
    key = jax.random.key(0)
    gauss = jax.random.normal(key, (256, 64))
    low_rank = gauss[:, :2] @ jax.random.normal(jax.random.key(1), (2, 64)) / np.sqrt(2.0)
    g = float(losses.sigreg(gauss, key))
    assert g < 2.0  # O(1) for N(0, I) data, whatever the batch size
    assert float(losses.sigreg(low_rank, key)) > 10 * g  # two directions carry everything
    assert float(losses.sigreg(3.0 * gauss, key)) > 10 * g  # wrong scale
    assert float(losses.sigreg(gauss + 2.0, key)) > 10 * g  # wrong mean
    assert float(losses.sigreg(jnp.ones((256, 64)), key)) > 100 * g  # every sample the same


def test_sigreg_matches_a_float64_numpy_reference():
    x = np.random.default_rng(0).standard_normal((32, 8)) * 1.3 + 0.2
    key = jax.random.key(3)
    dirs = np.asarray(jax.random.normal(key, (8, 16), jnp.float32), np.float64)
    dirs /= np.linalg.norm(dirs, axis=0)
    t = np.linspace(0.0, 3.0, 17)
    proj = x @ dirs
    ecf_re = np.cos(proj[:, :, None] * t).mean(0)
    ecf_im = np.sin(proj[:, :, None] * t).mean(0)
    integrand = ((ecf_re - np.exp(-t ** 2 / 2)) ** 2 + ecf_im ** 2) * np.exp(-t ** 2 / 2)
    expected = 32 * (2 * np.trapezoid(integrand, t, axis=1)).mean()
    got = float(losses.sigreg(jnp.asarray(x, jnp.float32), key, slices=16))
    assert got == pytest.approx(expected, rel=1e-4)
