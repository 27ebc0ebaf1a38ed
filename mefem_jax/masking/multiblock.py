"""I-JEPA multiblock masking: target rectangles, a square context block minus every target cell, with a
`min_keep` guarantee for the context.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mefem_jax.masking.base import Masker, read_range, uniform_int


def _block(u: jax.Array, grid: tuple[int, int], scale, aspect) -> jax.Array:
    """One rectangle from 4 uniforms: area ~ U(scale) * N, height/width ~ U(aspect), placed anywhere."""
    gh, gw = grid
    area = (scale[0] + u[0] * (scale[1] - scale[0])) * (gh * gw)
    a = aspect[0] + u[1] * (aspect[1] - aspect[0])
    # Same rounding as _block_side_np, which make_masker uses to size the target slots.
    h = jnp.clip(jnp.floor(jnp.sqrt(area * a) + 0.5), 1, gh).astype(jnp.int32)
    w = jnp.clip(jnp.floor(jnp.sqrt(area / a) + 0.5), 1, gw).astype(jnp.int32)
    # Inclusive upper bound: the block may end on the last row/column (I-JEPA's randint(0, H - h)
    # never lets it).
    top = uniform_int(u[2], 0, gh - h)
    left = uniform_int(u[3], 0, gw - w)
    rows, cols = jnp.arange(gh), jnp.arange(gw)
    return (((rows >= top) & (rows < top + h))[:, None]
            & ((cols >= left) & (cols < left + w))[None, :])


@dataclasses.dataclass(frozen=True)
class MultiblockMasker(Masker):
    """I-JEPA multiblock with a by-construction ``min_keep`` guarantee.

    Scale and aspect are drawn per block and per sample (I-JEPA draws one size per batch); the static
    ``Kt`` is the smallest block any draw can produce, so every target slot of an untouched block is
    valid and larger blocks are subsampled. A context is its block minus all target cells. When that
    leaves fewer than ``min_keep`` cells, the missing cells are taken back at random from the targets
    inside the context block: they join the context and leave every target (their target slots, if
    selected, are flagged invalid). Context slots beyond the context's size are flagged invalid rather
    than filled with target cells.
    """

    enc_scale: tuple[float, float]
    pred_scale: tuple[float, float]
    aspect: tuple[float, float]
    min_keep: int

    @property
    def n_draws(self):
        return 4 * (self.n_ctx + self.n_tgt) + self.n_ctx * self.grid[0] * self.grid[1]

    def blocks(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Raw context (square) and target (rectangle) blocks: bool [n_ctx, gh, gw], [n_tgt, gh, gw]."""
        u = u.reshape(self.n_ctx + self.n_tgt, 4)
        enc = jax.vmap(lambda v: _block(v, self.grid, self.enc_scale, (1.0, 1.0)))(u[:self.n_ctx])
        pred = jax.vmap(lambda v: _block(v, self.grid, self.pred_scale, self.aspect))(u[self.n_ctx:])
        return enc, pred

    def carve(self, u: jax.Array, enc: jax.Array, pred: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Blocks -> disjoint context and target regions, each context keeping >= min_keep cells."""
        n_ctx, n = enc.shape[0], enc.shape[1] * enc.shape[2]
        enc, pred = enc.reshape(n_ctx, n), pred.reshape(pred.shape[0], n)
        targeted = jnp.any(pred, axis=0)
        deficit = jnp.maximum(self.min_keep - jnp.sum(enc & ~targeted, axis=1), 0)  # [n_ctx]
        # Reclaim `deficit` random targeted cells of each context block: rank the candidates by
        # noise (candidates first) and keep the first `deficit` ranks.
        candidates = enc & targeted
        score = candidates + u.reshape(candidates.shape)
        order = jnp.argsort(-score, axis=1)
        rank = jnp.argsort(order, axis=1)
        reclaimed = jnp.any(candidates & (rank < deficit[:, None]), axis=0)
        tgt = pred & ~reclaimed
        ctx = enc & ~jnp.any(tgt, axis=0)
        return ctx.reshape((n_ctx,) + self.grid), tgt.reshape((-1,) + self.grid)

    def regions(self, u):
        n_block_draws = 4 * (self.n_ctx + self.n_tgt)
        return self.carve(u[n_block_draws:], *self.blocks(u[:n_block_draws]))


def _block_side_np(area, a, side: int):
    """Numpy mirror of _block's rounding: round-half-up of sqrt(area * a), clipped to [1, side]."""
    return np.clip(np.floor(np.sqrt(area * a) + 0.5), 1, side)


def _smallest_block(grid: tuple[int, int], scale, aspect) -> int:
    """Exact minimum cell count of ``_block`` over its whole (scale, aspect) range.

    Height and width grow with the scale, so the minimum sits at the smallest scale. There, h*w is a
    step function of the aspect that changes only where sqrt(A*a) or sqrt(A/a) crosses a half
    integer, so evaluating every breakpoint and every midpoint between them visits every step.
    float32 on device may land a hair off any of these values, so the area is nudged down and, as h
    grows and w shrinks with the aspect, h is read just left and w just right of each point: the
    result is the true minimum except exactly at such a hair's-breadth tie, where it errs low (safe).
    """
    eps = 1e-6
    gh, gw = grid
    area = scale[0] * gh * gw * (1 - eps)
    lo, hi = aspect[0] * (1 - eps), aspect[1] * (1 + eps)
    halves = np.arange(max(gh, gw) + 2) + 0.5  # every rounding threshold below the clip
    breaks = np.concatenate([halves ** 2 / area, area / halves ** 2])
    points = np.sort(np.concatenate([[lo, hi], breaks[(breaks > lo) & (breaks < hi)]]))
    a = np.concatenate([points, (points[1:] + points[:-1]) / 2])
    h = _block_side_np(area, a * (1 - eps), gh)
    w = _block_side_np(area, 1 / (a * (1 + eps)), gw)
    return int(np.min(h * w))


@functools.lru_cache(maxsize=32)
def _context_size_quantile(masker: MultiblockMasker, quantile: float, samples: int = 4096) -> int:
    """Monte-Carlo quantile of the multiblock context size, reproducible on every host.

    Runs the real sampler (one implementation, no numpy twin to drift) with a fixed threefry key on
    the CPU backend, so the static slot count is the same on TPU, GPU and CPU hosts and whatever
    ``jax_default_prng_impl`` a launcher sets. Where the CPU backend is disabled (JAX_PLATFORMS
    without "cpu") it runs on the default backend: still the same on every host of a job, though it
    could differ by a slot from a CPU run; pin ``multiblock.ctx_keep`` when that matters.
    """
    try:
        device = jax.devices("cpu")[0]
    except RuntimeError:
        device = jax.devices()[0]
    with jax.default_device(device):
        key = jax.random.key(0, impl="threefry2x32")
        u = jax.random.uniform(key, (samples, masker.n_draws), jnp.float32)
        sizes = jax.jit(jax.vmap(lambda v: jnp.sum(masker.regions(v)[0], axis=(1, 2))))(u)
    return int(np.quantile(np.asarray(sizes).ravel(), quantile, method="lower"))


def make_multiblock(cfg, grid: tuple[int, int]) -> MultiblockMasker:
    gh, gw = grid
    enc_scale = read_range(cfg, "enc_scale", "multiblock", 0.0, 1.0)
    pred_scale = read_range(cfg, "pred_scale", "multiblock", 0.0, 1.0)
    aspect = read_range(cfg, "aspect", "multiblock", 0.0)
    n_pred, n_enc, min_keep = int(cfg.n_pred), int(cfg.n_enc), int(cfg.min_keep)
    if n_pred < 1 or n_enc < 1:
        raise ValueError(f"multiblock.n_pred={n_pred} and multiblock.n_enc={n_enc} must be >= 1")
    # At least one context token: an encoder/predictor with every key masked has nothing to attend to.
    if min_keep < 1:
        raise ValueError(f"multiblock.min_keep={min_keep} must be >= 1")
    smallest_enc = _smallest_block(grid, enc_scale, (1.0, 1.0))
    if min_keep > smallest_enc:
        raise ValueError(f"multiblock.min_keep={min_keep} exceeds the smallest context block on a "
                         f"{gh}x{gw} grid ({smallest_enc} cells at multiblock.enc_scale[0]="
                         f"{enc_scale[0]}); lower min_keep or raise enc_scale")
    masker = MultiblockMasker(
        grid=grid, n_ctx=n_enc, k_ctx=min_keep, n_tgt=n_pred,
        k_tgt=_smallest_block(grid, pred_scale, aspect),
        enc_scale=enc_scale, pred_scale=pred_scale, aspect=aspect, min_keep=min_keep)
    ctx_keep = cfg.get("ctx_keep")
    if ctx_keep is None:
        # The context size varies a lot with target overlap (52-119 cells on 14x14). A slot count
        # at its 5th percentile pads only the smallest 5 % of contexts (invalid slots, no target
        # leakage) and randomly subsamples the rest; I-JEPA truncates to the batch minimum instead.
        k_ctx = max(min_keep, _context_size_quantile(masker, 0.05))
    else:
        k_ctx = int(ctx_keep)
        side = lambda s, n: int(_block_side_np(s * gh * gw, 1.0, n))
        largest = side(enc_scale[1], gh) * side(enc_scale[1], gw)  # the largest context block
        if not min_keep <= k_ctx <= largest:
            raise ValueError(f"multiblock.ctx_keep={k_ctx} must lie in [multiblock.min_keep="
                             f"{min_keep}, {largest}] on a {gh}x{gw} grid")
    return dataclasses.replace(masker, k_ctx=k_ctx)
