"""What every masking strategy shares: the `Masks` it returns, the `Masker` pipeline that turns a
strategy's boolean regions into static-length index sets, and the config readers the strategies use.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Masks(NamedTuple):
    """Patch indices into the row-major (gh, gw) grid for a batch of samples."""

    ctx_idx: jax.Array    # int32 [B, n_ctx, Kc]
    ctx_valid: jax.Array  # bool  [B, n_ctx, Kc]  False = padding slot (index still distinct, in range)
    tgt_idx: jax.Array    # int32 [B, n_tgt, Kt]
    tgt_valid: jax.Array  # bool  [B, n_tgt, Kt]


def uniform_int(u: jax.Array, lo, hi) -> jax.Array:
    """Map uniforms in [0, 1) to integers uniform in [lo, hi] (inclusive; bounds may be traced)."""
    return jnp.minimum(lo + jnp.floor(u * (hi - lo + 1)).astype(jnp.int32), hi)


def select_cells(noise: jax.Array, regions: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Pick exactly ``k`` cells per region: region cells first, in random order. [n, gh, gw] -> [n, k]."""
    flat = regions.reshape(regions.shape[0], -1)
    # noise is in [0, 1), so it never lifts an outside cell (score < 1) above a region cell (>= 1).
    _, idx = jax.lax.top_k(flat.astype(jnp.float32) + noise, k)
    valid = jnp.take_along_axis(flat, idx, axis=1)
    return idx.astype(jnp.int32), valid


@dataclasses.dataclass(frozen=True)
class Masker:
    """A pure, hashable mask sampler; ``masker(rng, batch_size)`` works inside ``jax.jit``.

    Subclasses implement ``regions(u)``: one sample's regions as a deterministic function of
    ``n_draws`` uniforms. The whole batch's randomness is ONE ``jax.random.uniform`` call, and
    integers, subsets and offsets are derived from those floats: each ``jax.random`` call adds a
    threefry kernel to the step's HLO (~0.4 s of CPU compile apiece).
    """

    grid: tuple[int, int]
    n_ctx: int
    k_ctx: int
    n_tgt: int
    k_tgt: int

    @property
    def n_draws(self) -> int:
        """How many uniforms ``regions`` consumes per sample."""
        raise NotImplementedError

    def regions(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Full (not subsampled) context and target masks of one sample: bool [n_ctx|n_tgt, gh, gw]."""
        raise NotImplementedError

    def sample_with_regions(self, rng: jax.Array, batch_size: int
                            ) -> tuple[Masks, tuple[jax.Array, jax.Array]]:
        """The batch's masks and the regions they were subsampled from (for tests and plots)."""
        n_cells = self.grid[0] * self.grid[1]
        u = jax.random.uniform(
            rng, (batch_size, self.n_draws + (self.n_ctx + self.n_tgt) * n_cells), jnp.float32)

        def one(u):
            ctx, tgt = self.regions(u[:self.n_draws])
            noise = u[self.n_draws:].reshape(self.n_ctx + self.n_tgt, n_cells)
            ctx_idx, ctx_valid = select_cells(noise[:self.n_ctx], ctx, self.k_ctx)
            tgt_idx, tgt_valid = select_cells(noise[self.n_ctx:], tgt, self.k_tgt)
            return Masks(ctx_idx, ctx_valid, tgt_idx, tgt_valid), (ctx, tgt)

        return jax.vmap(one)(u)

    def __call__(self, rng: jax.Array, batch_size: int) -> Masks:
        return self.sample_with_regions(rng, batch_size)[0]


def read_range(cfg, name: str, knob: str, lo_bound: float, hi_bound: float | None = None) -> tuple:
    """Read a (lo, hi) pair and check lo_bound < lo <= hi <= hi_bound."""
    value = tuple(cfg[name])
    if len(value) != 2 or not value[0] <= value[1] or not value[0] > lo_bound or (
            hi_bound is not None and value[1] > hi_bound):
        upper = f" <= {hi_bound}" if hi_bound is not None else ""
        raise ValueError(f"{knob}.{name}={value} must be a pair (lo, hi) with {lo_bound} < lo <= hi{upper}")
    return value


def floor_count(x: float) -> int:
    return math.floor(x + 1e-9)  # 0.29 * 100 is 28.999999999999996 in floats


def ceil_count(x: float) -> int:
    return math.ceil(x - 1e-9)
