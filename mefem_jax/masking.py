"""Context / target masks for JEPA pretraining, sampled on device with static shapes.

A JEPA step encodes a *context* subset of the patch grid and predicts the target encoder's features
at *target* cells. This module draws those subsets. Three strategies share one pipeline:

1. ``regions(u)`` (strategy specific) turns a vector of uniforms into boolean grid masks,
   ``[n_ctx, gh, gw]`` for the contexts and ``[n_tgt, gh, gw]`` for the targets, using only
   broadcast ``jnp.arange`` comparisons.
2. ``_select`` turns each mask into exactly ``K`` indices with ``lax.top_k(mask + uniform noise)``.
   Noise lies in [0, 1), so every cell of the mask outranks every cell outside it, and a region
   larger than ``K`` is subsampled uniformly at random. (Official I-JEPA instead truncates masks
   to the batch minimum in raster order, which systematically drops the bottom/right of the context.)
   A slot that had to be filled from outside the region is flagged ``valid=False``; its index is still
   a distinct in-range cell, so gathers never go out of bounds.

Every ``K`` is a static function of the config and the grid, fixed in ``make_masker``, so the jitted
train step compiles once. Masks are drawn inside the jitted step from the step's PRNG key rather than
in the Grain pipeline: they are a few hundred integer comparisons per sample (free next to the ViT),
the data pipeline stays model agnostic, and a resumed run reproduces its masks from the train-state
key alone.

Strategies (the paper's exact masking parameters are not available; the two marked *interpretation*
are our documented reading of its figure, every knob is in the config):

* ``multiblock`` -- I-JEPA: ``n_pred`` target rectangles (scale ~ U(pred_scale), aspect ~ U(aspect)),
  ``n_enc`` square context blocks (scale ~ U(enc_scale)) minus every target cell; a context left
  with fewer than ``min_keep`` cells takes the shortfall back from the targets (those target slots
  are then flagged invalid), so downstream code must accept a target set with invalid slots.
* ``quadrant`` (*interpretation*) -- the context is ``q`` random quadrants, the target is the rest.
* ``stripes`` (*interpretation*, MeFEm's "axial stripes") -- the context is a union of full-length
  horizontal and/or vertical bands, the target is the rest. Faces are organised along these axes
  (eye line, mouth line, nose column), so stripes make the model predict anatomy across the face.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict
from mefem_jax import config_checks as checks


class Masks(NamedTuple):
    """Patch indices into the row-major (gh, gw) grid for a batch of samples."""

    ctx_idx: jax.Array    # int32 [B, n_ctx, Kc]
    ctx_valid: jax.Array  # bool  [B, n_ctx, Kc]  False = padding slot (index still distinct, in range)
    tgt_idx: jax.Array    # int32 [B, n_tgt, Kt]
    tgt_valid: jax.Array  # bool  [B, n_tgt, Kt]


def default_mask_config() -> ml_collections.ConfigDict:
    """Masking knobs with their defaults; ``configs/`` override these per model size."""
    cfg = ml_collections.ConfigDict()
    cfg.strategy = "stripes"  # "stripes" | "multiblock" | "quadrant"
    # I-JEPA ViT-H/14 defaults. ctx_keep (unset) = context slot count; by default it is the 5th
    # percentile of the context size, estimated once at config time (see make_masker).
    cfg.multiblock = ml_collections.ConfigDict(dict(
        enc_scale=(0.85, 1.0), pred_scale=(0.15, 0.2), aspect=(0.75, 1.5),
        n_pred=4, n_enc=1, min_keep=10, ctx_keep=config_dict.placeholder(int)))
    cfg.quadrant = ml_collections.ConfigDict(dict(q=1))  # number of the 4 quadrants given as context
    # k bands per used axis ("cross" draws k row bands AND k column bands); widths in patches.
    # At 224 px (14x14 patches of 16 px) an eye line or mouth is 1-3 patch rows tall and the nose
    # column 1-3 patches wide, hence width (1, 3). With the multiblock defaults an I-JEPA context
    # keeps 32-61 % of the grid (5th-95th percentile, median 45 %); stripes keep 25-50 %, a little
    # less, because every target cell lies within a few patches of a full-length stripe, which makes
    # each prediction easier than from a single block. On the 7x7 grid of the 112 px smoke run the
    # same knobs remain feasible (2 stripes per axis of width 1 for "cross").
    # slots: how the variable-size regions become static index sets. "pad" (default): as many slots as
    # the largest region, spare slots flagged invalid (masked as attention keys, zero loss weight), so
    # every stripe cell is context and every other cell is target. "subsample": as many slots as the
    # smallest region, larger regions randomly subsampled (cheaper, but the stripes get holes and up
    # to a third of the target goes unscored with the default ratio window).
    cfg.stripes = ml_collections.ConfigDict(dict(
        orientation="cross", k=2, width=(1, 3), ratio=(0.25, 0.5), slots="pad"))
    return cfg


def validate_mask_config(cfg) -> None:
    """Start-up checks of `mask`; the grid-dependent ones stay in make_masker, which knows the grid."""
    checks.one_of(cfg, "mask", "strategy", _FACTORIES)
    checks.one_of(cfg.quadrant, "mask.quadrant", "q", (1, 2, 3))
    checks.positive(cfg.stripes, "mask.stripes", "k")
    checks.ordered_pair(cfg.stripes, "mask.stripes", "ratio", 0, 1)
    checks.positive(cfg.multiblock, "mask.multiblock", "n_pred", "n_enc", "min_keep")
    for key in ("enc_scale", "pred_scale"):
        checks.ordered_pair(cfg.multiblock, "mask.multiblock", key, 0, 1)


def _uniform_int(u: jax.Array, lo, hi) -> jax.Array:
    """Map uniforms in [0, 1) to integers uniform in [lo, hi] (inclusive; bounds may be traced)."""
    return jnp.minimum(lo + jnp.floor(u * (hi - lo + 1)).astype(jnp.int32), hi)


def _select(noise: jax.Array, regions: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
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
            ctx_idx, ctx_valid = _select(noise[:self.n_ctx], ctx, self.k_ctx)
            tgt_idx, tgt_valid = _select(noise[self.n_ctx:], tgt, self.k_tgt)
            return Masks(ctx_idx, ctx_valid, tgt_idx, tgt_valid), (ctx, tgt)

        return jax.vmap(one)(u)

    def __call__(self, rng: jax.Array, batch_size: int) -> Masks:
        return self.sample_with_regions(rng, batch_size)[0]


# --------------------------------------------------------------------------------------------------
# quadrant (interpretation)

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


# --------------------------------------------------------------------------------------------------
# stripes (interpretation)

_ORIENTATIONS = ("horizontal", "vertical", "cross")


def _bands(u: jax.Array, length: int, k: int, width: tuple[int, int], total: jax.Array) -> jax.Array:
    """``k`` bands on an axis of ``length`` cells, widths in ``width`` summing to ``total``: bool [length].

    ``u`` holds 3k uniforms. Bands are separated by at least one free cell, so each stays a distinct
    stripe of legal width. The caller guarantees ``k*w_min <= total <= k*w_max`` and
    ``total + k - 1 <= length``.
    """
    w_min, w_max = width
    u_width, u_order, u_slack = u[:k], u[k:2 * k], u[2 * k:]
    # Widths one at a time, each drawn from the range that keeps the remaining total reachable by
    # the bands still to come: feasible by construction, no rejection. Shuffled afterwards so the
    # first band is not systematically the constrained one.
    widths, remaining = [], total
    for i in range(k):  # k is a small static int
        after = k - 1 - i
        w = _uniform_int(u_width[i], jnp.maximum(w_min, remaining - after * w_max),
                         jnp.minimum(w_max, remaining - after * w_min))
        widths.append(w)
        remaining = remaining - w
    widths = jnp.stack(widths)[jnp.argsort(u_order)]
    # Spread the free cells over the k + 1 gaps: k sorted draws from [0, free] (inclusive, so the
    # last band can end on the last cell) give the cumulative slack before each band.
    free = jnp.maximum(length - total - (k - 1), 0)
    slack = jnp.sort(_uniform_int(u_slack, 0, free))
    starts = slack + jnp.cumsum(widths) - widths + jnp.arange(k)
    cells = jnp.arange(length)[None, :]
    return jnp.any((cells >= starts[:, None]) & (cells < (starts + widths)[:, None]), axis=0)


def _stripe_cells(grid: tuple[int, int], rows: int, cols: int) -> int:
    """Cells covered by row bands of total height ``rows`` and column bands of total width ``cols``."""
    gh, gw = grid
    return rows * gw + cols * gh - rows * cols


@dataclasses.dataclass(frozen=True)
class StripeMasker(Masker):
    """Context = union of full-length stripes, target = the rest; the context ratio is exact by design.

    ``k`` counts bands per used axis: "horizontal" draws k row bands, "vertical" k column bands,
    "cross" both, "random" picks one of the three per sample. Bands on an axis never touch.
    Disjoint bands cover a number of cells that depends only on their total widths (rows R, columns C):
    ``R*gw + C*gh - R*C``. ``make_masker`` lists, per orientation, every (R, C) whose coverage lies in
    the ratio window; a sample draws an orientation, then a pair uniformly from its list, then splits
    R and C into band widths and places the bands at random. No draw can miss the window.
    """

    k: int
    width: tuple[int, int]
    totals: tuple[tuple[tuple[int, int], ...], ...]  # per orientation in play: feasible (R, C) pairs

    @property
    def n_draws(self):
        return 2 + 6 * self.k  # orientation, (R, C) pair, 3k per axis for the bands

    def regions(self, u):
        gh, gw = self.grid
        k = self.k
        longest = max(len(t) for t in self.totals)
        table = jnp.array([list(t) + [t[0]] * (longest - len(t)) for t in self.totals], jnp.int32)
        counts = jnp.array([len(t) for t in self.totals], jnp.int32)
        orient = _uniform_int(u[0], 0, len(self.totals) - 1)
        pair = _uniform_int(u[1], 0, counts[orient] - 1)
        rows_total, cols_total = table[orient, pair, 0], table[orient, pair, 1]
        # Both axes are always drawn (static shapes); an axis with total 0 is unused and masked off.
        placeholder = k * self.width[0]
        row_on = _bands(u[2:2 + 3 * k], gh, k, self.width,
                        jnp.where(rows_total > 0, rows_total, placeholder))
        col_on = _bands(u[2 + 3 * k:], gw, k, self.width,
                        jnp.where(cols_total > 0, cols_total, placeholder))
        ctx = (row_on & (rows_total > 0))[:, None] | (col_on & (cols_total > 0))[None, :]
        return ctx[None], ~ctx[None]


# --------------------------------------------------------------------------------------------------
# multiblock (I-JEPA)

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
    top = _uniform_int(u[2], 0, gh - h)
    left = _uniform_int(u[3], 0, gw - w)
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


# --------------------------------------------------------------------------------------------------
# config -> Masker

def _range(cfg, name: str, knob: str, lo_bound: float, hi_bound: float | None = None) -> tuple:
    """Read a (lo, hi) pair and check lo_bound < lo <= hi <= hi_bound."""
    value = tuple(cfg[name])
    if len(value) != 2 or not value[0] <= value[1] or not value[0] > lo_bound or (
            hi_bound is not None and value[1] > hi_bound):
        upper = f" <= {hi_bound}" if hi_bound is not None else ""
        raise ValueError(f"{knob}.{name}={value} must be a pair (lo, hi) with {lo_bound} < lo <= hi{upper}")
    return value


def _floor(x: float) -> int:
    return math.floor(x + 1e-9)  # 0.29 * 100 is 28.999999999999996 in floats


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def _make_stripes(cfg, grid: tuple[int, int]) -> StripeMasker:
    gh, gw = grid
    n = gh * gw
    orientation = cfg.orientation
    if orientation not in _ORIENTATIONS + ("random",):
        raise ValueError(f"stripes.orientation={orientation!r}; expected one of "
                         f"{_ORIENTATIONS + ('random',)}")
    k = int(cfg.k)
    if k < 1:
        raise ValueError(f"stripes.k={k} must be >= 1")
    w_min, w_max = _range(cfg, "width", "stripes", 0)
    if w_min != int(w_min) or w_max != int(w_max):
        raise ValueError(f"stripes.width=({w_min}, {w_max}) must be whole patches")
    w_min, w_max = int(w_min), int(w_max)
    r_min, r_max = _range(cfg, "ratio", "stripes", 0.0, 1.0)
    k_ctx, k_tgt = _floor(r_min * n), n - _ceil(r_max * n)
    if k_ctx < 1:
        raise ValueError(f"stripes.ratio[0]={r_min} leaves no context slot on a {gh}x{gw} grid "
                         f"(floor({r_min} * {n}) = 0); raise it")
    if k_tgt < 1:
        raise ValueError(f"stripes.ratio[1]={r_max} leaves no target slot on a {gh}x{gw} grid "
                         f"({n} - ceil({r_max} * {n}) = 0); lower it")
    cells_lo, cells_hi = _ceil(r_min * n), _floor(r_max * n)

    def axis_totals(length: int, axis: str) -> list[int]:
        # k disjoint bands separated by free cells: total width in [k*w_min, k*w_max], <= length-(k-1).
        totals = list(range(k * w_min, min(k * w_max, length - (k - 1)) + 1))
        if not totals:
            raise ValueError(f"stripes.k={k} {axis} bands of width >= stripes.width[0]={w_min}, one "
                             f"cell apart, do not fit in {length} {axis}s of a {gh}x{gw} grid")
        return totals

    orientations = _ORIENTATIONS if orientation == "random" else (orientation,)
    tables = []
    for o in orientations:
        rows = axis_totals(gh, "row") if o in ("horizontal", "cross") else [0]
        cols = axis_totals(gw, "column") if o in ("vertical", "cross") else [0]
        pairs = [(r, c) for r in rows for c in cols]
        table = tuple(p for p in pairs if cells_lo <= _stripe_cells(grid, *p) <= cells_hi)
        if not table:
            ratios = sorted({round(_stripe_cells(grid, *p) / n, 3) for p in pairs})
            raise ValueError(
                f"stripes.ratio=({r_min}, {r_max}) cannot be met on a {gh}x{gw} grid by orientation "
                f"{o!r} with stripes.k={k} and stripes.width=({w_min}, {w_max}): its context ratios "
                f"are {ratios}. Widen stripes.ratio or change stripes.width / stripes.k.")
        tables.append(table)
    slots = cfg.get("slots", "pad")
    if slots == "pad":
        sizes = [_stripe_cells(grid, *p) for table in tables for p in table]
        k_ctx, k_tgt = max(sizes), n - min(sizes)
    elif slots != "subsample":
        raise ValueError(f"stripes.slots={slots!r}; expected 'pad' or 'subsample'")
    return StripeMasker(grid=grid, n_ctx=1, k_ctx=k_ctx, n_tgt=1, k_tgt=k_tgt, k=k,
                        width=(w_min, w_max), totals=tuple(tables))


def _make_quadrant(cfg, grid: tuple[int, int]) -> QuadrantMasker:
    gh, gw = grid
    q = int(cfg.q)
    if not 1 <= q <= 3:
        raise ValueError(f"quadrant.q={q} must be 1, 2 or 3 (q=4 leaves no target on even grids)")
    if gh < 2 or gw < 2:
        raise ValueError(f"quadrant masking needs a grid of at least 2x2, got {gh}x{gw}")
    k_ctx = q * (gh // 2) * (gw // 2)
    return QuadrantMasker(grid=grid, n_ctx=1, k_ctx=k_ctx, n_tgt=1, k_tgt=gh * gw - k_ctx, q=q)


def _make_multiblock(cfg, grid: tuple[int, int]) -> MultiblockMasker:
    gh, gw = grid
    enc_scale = _range(cfg, "enc_scale", "multiblock", 0.0, 1.0)
    pred_scale = _range(cfg, "pred_scale", "multiblock", 0.0, 1.0)
    aspect = _range(cfg, "aspect", "multiblock", 0.0)
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


_FACTORIES = {"stripes": _make_stripes, "quadrant": _make_quadrant, "multiblock": _make_multiblock}


def make_masker(mask_cfg: ml_collections.ConfigDict, grid: tuple[int, int]) -> Masker:
    """Validate ``mask_cfg`` for a ``grid`` of (rows, cols) patches and fix every static K.

    Raises ValueError naming the offending knob when the config cannot be honoured on this grid.
    """
    grid = (int(grid[0]), int(grid[1]))
    if min(grid) < 1:
        raise ValueError(f"grid={grid} must have at least one row and one column")
    strategy = mask_cfg.strategy
    if strategy not in _FACTORIES:
        raise ValueError(f"mask.strategy={strategy!r}; expected one of {sorted(_FACTORIES)}")
    return _FACTORIES[strategy](mask_cfg[strategy], grid)
