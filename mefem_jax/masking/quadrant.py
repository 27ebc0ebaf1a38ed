"""Quadrant masking (*interpretation*): the context is `q` of the four grid quadrants, the target the rest."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mefem_jax.masking.base import Masker


@dataclasses.dataclass(frozen=True)
class QuadrantMasker(Masker):
    """Context = ``q`` of the 4 quadrants chosen at random; target = every other cell.

    On an odd grid the middle row (column) belongs to no quadrant: each quadrant is
    ``(gh // 2) x (gw // 2)``, so any choice of ``q`` quadrants has the same size and ``Kc`` is exact
    with every slot valid. The middle seam is therefore always target, never context.
    """

    q: int

    @property
    def n_draws(self):
        return 4

    def regions(self, u):
        gh, gw = self.grid
        hq, wq = gh // 2, gw // 2
        rows, cols = jnp.arange(gh)[:, None], jnp.arange(gw)[None, :]
        top, bottom = rows < hq, rows >= gh - hq
        left, right = cols < wq, cols >= gw - wq
        in_quadrant = (top | bottom) & (left | right)
        quadrant = 2 * bottom.astype(jnp.int32) + right.astype(jnp.int32)  # 0 TL, 1 TR, 2 BL, 3 BR
        # The q quadrants with the largest of 4 uniform draws: a uniformly random q-subset.
        rank = jnp.argsort(jnp.argsort(-u))
        chosen = rank < self.q
        ctx = in_quadrant & chosen[quadrant]
        return ctx[None], ~ctx[None]


def make_quadrant(cfg, grid: tuple[int, int]) -> QuadrantMasker:
    gh, gw = grid
    q = int(cfg.q)
    if not 1 <= q <= 3:
        raise ValueError(f"quadrant.q={q} must be 1, 2 or 3 (q=4 leaves no target on even grids)")
    if gh < 2 or gw < 2:
        raise ValueError(f"quadrant masking needs a grid of at least 2x2, got {gh}x{gw}")
    k_ctx = q * (gh // 2) * (gw // 2)
    return QuadrantMasker(grid=grid, n_ctx=1, k_ctx=k_ctx, n_tgt=1, k_tgt=gh * gw - k_ctx, q=q)
