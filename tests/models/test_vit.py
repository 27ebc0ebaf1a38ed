"""The ViT encoder: parity with timm on real faces, the sin-cos table, and key-mask semantics."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mefem_jax.models.vit import VARIANTS, PatchEmbed, ViT, encoder_from_config, sincos_pos_embed, trunc_normal
from mefem_jax.weights.timm_import import import_timm
from mefem_jax.weights.timm_keys import params_to_timm


def param_shapes(model):
    """The param tree as shapes only: cheaper than a real init, and the tests randomise anyway."""
    size = model.image_size
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def timm_features(state_dict, images: np.ndarray, **timm_kwargs):
    """timm's forward_features on NHWC images, with `state_dict` loaded strictly; and the model."""
    torch = pytest.importorskip("torch")
    timm = import_timm()
    # weight_init="skip": timm's own init is wasted work (seconds on a CPU); strict loading
    # below overwrites every tensor.
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="token",
                              weight_init="skip", **timm_kwargs)
    model.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()}, strict=True)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(torch.tensor(images).permute(0, 3, 1, 2)).numpy()
    return feats, model


# -- sin-cos position table ---------------------------------------------------------------------

def reference_sincos(width: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Element by element from the MAE / I-JEPA definition, float64."""
    quarter = width // 4
    table = np.zeros((1 + grid_h * grid_w, width))
    for r in range(grid_h):
        for c in range(grid_w):
            token = 1 + r * grid_w + c
            for i in range(quarter):
                omega = 10000.0 ** (-i / quarter)
                table[token, i] = np.sin(c * omega)
                table[token, quarter + i] = np.cos(c * omega)
                table[token, 2 * quarter + i] = np.sin(r * omega)
                table[token, 3 * quarter + i] = np.cos(r * omega)
    return table


@pytest.mark.parametrize("width,grid_h,grid_w", [(64, 7, 7), (32, 3, 5), (192, 14, 14)])
def test_sincos_matches_reference(width, grid_h, grid_w):
    table = sincos_pos_embed(width, grid_h, grid_w)
    assert table.shape == (1, 1 + grid_h * grid_w, width) and table.dtype == np.float32
    np.testing.assert_allclose(table[0], reference_sincos(width, grid_h, grid_w), rtol=0, atol=1e-7)
    assert not table[0, 0].any()  # CLS row


def test_sincos_rejects_width_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(66, 2, 2)


# -- parity with timm ---------------------------------------------------------------------------

@pytest.mark.parametrize("fields,timm_kwargs", [
    (dict(image_size=224, width=None, depth=None, heads=None), {}),  # true ViT-Ti/16 at 224
    (dict(image_size=112, posemb="learn"), dict(img_size=112, embed_dim=64, depth=2, num_heads=2)),
], ids=["Ti-224-sincos", "w64d2-112-learn"])
def test_parity_with_timm_on_faces(model_cfg, random_params, faces, forward, fields, timm_kwargs):
    cfg = model_cfg(**fields)
    model = encoder_from_config(cfg)
    images = faces(2, cfg.image_size)
    params = random_params(param_shapes(model), seed=1)
    state_dict = params_to_timm(params, cfg)

    ref, timm_model = timm_features(state_dict, images, **timm_kwargs)
    ours = forward(model, params, images)

    assert ours.shape == ref.shape == (2, 1 + (cfg.image_size // 16) ** 2, model.width)
    assert rel_err(ours[:, 0], ref[:, 0]) <= 1e-5  # CLS
    assert rel_err(ours[:, 1:], ref[:, 1:]) <= 1e-5  # patches
    if cfg.posemb == "sincos":  # timm runs on exactly our fixed table
        table = sincos_pos_embed(model.width, *model.grid)
        np.testing.assert_array_equal(timm_model.pos_embed.detach().numpy(), table)


# -- key masks and patch subsets ----------------------------------------------------------------

@pytest.fixture
def tiny(random_params):
    """A 2-block encoder on a 112 px (7x7) grid, with random params, and 2 random images."""
    model = ViT(width=32, depth=2, heads=2, image_size=112)
    images = np.random.default_rng(3).standard_normal((2, 112, 112, 3)).astype(np.float32)
    return model, random_params(param_shapes(model), seed=4), images


def test_patch_idx_arange_equals_all_patches(tiny, forward):
    model, params, images = tiny
    idx = jnp.tile(jnp.arange(49, dtype=jnp.int32), (2, 1))
    np.testing.assert_allclose(forward(model, params, images, idx), forward(model, params, images),
                               rtol=1e-6, atol=1e-6)


def test_hidden_cls_does_not_reach_patches(tiny, forward):
    model, params, images = tiny
    # Not a constant shift: LayerNorm would remove that before attention ever saw it.
    other = dict(params, cls_token=np.random.default_rng(0).standard_normal(params["cls_token"].shape))
    idx = jnp.tile(jnp.arange(0, 49, 2, dtype=jnp.int32), (2, 1))
    valid = jnp.ones(idx.shape, bool)
    hidden = jnp.array([False, False])
    a = forward(model, params, images, idx, valid, hidden)
    b = forward(model, other, images, idx, valid, hidden)
    np.testing.assert_allclose(a[:, 1:], b[:, 1:], rtol=1e-6, atol=1e-6)
    # ...while a visible CLS does reach them (so the check above can fail).
    shown = jnp.array([True, True])
    assert np.abs(forward(model, params, images, idx, valid, shown)[:, 1:]
                  - forward(model, other, images, idx, valid, shown)[:, 1:]).max() > 1e-3


def test_cls_visibility_is_per_sample(tiny, forward):
    model, params, images = tiny
    mixed = forward(model, params, images, None, None, jnp.array([True, False]))
    full = forward(model, params, images)
    np.testing.assert_allclose(mixed[0], full[0], rtol=1e-6, atol=1e-6)
    assert np.abs(mixed[1] - full[1]).max() > 1e-3


def test_padding_slots_are_not_keys(tiny, forward):
    """Valid tokens come out as if only the valid patches had been encoded."""
    model, params, images = tiny
    keep = jnp.array([[3, 10, 11, 30, 48], [0, 7, 8, 9, 20]], jnp.int32)
    padded_a = jnp.concatenate([keep, jnp.array([[1, 2, 4], [5, 6, 40]], jnp.int32)], 1)
    padded_b = jnp.concatenate([keep, jnp.array([[47, 46, 45], [44, 43, 42]], jnp.int32)], 1)
    valid = jnp.arange(8)[None, :].repeat(2, 0) < 5
    short = forward(model, params, images, keep)
    a = forward(model, params, images, padded_a, valid)
    b = forward(model, params, images, padded_b, valid)
    np.testing.assert_allclose(a[:, :6], short, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b[:, :6], short, rtol=1e-5, atol=1e-5)
    # Treated as valid, the extra patches do change the output.
    assert np.abs(forward(model, params, images, padded_a)[:, :6] - short).max() > 1e-3


def test_tokens_keep_their_grid_position(tiny, forward):
    """Encoding patches in a shuffled order permutes the outputs and changes nothing else."""
    model, params, images = tiny
    idx = jnp.array([[5, 17, 33, 40], [1, 2, 3, 4]], jnp.int32)
    perm = jnp.array([2, 0, 3, 1])
    out = forward(model, params, images, idx)
    shuffled = forward(model, params, images, idx[:, perm])
    np.testing.assert_allclose(shuffled[:, 1:], out[:, 1:][:, perm], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shuffled[:, 0], out[:, 0], rtol=1e-5, atol=1e-5)


def test_subset_embeds_only_its_pixels(tiny, faces, random_params):
    """A subset's tokens are the conv of its own patches (float64 reference: cut the face into cells,
    pick, contract with the kernel), and the encoder's only conv then runs on K patches, not the grid."""
    p, width = 16, 8
    embed = PatchEmbed(width, p)
    images = faces(2, 112)  # a 7x7 grid
    idx = jnp.array([[48, 0, 9, 23], [5, 5, 30, 41]], jnp.int32)  # out of order, one cell twice
    params = random_params(jax.eval_shape(embed.init, jax.random.key(0), images)["params"], seed=5)
    with jax.default_matmul_precision("highest"):
        out = np.asarray(embed.apply({"params": params}, images, idx))
    cells = images.astype(np.float64).reshape(2, 7, p, 7, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 49, p, p, 3)
    picked = cells[np.arange(2)[:, None], np.asarray(idx)]
    kernel, bias = (np.asarray(params["proj"][k], np.float64) for k in ("kernel", "bias"))
    ref = np.einsum("bkxyc,xycw->bkw", picked, kernel) + bias
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

    model, vit_params, _ = tiny
    jaxpr = jax.make_jaxpr(lambda im: model.apply({"params": vit_params}, im, idx))(images)
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert [tuple(e.outvars[0].aval.shape) for e in convs] == [(2, 4, 1, model.width)]


