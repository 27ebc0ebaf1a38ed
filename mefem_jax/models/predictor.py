"""The I-JEPA predictor: a narrow ViT that predicts target-encoder tokens from context tokens.

One predictor sequence per (sample, target set), laid out as

    [ctx CLS | ctx patches (K_ctx) | CLS query | target slots (K_tgt)]

* context tokens (the context encoder's output) are projected D -> Dp and get the sin-cos
  position of their grid cell (zero for CLS);
* each target slot is the shared `mask_token` plus the position of the cell to predict;
* the CLS query is a learned token of its own, so the network can tell "predict CLS" apart
  from "predict a patch" (the sin-cos table is zero at CLS, which a mask token would not show).

MeFEm's probabilistic CLS reassignment decides per sample where CLS lives. `cls_in_ctx` True:
CLS is context, the CLS query is a dead slot that no token attends to. False: the context CLS
is hidden (the context encoder ran without it) and the CLS query is a real target that the
other slots may attend to, just as they attend to each other. Padding slots (`ctx_valid` /
`tgt_valid` False) are never keys. Shapes are static; only masks change between samples.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mefem_jax.models import attention_impl
from mefem_jax.models.vit import (attention_of, compute_dtype, encoder_dims, key_mask, layer_norm, patch_grid,
                                  run_blocks, sincos_pos_embed, trunc_normal)


def default_predictor_config() -> ml_collections.ConfigDict:
    """The `predictor` section: I-JEPA's narrow predictor (docs/METHOD.md 3); heads None = the encoder's."""
    return ml_collections.ConfigDict(dict(width=384, depth=6, heads=None))


# The keys that decide the predictor's parameter shapes (see vit.PARAM_SHAPE_KEYS).
PARAM_SHAPE_KEYS = ("width", "depth", "heads")


class Predictor(nn.Module):
    """Narrow ViT predictor; params float32, `dtype` is the compute dtype."""
    out_width: int  # the encoder's width D
    width: int = 384
    depth: int = 12
    heads: int = 12
    grid: tuple[int, int] = (14, 14)
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False  # blocks as one scanned subtree (see `vit.run_blocks`)
    attention: str = attention_impl.DEFAULT  # the encoder's model.attention (models/attention_impl.py)

    @nn.compact
    def __call__(self, ctx_tokens: jax.Array, ctx_idx: jax.Array, ctx_valid: jax.Array,
                 cls_in_ctx: jax.Array, tgt_idx: jax.Array, tgt_valid: jax.Array) -> jax.Array:
        """Predict the target encoder's tokens; returns `[B, 1 + K_tgt, D]`.

        ctx_tokens: `[B, 1 + K_ctx, D]` context-encoder output, CLS first.
        ctx_idx / ctx_valid: int32 / bool `[B, K_ctx]` grid cells of those patches, padding flags.
        cls_in_ctx: bool `[B]`; False = CLS was reassigned to the target.
        tgt_idx / tgt_valid: int32 / bool `[B, K_tgt]` grid cells to predict, padding flags.
        Slot 0 of the output is the CLS prediction, slots 1.. the predictions at `tgt_idx`.
        """
        batch, k_ctx = ctx_idx.shape
        if ctx_tokens.shape[:2] != (batch, 1 + k_ctx):
            raise ValueError(f"ctx_tokens {ctx_tokens.shape} does not match ctx_idx {ctx_idx.shape}")
        # Zero row at CLS; cell i of the grid is row 1 + i.
        pos = jnp.asarray(sincos_pos_embed(self.width, *self.grid))[0].astype(self.dtype)

        ctx = nn.Dense(self.width, dtype=self.dtype, kernel_init=trunc_normal(),
                       name="predictor_embed")(ctx_tokens)
        ctx_pos = jnp.concatenate([jnp.broadcast_to(pos[:1], (batch, 1, self.width)),
                                   pos[1 + ctx_idx]], axis=1)
        ctx = ctx + ctx_pos

        mask_token = self.param("mask_token", trunc_normal(), (1, 1, self.width), jnp.float32)
        cls_query = self.param("cls_query", trunc_normal(), (1, 1, self.width), jnp.float32)
        tgt = mask_token.astype(self.dtype) + pos[1 + tgt_idx]
        query = jnp.broadcast_to(cls_query.astype(self.dtype), (batch, 1, self.width))

        x = jnp.concatenate([ctx, query, tgt], axis=1)
        keys = jnp.concatenate([cls_in_ctx[:, None], ctx_valid, ~cls_in_ctx[:, None], tgt_valid],
                               axis=1)
        mask = key_mask(keys)

        x = run_blocks(x, mask, depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio,
                       dtype=self.dtype, remat=self.remat, scan=self.scan, attention=self.attention)
        # Only the CLS query and the target slots are predictions; drop the context rows before
        # the norm and projection so no work is spent on them.
        x = layer_norm(self.dtype, "predictor_norm")(x[:, 1 + k_ctx:])
        return nn.Dense(self.out_width, dtype=self.dtype, kernel_init=trunc_normal(),
                        name="predictor_proj")(x)


def predictor_from_config(model_cfg, predictor_cfg) -> Predictor:
    """Build the predictor for the encoder described by `model_cfg`.

    predictor_cfg: `width`, `depth`, `heads` (None = the encoder's heads, as in I-JEPA). The attention kernel
    is the encoder's `model.attention`.
    """
    enc_width, _, enc_heads = encoder_dims(model_cfg)
    heads = predictor_cfg.get("heads")
    heads = enc_heads if heads is None else heads
    if predictor_cfg.width % heads:
        raise ValueError(f"predictor width {predictor_cfg.width} is not divisible by heads {heads}")
    return Predictor(out_width=enc_width, width=predictor_cfg.width, depth=predictor_cfg.depth,
                     heads=heads, grid=patch_grid(model_cfg), dtype=compute_dtype(model_cfg.dtype),
                     remat=bool(model_cfg.remat), scan=bool(model_cfg.get("scan_layers", False)),
                     attention=attention_of(model_cfg, predictor_cfg.width // heads))
