"""The I-JEPA predictor: shapes, and which inputs may (not) influence which predictions."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mefem_jax.models.predictor import Predictor, predictor_from_config

D, B, K_CTX, K_TGT = 32, 2, 6, 5


ARGS = ("ctx_tokens", "ctx_idx", "ctx_valid", "cls_in_ctx", "tgt_idx", "tgt_valid")


@pytest.fixture
def run(forward):
    """run(model, params, inputs) -> the predictions, jitted, inputs by name."""
    return lambda model, params, inputs: forward(model, params, *(inputs[k] for k in ARGS))


@pytest.fixture
def setup(random_params):
    """A 2-block width-16 predictor for a width-32 encoder on a 4x4 grid, random params/inputs."""
    model = Predictor(out_width=D, width=16, depth=2, heads=2, grid=(4, 4))
    rng = np.random.default_rng(0)
    inputs = dict(
        ctx_tokens=rng.standard_normal((B, 1 + K_CTX, D)).astype(np.float32),
        ctx_idx=np.array([[0, 1, 2, 3, 4, 5], [15, 14, 13, 12, 11, 10]], np.int32),
        ctx_valid=np.array([[True] * 6, [True] * 4 + [False] * 2]),
        cls_in_ctx=np.array([True, False]),
        tgt_idx=np.array([[8, 9, 10, 11, 12], [0, 1, 2, 3, 4]], np.int32),
        tgt_valid=np.array([[True] * 4 + [False], [True] * 5]),
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), *(inputs[k] for k in ARGS))["params"]
    return model, random_params(shapes, seed=1), inputs


def changed(inputs: dict, **updates) -> dict:
    return {**inputs, **{k: np.asarray(v) for k, v in updates.items()}}


def test_shapes_and_param_names(setup, run):
    model, params, inputs = setup
    assert run(model, params, inputs).shape == (B, 1 + K_TGT, D)
    assert set(params) == {"predictor_embed", "mask_token", "cls_query", "blocks_0", "blocks_1",
                           "predictor_norm", "predictor_proj"}
    assert params["predictor_embed"]["kernel"].shape == (D, 16)
    assert params["predictor_proj"]["kernel"].shape == (16, D)
    assert params["mask_token"].shape == params["cls_query"].shape == (1, 1, 16)


def test_hidden_ctx_cls_has_no_influence(setup, run):
    model, params, inputs = setup
    tokens = inputs["ctx_tokens"].copy()
    tokens[:, 0] += np.random.default_rng(1).standard_normal((B, D))
    hidden = changed(inputs, cls_in_ctx=[False, False])
    np.testing.assert_allclose(run(model, params, changed(hidden, ctx_tokens=tokens)),
                               run(model, params, hidden), rtol=1e-5, atol=1e-5)
    shown = changed(inputs, cls_in_ctx=[True, True])
    assert np.abs(run(model, params, changed(shown, ctx_tokens=tokens))
                  - run(model, params, shown)).max() > 1e-3


def test_dead_cls_query_has_no_influence(setup, run):
    model, params, inputs = setup
    other = dict(params, cls_query=np.random.default_rng(2).standard_normal((1, 1, 16)).astype(np.float32))
    shown = changed(inputs, cls_in_ctx=[True, True])
    np.testing.assert_allclose(run(model, other, shown)[:, 1:], run(model, params, shown)[:, 1:],
                               rtol=1e-5, atol=1e-5)
    # As a real target (CLS reassigned) the query is a key, so target slots see it.
    hidden = changed(inputs, cls_in_ctx=[False, False])
    assert np.abs(run(model, other, hidden)[:, 1:] - run(model, params, hidden)[:, 1:]).max() > 1e-3


def test_padding_slots_have_no_influence(setup, run):
    model, params, inputs = setup
    base = run(model, params, inputs)
    tokens = inputs["ctx_tokens"].copy()
    tokens[1, 5:] += 3.0 * np.random.default_rng(3).standard_normal((2, D))  # sample 1's padding
    ctx_idx = inputs["ctx_idx"].copy()
    ctx_idx[1, 4:] = [0, 1]
    tgt_idx = inputs["tgt_idx"].copy()
    tgt_idx[0, 4] = 15  # sample 0's padding target
    out = run(model, params, changed(inputs, ctx_tokens=tokens, ctx_idx=ctx_idx, tgt_idx=tgt_idx))
    valid = np.concatenate([np.ones((B, 1), bool), inputs["tgt_valid"]], 1)
    np.testing.assert_allclose(out[valid], base[valid], rtol=1e-5, atol=1e-5)
    # The same changes on valid slots do matter.
    everything = changed(inputs, ctx_valid=np.ones((B, K_CTX), bool), tgt_valid=np.ones((B, K_TGT), bool))
    moved = changed(everything, ctx_tokens=tokens, ctx_idx=ctx_idx, tgt_idx=tgt_idx)
    assert np.abs(run(model, params, moved)[:, :4] - run(model, params, everything)[:, :4]).max() > 1e-3


def test_slot_order_is_irrelevant(setup, run):
    """Context order does not matter; target slots are permutation-equivariant. Everything
    positional comes from the cell indices."""
    model, params, inputs = setup
    base = run(model, params, inputs)
    ctx_perm = np.array([3, 0, 5, 1, 4, 2])
    tokens = inputs["ctx_tokens"].copy()
    tokens[:, 1:] = tokens[:, 1:][:, ctx_perm]
    shuffled_ctx = changed(inputs, ctx_tokens=tokens, ctx_idx=inputs["ctx_idx"][:, ctx_perm],
                           ctx_valid=inputs["ctx_valid"][:, ctx_perm])
    np.testing.assert_allclose(run(model, params, shuffled_ctx), base, rtol=1e-5, atol=1e-5)

    tgt_perm = np.array([4, 2, 0, 1, 3])
    shuffled_tgt = changed(inputs, tgt_idx=inputs["tgt_idx"][:, tgt_perm],
                           tgt_valid=inputs["tgt_valid"][:, tgt_perm])
    out = run(model, params, shuffled_tgt)
    np.testing.assert_allclose(out[:, 1:], base[:, 1:][:, tgt_perm], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 0], base[:, 0], rtol=1e-5, atol=1e-5)
    # Positions do enter: the same slots predicting other cells give other predictions.
    moved = changed(inputs, tgt_idx=(inputs["tgt_idx"] + 3) % 16)
    assert np.abs(run(model, params, moved)[:, 1:] - base[:, 1:]).max() > 1e-3


def test_predictor_from_config():
    model_cfg = ml_collections.ConfigDict(dict(variant="S", patch_size=16, image_size=224,
                                               posemb="sincos", dtype="bfloat16", remat=True))
    pred = predictor_from_config(model_cfg, ml_collections.ConfigDict(dict(width=384, depth=6, heads=None)))
    assert (pred.out_width, pred.width, pred.depth, pred.heads, pred.grid) == (384, 384, 6, 6, (14, 14))
    assert pred.dtype == jnp.bfloat16 and pred.remat
    pred = predictor_from_config(model_cfg, ml_collections.ConfigDict(dict(width=96, depth=2, heads=4)))
    assert pred.heads == 4
    with pytest.raises(ValueError, match="divisible"):
        predictor_from_config(model_cfg, ml_collections.ConfigDict(dict(width=100, depth=2, heads=None)))
