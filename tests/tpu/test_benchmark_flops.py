"""The benchmark's MFU numerator: the analytic FLOP count of one train step agrees with XLA's own count.

XLA's `cost_analysis` also counts element-wise work (LayerNorm, exact GELU's erf, softmax, AdamW), so it
sits above the matmul-only analytic count, never below: on this width-64 toy a forward pass alone counts
12 % more than its matmuls, and the whole step 17 %. A missing term (the predictor's pass per target set,
the 2x of a backward pass, the EMA target's forward) moves the ratio by 20 % or more; so did counting the
context's patch embedding over the whole grid after its pixels came to be gathered first (0.89), and a
smaller slip, an input gradient for the images, moves it by 4 % (1.13).
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
    assert 1.15 <= ratio <= 1.20, ratio  # measured: 1.171
