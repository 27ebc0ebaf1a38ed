"""Scan-over-layers (`model.scan_layers`): the same model in a stacked parameter layout.

The scanned encoder and predictor must compute exactly what the unrolled ones compute from the same
weights (stacked), in the forward pass, in gradients and through whole train steps; export must write
the same timm file from either layout; and the sharding rules must never split the layer axis.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from helpers.tiny_configs import tiny_config
from mefem_jax.models.predictor import Predictor
from mefem_jax.models.vit import ViT, encoder_from_config, stack_blocks, unstack_blocks
from mefem_jax.training import sharding
from mefem_jax.training.train_step import TrainState, build, init_state, make_train_step
from mefem_jax.weights.timm_keys import params_to_timm, timm_to_params


def _tree_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


@pytest.fixture(scope="module")
def encoder_case(faces):
    """A 3-block unrolled encoder with random weights, its scanned twin, and a masked patch subset."""
    unrolled = ViT(width=64, depth=3, heads=2, image_size=112)
    scanned = unrolled.clone(scan=True)
    images = faces(2, 112)
    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(49)[:20] for _ in range(2)]).astype(np.int32)
    valid = np.ones((2, 20), bool)
    valid[1, 15:] = False
    inputs = dict(patch_idx=idx, patch_valid=valid, cls_visible=np.array([True, False]))
    # Random values in every leaf (biases and LayerNorm scales too), so a layer swapped in the stack shows.
    shapes = jax.eval_shape(unrolled.init, jax.random.key(1), images)["params"]
    params = jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32), shapes)
    return unrolled, scanned, params, images, inputs


def test_stack_and_unstack_are_inverse(encoder_case):
    unrolled, scanned, params, images, _ = encoder_case
    stacked = stack_blocks(params)
    assert "blocks" in stacked and not any(k.startswith("blocks_") for k in stacked)
    assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 64, 192)
    # The stacked tree is exactly the layout a scanned init creates.
    fresh = jax.eval_shape(scanned.init, jax.random.key(0), images)["params"]
    assert jax.tree.map(np.shape, fresh) == jax.tree.map(np.shape, stacked)
    _tree_close(unstack_blocks(stacked), params, rtol=0, atol=0)
    assert unstack_blocks(params) == dict(params)  # nothing to unstack: unchanged
    with pytest.raises(ValueError, match="numbered"):
        stack_blocks({"blocks_0": {}, "blocks_2": {}})


def test_scanned_encoder_matches_unrolled_forward_and_gradients(encoder_case):
    unrolled, scanned, params, images, inputs = encoder_case
    stacked = stack_blocks(params)

    def loss(model, p):
        out = model.apply({"params": p}, images, **inputs)
        return jnp.sum(out ** 2), out

    with jax.default_matmul_precision("highest"):
        (l0, out0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True))(params)
        (l1, out1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True))(stacked)
        out_remat = jax.jit(lambda p: loss(scanned.clone(remat=True), p)[1])(stacked)
    np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_remat, out0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    _tree_close(unstack_blocks(g1), g0, rtol=1e-4, atol=1e-6)


def test_scanned_predictor_matches_unrolled(random_params):
    unrolled = Predictor(out_width=32, width=16, depth=3, heads=2, grid=(4, 4))
    scanned = unrolled.clone(scan=True)
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((2, 5, 32)).astype(np.float32),
            np.array([[0, 1, 2, 3], [15, 14, 13, 12]], np.int32), np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool),
            np.array([True, False]), np.array([[8, 9, 10], [0, 1, 2]], np.int32), np.ones((2, 3), bool))
    shapes = jax.eval_shape(unrolled.init, jax.random.key(0), *args)["params"]
    params = random_params(shapes, seed=2)
    with jax.default_matmul_precision("highest"):
        want = unrolled.apply({"params": params}, *args)
        got = scanned.apply({"params": stack_blocks(params)}, *args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_export_and_import_through_the_scanned_layout(model_cfg, random_params):
    cfg = model_cfg(depth=3)
    shapes = jax.eval_shape(encoder_from_config(cfg).init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
    params = random_params(shapes["params"], seed=3)
    want = params_to_timm(params, cfg)
    scan_cfg = model_cfg(depth=3, scan_layers=True)
    got = params_to_timm(stack_blocks(params), scan_cfg)  # a scanned run's weights, exported
    assert list(got) == list(want)  # timm's key order
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    # Importing a timm file into a scanned config yields the stack the scanned model initialises.
    back = timm_to_params(want, scan_cfg)
    fresh = jax.eval_shape(encoder_from_config(scan_cfg).init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
    assert jax.tree.map(np.shape, back) == jax.tree.map(np.shape, fresh["params"])
    _tree_close(unstack_blocks(back), params, rtol=0, atol=0)


def test_sharding_never_splits_the_layer_axis():
    # A ViT-B MLP kernel, stacked over 12 layers: the feature axes are sharded as unrolled ones are.
    assert sharding.spec_for("encoder/blocks/mlp/fc1/kernel", (12, 768, 3072), 8) == P(None, None, "fsdp")
    assert sharding.spec_for("predictor/blocks/mlp/fc2/kernel", (6, 1536, 384), 8) == P(None, "fsdp", None)
    # Even where the layer axis is the largest divisible one, a feature axis gets it, or nothing does.
    assert sharding.spec_for("encoder/blocks/attn/qkv/kernel", (64, 48, 40), 8) == P(None, "fsdp", None)
    assert sharding.spec_for("encoder/blocks/attn/qkv/kernel", (64, 30, 18), 8) == P()
    assert sharding.spec_for("encoder/blocks/norm1/scale", (12, 768), 8) == P()  # rule: replicate


def _stacked_state(state: TrainState, tx) -> TrainState:
    """The unrolled state in the scanned layout. Fresh AdamW moments are zeros and its count 0, so
    re-initialising them on the stacked tree gives the identical optimizer state."""
    params = {name: stack_blocks(p) for name, p in state.params.items()}
    return state.replace(params=jax.tree.map(jnp.asarray, params),
                         target_params=jax.tree.map(jnp.asarray, stack_blocks(state.target_params)),
                         opt_state=tx.init(params))


def test_scanned_and_remat_train_steps_match_unrolled(faces):
    """Three full updates (masks, loss, AdamW, EMA) from the same weights: unrolled blocks, scanned blocks,
    and scanned blocks with remat (which changes memory, not the maths)."""
    batch = jnp.asarray(faces(8, 112))
    config = tiny_config(total_steps=3)
    config.model.depth = config.predictor.depth = 2
    results = {}
    for name, scan, remat in (("unrolled", False, False), ("scan", True, False), ("scan+remat", True, True)):
        config.model.update(scan_layers=scan, remat=remat)
        pieces = build(config)
        if name == "unrolled":
            state = start = init_state(pieces, jax.random.PRNGKey(0))
        else:
            state = _stacked_state(start, pieces.tx)
        step = jax.jit(make_train_step(pieces))
        losses = []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        results[name] = (np.array(losses), state)
    l0, s0 = results["unrolled"]
    for name in ("scan", "scan+remat"):
        l1, s1 = results[name]
        np.testing.assert_allclose(l1, l0, rtol=1e-5, err_msg=name)
        _tree_close({k: unstack_blocks(v) for k, v in s1.params.items()}, s0.params, rtol=1e-4, atol=1e-6)
        _tree_close(unstack_blocks(s1.target_params), s0.target_params, rtol=1e-4, atol=1e-6)