# -- dtypes, remat, config ----------------------------------------------------------------------

def test_bfloat16_compute_and_remat(tiny, forward):
    model, params, images = tiny
    fast = ViT(width=32, depth=2, heads=2, image_size=112, dtype=jnp.bfloat16, remat=True)
    fast_params = param_shapes(fast)
    assert jax.tree_util.tree_structure(fast_params) == jax.tree_util.tree_structure(params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(fast_params))
    out = forward(fast, params, images)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), forward(model, params, images)) < 0.05

    # remat: the blocks are checkpointed in the backward pass. Tracing suffices to see that;
    # the forward is the same function (same params, same code path).
    remat = ViT(width=32, depth=2, heads=2, image_size=112, remat=True)

    def grad_jaxpr(m) -> str:
        loss = lambda p: jnp.sum(m.apply({"params": p}, images) ** 2)  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss))(params))

    assert grad_jaxpr(remat).count("remat") >= remat.depth
    assert "remat" not in grad_jaxpr(model)


def test_encoder_from_config(model_cfg):
    for variant, dims in VARIANTS.items():
        model = encoder_from_config(model_cfg(variant=variant, width=None, depth=None, heads=None))
        assert (model.width, model.depth, model.heads) == dims
    model = encoder_from_config(model_cfg(dtype="bfloat16", remat=True))
    assert (model.width, model.depth, model.heads, model.grid) == (64, 2, 2, (7, 7))
    assert model.dtype == jnp.bfloat16 and model.remat
    with pytest.raises(ValueError, match="variant"):
        encoder_from_config(model_cfg(variant="XL"))
    with pytest.raises(ValueError, match="divisible"):
        encoder_from_config(model_cfg(width=66, heads=4))


def test_init_statistics():
    """Weights: std 0.02 (what torch's trunc_normal_(std=.02) gives), no far outliers."""
    w = np.asarray(trunc_normal()(jax.random.key(0), (256, 256)))
    assert abs(w.std() - 0.02) < 0.0003 and abs(w.mean()) < 0.0003
    assert np.abs(w).max() <= 2 * 0.02 / 0.8796 + 1e-6  # cut at 2 sigma of the underlying normal
