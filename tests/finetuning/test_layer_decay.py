"""Layer-wise lr decay: the per-leaf factors against MAE's formula, and the optimiser applying them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from mefem_jax.finetuning import layer_decay
from mefem_jax.finetuning.config import default_finetune_config


def _params(depth: int) -> dict:
    leaf = lambda *shape: jnp.ones(shape, jnp.float32)  # noqa: E731
    encoder = {"patch_embed": {"proj": {"kernel": leaf(2, 2, 3, 4), "bias": leaf(4)}}, "cls_token": leaf(1, 1, 4),
               "norm": {"scale": leaf(4), "bias": leaf(4)}}
    for i in range(depth):
        encoder[f"blocks_{i}"] = {"attn": {"qkv": {"kernel": leaf(4, 12)}}, "norm1": {"scale": leaf(4)}}
    return {"encoder": encoder, "head": {"kernel": leaf(4, 3), "bias": leaf(3)}}


@pytest.mark.parametrize("depth, decay", [(4, 0.75), (12, 0.65)])
def test_scales_follow_maes_param_groups_lrd(depth, decay):
    scales = traverse_util.flatten_dict(layer_decay.lr_scales(_params(depth), depth, decay))
    num_layers = depth + 1  # MAE: len(blocks) + 1; scale = decay ** (num_layers - layer_id)
    for path, scale in scales.items():
        if path[0] == "head" or path[1] == "norm":
            expected = 1.0  # layer_id = num_layers
        elif path[1] in ("patch_embed", "cls_token"):
            expected = decay ** num_layers  # layer_id 0
        else:
            expected = decay ** (num_layers - (int(path[1].split("_")[1]) + 1))
        assert scale == pytest.approx(expected, rel=1e-12), path
    assert scales[("encoder", f"blocks_{depth - 1}", "attn", "qkv", "kernel")] == pytest.approx(decay)


def test_scanned_blocks_are_refused():
    with pytest.raises(ValueError, match="unrolled blocks"):
        layer_decay.layer_id(("encoder", "blocks", "attn"), 4)


def test_each_leaf_moves_by_its_factor_times_the_plain_adamw_step():
    depth, decay = 2, 0.5
    params = _params(depth)
    cfg = default_finetune_config().optim
    cfg.update(warmup_steps=0, lr=1e-2, ref_batch=8)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    scales = layer_decay.lr_scales(params, depth, decay)
    plain = optax.chain(layer_decay.optim.make_optimizer(cfg, 8, 10))
    decayed = layer_decay.make_optimizer(cfg, 8, 10, scales)
    u_plain, _ = plain.update(grads, plain.init(params), params)
    u_decayed, _ = decayed.update(grads, decayed.init(params), params)
    for (path, a), (_, b), (_, s) in zip(*(sorted(traverse_util.flatten_dict(t).items())
                                           for t in (u_plain, u_decayed, scales))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a) * s, rtol=1e-6, err_msg=str(path))


def test_the_head_learns_at_its_own_scale_and_its_input_standardisation_never_moves():
    depth, decay = 2, 0.5
    params = _params(depth)
    params["head"].update(input_mean=jnp.full((4,), 0.7), input_std=jnp.full((4,), 0.2))
    cfg = default_finetune_config().optim
    cfg.update(warmup_steps=0, lr=1e-2, ref_batch=8, wd=0.5)
    scales = layer_decay.lr_scales(params, depth, decay, head_scale=10.0)
    flat = traverse_util.flatten_dict(scales)
    assert flat[("head", "kernel")] == flat[("head", "bias")] == 10.0
    assert flat[("head", "input_mean")] == flat[("head", "input_std")] == 0.0
    assert flat[("encoder", "norm", "scale")] == 1.0  # the final norm keeps MAE's factor
    tx = layer_decay.make_optimizer(cfg, 8, 10, scales)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert not np.any(np.asarray(updates["head"]["input_mean"]))
    assert not np.any(np.asarray(updates["head"]["input_std"]))
    assert np.all(np.asarray(updates["head"]["kernel"]) != 0)
