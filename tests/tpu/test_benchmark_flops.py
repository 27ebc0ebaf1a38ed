"""The benchmark's MFU numerator: the analytic FLOP count of one train step agrees with XLA's own count.

XLA's `cost_analysis` also counts element-wise work (LayerNorm, GELU, softmax, AdamW), so it sits a few
percent above the matmul-only analytic count, never below. A missing term (the predictor's pass per
target set, the 2x of a backward pass, the EMA target's forward) would move the ratio by 20% or more.
Unrolled blocks: XLA counts a scanned loop's body once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from configs import vits
from mefem_jax.tpu.flops import step_flops
from mefem_jax.training.train_step import build, init_state, make_train_step


def test_analytic_step_flops_match_xla_cost_analysis():
    batch = 4
    config = vits.get_config("smoke")  # 112 px, float32
    config.model.update(width=64, depth=2, heads=2, scan_layers=False)
    config.mask.strategy = "multiblock"
    config.data.batch_size = batch
    config.predictor.update(width=32, depth=1, heads=2)
    pieces = build(config)
    masker = pieces.objective.masker
    assert masker.n_tgt > 1  # several target sets per context: the predictor runs once per pair
    state = jax.eval_shape(lambda key: init_state(pieces, key), jax.random.PRNGKey(0))
    images = jax.ShapeDtypeStruct((batch, 112, 112, 3), jnp.float32)
    compiled = jax.jit(make_train_step(pieces)).lower(state, images).compile()
    ratio = compiled.cost_analysis()["flops"] / step_flops(config, masker, batch)["total"]
    assert 1.0 <= ratio <= 1.06, ratio  # measured: 1.03
