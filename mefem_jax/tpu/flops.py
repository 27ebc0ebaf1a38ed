"""Analytic model FLOPs of one train step: what MFU is measured against.

Counted by hand because XLA cannot count them for us: `cost_analysis()` counts the body of a scanned
layer loop once (the default `model.scan_layers=True` step is such a loop) and also counts element-wise
work. Only matmuls are counted, 2*M*N*K each: the patch-embed convolution, qkv / proj / MLP and
attention's QK^T and AV. The backward pass is twice the forward for the trained context encoder and
predictor (once for the context's patch embedding, whose input, the images, needs no gradient); the EMA
target encoder runs forward only. `tests/tpu/test_benchmark_flops.py` checks the count
against XLA's on an unrolled step.
"""
from __future__ import annotations

from mefem_jax.models.predictor import predictor_from_config
from mefem_jax.models.vit import encoder_dims


def vit_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """Forward matmul FLOPs of `depth` pre-norm blocks on one sequence of `tokens` tokens.

    Per block: qkv 2*T*D*3D, proj 2*T*D*D, MLP 2 * 2*T*D*(r*D), attention QK^T and AV 2*T*T*D each
    (summed over heads). LayerNorm, softmax, GELU and residual adds are not matmuls and not counted.
    """
    hidden = int(width * mlp_ratio)
    per_block = 2 * tokens * width * (3 * width + width + 2 * hidden) + 4 * tokens * tokens * width
    return depth * per_block


def step_flops(config, masker, batch: int) -> dict[str, int]:
    """Model FLOPs of one train step at global batch `batch`, with the forward pieces that make it up."""
    width, depth, _ = encoder_dims(config.model)
    pred = predictor_from_config(config.model, config.predictor)
    p = config.model.patch_size
    n = masker.grid[0] * masker.grid[1]
    n_ctx, k_ctx, n_tgt, k_tgt = masker.n_ctx, masker.k_ctx, masker.n_tgt, masker.k_tgt
    def patch_embed(patches: int) -> int:  # conv k=s=p: one 3p^2 -> D matmul per patch
        return 2 * patches * (3 * p * p) * width

    target = patch_embed(n) + vit_flops(1 + n, width, depth)
    # Each context set gathers the pixels of its Kc patches (padding slots included), embeds only those,
    # then runs 1 + Kc tokens.
    context = n_ctx * (patch_embed(k_ctx) + vit_flops(1 + k_ctx, width, depth))
    # Per context set: D -> Dp embed of its 1 + Kc tokens (I-JEPA embeds once, then repeats the result
    # for each target set). Per (context, target) pair: the blocks on 1 + Kc + 1 + Kt tokens and the
    # Dp -> D projection of the 1 + Kt predicted slots.
    predictor = n_ctx * 2 * (1 + k_ctx) * width * pred.width
    predictor += n_ctx * n_tgt * (vit_flops(2 + k_ctx + k_tgt, pred.width, pred.depth, pred.mlp_ratio)
                                  + 2 * (1 + k_tgt) * pred.width * width)
    per_image = {"target_fwd": target, "context_fwd": context, "predictor_fwd": predictor}
    out = {k: batch * v for k, v in per_image.items()}
    # Backward = 2x forward, except the context's patch embedding: its input is the images, which take
    # no gradient, so only its weight gradient (1x) is computed.
    no_input_grad = batch * n_ctx * patch_embed(k_ctx)
    out["total"] = out["target_fwd"] + 3 * (out["context_fwd"] + out["predictor_fwd"]) - no_input_grad
    return out
