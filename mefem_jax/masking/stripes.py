"""Axial-stripe masking (*interpretation* of MeFEm's): the context is a union of full-length row and/or
column bands, the target the rest, with the context ratio inside its window by construction.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mefem_jax.masking.base import Masker, ceil_count, floor_count, read_range, uniform_int


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
        w = uniform_int(u_width[i], jnp.maximum(w_min, remaining - after * w_max),
                         jnp.minimum(w_max, remaining - after * w_min))
        widths.append(w)
        remaining = remaining - w
    widths = jnp.stack(widths)[jnp.argsort(u_order)]
    # Spread the free cells over the k + 1 gaps: k sorted draws from [0, free] (inclusive, so the
    # last band can end on the last cell) give the cumulative slack before each band.
    free = jnp.maximum(length - total - (k - 1), 0)
    slack = jnp.sort(uniform_int(u_slack, 0, free))
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
        orient = uniform_int(u[0], 0, len(self.totals) - 1)
        pair = uniform_int(u[1], 0, counts[orient] - 1)
        rows_total, cols_total = table[orient, pair, 0], table[orient, pair, 1]
        # Both axes are always drawn (static shapes); an axis with total 0 is unused and masked off.
        placeholder = k * self.width[0]
        row_on = _bands(u[2:2 + 3 * k], gh, k, self.width,
                        jnp.where(rows_total > 0, rows_total, placeholder))
        col_on = _bands(u[2 + 3 * k:], gw, k, self.width,
                        jnp.where(cols_total > 0, cols_total, placeholder))
        ctx = (row_on & (rows_total > 0))[:, None] | (col_on & (cols_total > 0))[None, :]
        return ctx[None], ~ctx[None]


def make_stripes(cfg, grid: tuple[int, int]) -> StripeMasker:
    gh, gw = grid
    n = gh * gw
    orientation = cfg.orientation
    if orientation not in _ORIENTATIONS + ("random",):
        raise ValueError(f"stripes.orientation={orientation!r}; expected one of "
                         f"{_ORIENTATIONS + ('random',)}")
    k = int(cfg.k)
    if k < 1:
        raise ValueError(f"stripes.k={k} must be >= 1")
    w_min, w_max = read_range(cfg, "width", "stripes", 0)
    if w_min != int(w_min) or w_max != int(w_max):
        raise ValueError(f"stripes.width=({w_min}, {w_max}) must be whole patches")
    w_min, w_max = int(w_min), int(w_max)
    r_min, r_max = read_range(cfg, "ratio", "stripes", 0.0, 1.0)
    k_ctx, k_tgt = floor_count(r_min * n), n - ceil_count(r_max * n)
    if k_ctx < 1:
        raise ValueError(f"stripes.ratio[0]={r_min} leaves no context slot on a {gh}x{gw} grid "
                         f"(floor({r_min} * {n}) = 0); raise it")
    if k_tgt < 1:
        raise ValueError(f"stripes.ratio[1]={r_max} leaves no target slot on a {gh}x{gw} grid "
                         f"({n} - ceil({r_max} * {n}) = 0); lower it")
    cells_lo, cells_hi = ceil_count(r_min * n), floor_count(r_max * n)

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
