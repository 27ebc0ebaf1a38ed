"""Mask samplers: static shapes, disjoint valid sets, geometry of each strategy, clear config errors.

Each (strategy, grid) is sampled ONCE, 500 batches x 8 samples in one jitted call (cached below), and
every property is checked on those 4000 samples with numpy. Geometry is checked on the full regions
the sampler returns next to the indices, and the indices are checked against those regions, so the
random subsampling step is covered too.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mefem_jax import masking

BATCHES, PER_BATCH = 500, 8
SAMPLES = BATCHES * PER_BATCH
GRIDS = [(7, 7), (14, 14)]
STRATEGIES = ["stripes", "quadrant", "multiblock"]
# Small context blocks and big targets: the context often loses everything to the targets, so the
# min_keep repair runs constantly; two context blocks exercise the multi-context path.
HEAVY = dict(enc_scale=(0.3, 0.4), pred_scale=(0.2, 0.3), n_enc=2, min_keep=20)


def _config(strategy, **overrides):
    cfg = masking.default_mask_config()
    cfg.strategy = strategy
    for name, value in overrides.items():
        cfg[strategy][name] = value
    return cfg


@functools.lru_cache(maxsize=None)
def _draw(masker, seed=0):
    """SAMPLES masks + regions of one masker, as numpy (shared by the tests through the cache)."""
    run = jax.jit(lambda key: masker.sample_with_regions(key, SAMPLES))
    masks, (ctx, tgt) = jax.device_get(run(jax.random.key(seed)))
    return masks, ctx, tgt


def _members(idx, valid, n_cells):
    """Index sets -> bool [S, n_sets, N] membership of the VALID slots."""
    out = np.zeros(idx.shape[:-1] + (n_cells,), bool)
    np.put_along_axis(out, idx, valid, axis=-1)
    return out


def _runs(line):
    """(start, length) of the runs of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], line.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts, ends - starts))


# ------------------------------------------------------------------------------------------------
# Invariants every strategy must satisfy


@pytest.mark.parametrize("strategy,grid,overrides", [(strategy, grid, {}) for strategy in STRATEGIES
                                                     for grid in GRIDS]
                         + [("multiblock", (14, 14), HEAVY)])
def test_indices_are_static_unique_disjoint_and_cover_the_grid(strategy, grid, overrides):
    masker = masking.make_masker(_config(strategy, **overrides), grid)
    masks, ctx, tgt = _draw(masker)
    n = grid[0] * grid[1]

    assert masks.ctx_idx.shape == masks.ctx_valid.shape == (SAMPLES, masker.n_ctx, masker.k_ctx)
    assert masks.tgt_idx.shape == masks.tgt_valid.shape == (SAMPLES, masker.n_tgt, masker.k_tgt)
    assert masks.ctx_idx.dtype == masks.tgt_idx.dtype == np.int32
    assert masks.ctx_valid.dtype == masks.tgt_valid.dtype == bool
    for idx in (masks.ctx_idx, masks.tgt_idx):
        assert idx.min() >= 0 and idx.max() < n
        # Padding slots included: every slot of a set is a distinct cell.
        assert np.all(np.diff(np.sort(idx, axis=-1), axis=-1) > 0)

    ctx_in = _members(masks.ctx_idx, masks.ctx_valid, n)
    tgt_in = _members(masks.tgt_idx, masks.tgt_valid, n)
    assert not np.any(ctx_in.any(1) & tgt_in.any(1)), "a cell is both valid context and valid target"

    # Valid slots are exactly the selected region cells; a set is padded only when its region is
    # smaller than K, and then it holds the whole region.
    for members, region, k in ((ctx_in, ctx, masker.k_ctx), (tgt_in, tgt, masker.k_tgt)):
        region = region.reshape(members.shape)
        assert not np.any(members & ~region)
        np.testing.assert_array_equal(members.sum(-1), np.minimum(region.sum(-1), k))

    # Every cell, last row and column included, is drawn as target and as context (quadrant: except
    # the middle seam of an odd grid, which belongs to no quadrant by design).
    ctx_freq = ctx_in.any(1).mean(0).reshape(grid)
    tgt_freq = tgt_in.any(1).mean(0).reshape(grid)
    assert np.all(tgt_freq > 0)
    may_be_context = np.ones(grid, bool)
    if strategy == "quadrant" and grid[0] % 2:
        may_be_context[grid[0] // 2, :] = False
    if strategy == "quadrant" and grid[1] % 2:
        may_be_context[:, grid[1] // 2] = False
    assert np.all(ctx_freq[may_be_context] > 0)
    assert np.all(ctx_freq[~may_be_context] == 0)


@pytest.mark.parametrize("strategy", ["stripes", "multiblock"])
def test_large_regions_are_subsampled_at_random_not_in_raster_order(strategy):
    grid = (14, 14)
    cfg = _config(strategy, slots="subsample") if strategy == "stripes" else _config(strategy)
    masker = masking.make_masker(cfg, grid)
    masks, ctx, _ = _draw(masker)
    n = grid[0] * grid[1]
    region = ctx.reshape(SAMPLES, masker.n_ctx, n)
    assert np.mean(region.sum(-1) > masker.k_ctx) > 0.5, "the test needs regions larger than Kc"
    chosen = _members(masks.ctx_idx, masks.ctx_valid, n)
    # P(cell kept | cell in the context region) must not depend on where the cell is: raster
    # truncation would keep the top-left and drop the bottom-right.
    rate = chosen.sum((0, 1)) / region.sum((0, 1))
    assert rate.max() / rate.min() < 1.3, rate.reshape(grid)
    assert abs(rate.reshape(grid)[-1].mean() / rate.reshape(grid)[0].mean() - 1) < 0.1


def test_sampler_compiles_once_for_fresh_keys():
    masker = masking.make_masker(_config("stripes"), (7, 7))
    traces = []

    def sample(key):
        traces.append(1)  # runs only while JAX traces, i.e. once per compilation
        return masker(key, 8)

    step = jax.jit(sample)
    keys = jax.random.split(jax.random.PRNGKey(0), 50)
    draws = [jax.device_get(step(key)) for key in keys]
    assert len(traces) == 1 and step._cache_size() == 1
    assert len({d.ctx_idx.tobytes() for d in draws}) == 50, "fresh keys must give fresh masks"


# ------------------------------------------------------------------------------------------------
# stripes


# Which axes carry bands: (rows, columns).
KINDS = {"cross": {(True, True)}, "vertical": {(False, True)},
         "random": {(True, False), (False, True), (True, True)}}


@pytest.mark.parametrize("orientation,grid", [("cross", (7, 7)), ("cross", (14, 14)),
                                              ("random", (14, 14)), ("vertical", (7, 7))])
def test_stripes_are_full_length_bands_with_bounded_width_and_ratio(orientation, grid):
    cfg = _config("stripes", orientation=orientation, slots="subsample")
    k, (w_min, w_max), (r_min, r_max) = cfg.stripes.k, cfg.stripes.width, cfg.stripes.ratio
    masker = masking.make_masker(cfg, grid)
    n = grid[0] * grid[1]
    assert (masker.k_ctx, masker.k_tgt) == (int(np.floor(r_min * n)), n - int(np.ceil(r_max * n)))
    masks, ctx, tgt = _draw(masker)
    assert masks.ctx_valid.all() and masks.tgt_valid.all()
    ctx, tgt = ctx[:, 0], tgt[:, 0]
    np.testing.assert_array_equal(tgt, ~ctx)

    ratio = ctx.mean((1, 2))
    assert ratio.min() >= r_min and ratio.max() <= r_max

    full_rows, full_cols = ctx.all(2), ctx.all(1)
    # The context is exactly the union of its full-length rows and columns ...
    np.testing.assert_array_equal(ctx, full_rows[:, :, None] | full_cols[:, None, :])
    kinds = set()
    for rows, cols in zip(full_rows, full_cols):
        row_bands, col_bands = _runs(rows), _runs(cols)
        # ... made of k bands per used axis, each of a legal width.
        assert len(row_bands) in (0, k) and len(col_bands) in (0, k)
        assert all(w_min <= w <= w_max for _, w in row_bands + col_bands)
        kinds.add((len(row_bands) > 0, len(col_bands) > 0))
    assert kinds == KINDS[orientation]


@pytest.mark.parametrize("grid", [(7, 7), (14, 14)])
def test_padded_stripes_keep_every_cell(grid):
    """slots="pad" (the default): the valid context slots are exactly the stripe cells and the valid target
    slots exactly the rest, so nothing is dropped; the spare slots are flagged invalid."""
    masker = masking.make_masker(_config("stripes"), grid)
    masks, ctx, tgt = _draw(masker)
    n = grid[0] * grid[1]
    sizes = ctx[:, 0].sum((1, 2))
    assert masker.k_ctx == sizes.max() and masker.k_tgt == n - sizes.min()
    np.testing.assert_array_equal(masks.ctx_valid[:, 0].sum(1), sizes)
    np.testing.assert_array_equal(masks.tgt_valid[:, 0].sum(1), n - sizes)
    for i in range(0, len(sizes), 97):
        got_ctx = np.zeros(n, bool)
        got_ctx[masks.ctx_idx[i, 0][masks.ctx_valid[i, 0]]] = True
        got_tgt = np.zeros(n, bool)
        got_tgt[masks.tgt_idx[i, 0][masks.tgt_valid[i, 0]]] = True
        np.testing.assert_array_equal(got_ctx, ctx[i, 0].ravel())
        np.testing.assert_array_equal(got_tgt, ~ctx[i, 0].ravel())
    with pytest.raises(ValueError, match="stripes.slots"):
        masking.make_masker(_config("stripes", slots="crop"), grid)


# ------------------------------------------------------------------------------------------------
# quadrant


@pytest.mark.parametrize("grid,q", [((7, 7), 1), ((14, 14), 1), ((7, 7), 2)])
def test_quadrant_context_is_exactly_q_quadrants(grid, q):
    masker = masking.make_masker(_config("quadrant", q=q), grid)
    masks, ctx, tgt = _draw(masker)
    assert masks.ctx_valid.all() and masks.tgt_valid.all()
    gh, gw = grid
    hq, wq = gh // 2, gw // 2
    assert masker.k_ctx == q * hq * wq and masker.k_tgt == gh * gw - q * hq * wq
    ctx, tgt = ctx[:, 0], tgt[:, 0]
    np.testing.assert_array_equal(tgt, ~ctx)
    quadrants = np.zeros((4, gh, gw), bool)
    for i, (rows, cols) in enumerate([(slice(0, hq), slice(0, wq)), (slice(0, hq), slice(gw - wq, gw)),
                                      (slice(gh - hq, gh), slice(0, wq)),
                                      (slice(gh - hq, gh), slice(gw - wq, gw))]):
        quadrants[i, rows, cols] = True
    covered = (ctx[:, None] & quadrants[None]).sum((2, 3))  # [S, 4] context cells per quadrant
    full = covered == hq * wq
    assert np.all(full | (covered == 0)), "a quadrant is partly context"
    assert np.all(full.sum(1) == q)
    np.testing.assert_array_equal(ctx, np.einsum("sq,qhw->shw", full, quadrants) > 0)
    # All 4-choose-q subsets occur.
    assert len({tuple(row) for row in full}) == {1: 4, 2: 6, 3: 4}[q]


# ------------------------------------------------------------------------------------------------
# multiblock

@functools.lru_cache(maxsize=None)
def _blocks_and_carve(masker, seed=1):
    """Raw blocks and the regions carved from them, drawn through the public two-step path."""
    u = jax.random.uniform(jax.random.key(seed), (SAMPLES, masker.n_draws))
    n_block = 4 * (masker.n_ctx + masker.n_tgt)

    def run(u):
        enc, pred = masker.blocks(u[:n_block])
        return enc, pred, masker.carve(u[n_block:], enc, pred)

    enc, pred, (ctx, tgt) = jax.device_get(jax.jit(jax.vmap(run))(u))
    return enc, pred, ctx, tgt


def _box(block):
    """Height, width and whether a bool [gh, gw] mask is one filled rectangle."""
    rows, cols = _runs(block.any(1)), _runs(block.any(0))
    h, w = rows[0][1], cols[0][1]
    return h, w, len(rows) == len(cols) == 1 and block.sum() == h * w


@pytest.mark.parametrize("grid", GRIDS)
def test_multiblock_blocks_are_rectangles_of_the_configured_size(grid):
    cfg = _config("multiblock")
    mb = cfg.multiblock
    masker = masking.make_masker(cfg, grid)
    enc, pred, _, _ = _blocks_and_carve(masker)
    n = grid[0] * grid[1]
    areas = []
    for blocks, (s_lo, s_hi), (a_lo, a_hi) in ((pred, mb.pred_scale, mb.aspect),
                                                (enc, mb.enc_scale, (1.0, 1.0))):
        for block in blocks.reshape(-1, *grid):
            h, w, is_rectangle = _box(block)
            assert is_rectangle
            # h = round(sqrt(s*N*a)), w = round(sqrt(s*N/a)) for some s, a in range (no clipping
            # at these scales), so the continuous sides lie within half a cell of h and w.
            assert (h - 0.5) * (w - 0.5) <= s_hi * n and (h + 0.5) * (w + 0.5) >= s_lo * n
            assert (h - 0.5) / (w + 0.5) <= a_hi and (h + 0.5) / (w - 0.5) >= a_lo
            if blocks is pred:
                areas.append(h * w)
    # Kt is the smallest target block the sampler can make: never undercut, and reached.
    assert min(areas) == masker.k_tgt


@pytest.mark.parametrize("grid", GRIDS)
def test_multiblock_target_slots_are_sized_by_the_smallest_possible_block(grid):
    # Sweep scale and aspect over a dense lattice (ends included) instead of trusting random draws.
    cfg = _config("multiblock")
    masker = masking.make_masker(cfg, grid)
    lattice = np.linspace(0, 1, 401, dtype=np.float32)
    lattice[-1] = np.nextafter(np.float32(1), np.float32(0))
    s, a = np.meshgrid(lattice, lattice)
    u = np.full((s.size, masker.n_ctx + masker.n_tgt, 4), 0.5, np.float32)
    u[:, masker.n_ctx, 0], u[:, masker.n_ctx, 1] = s.ravel(), a.ravel()
    _, pred = jax.jit(jax.vmap(masker.blocks))(jnp.asarray(u.reshape(s.size, -1)))
    assert int(pred[:, 0].sum((1, 2)).min()) == masker.k_tgt


@pytest.mark.parametrize("grid,overrides", [((14, 14), {}), ((7, 7), {}), ((14, 14), HEAVY)])
def test_multiblock_carving_keeps_min_keep_and_only_moves_target_cells(grid, overrides):
    masker = masking.make_masker(_config("multiblock", **overrides), grid)
    min_keep = masker.min_keep
    enc, pred, ctx, tgt = _blocks_and_carve(masker)
    targeted, kept = pred.any(1), tgt.any(1)
    assert np.all(ctx.sum((2, 3)) >= min_keep)
    assert not np.any(ctx & kept[:, None]), "context and target overlap"
    assert not np.any(ctx & ~enc) and not np.any(tgt & ~pred)
    # Context loses nothing it did not have to: all of its block outside the targets stays.
    assert not np.any(enc & ~targeted[:, None] & ~ctx)
    # A reclaimed cell leaves every target at once and joins a context.
    np.testing.assert_array_equal(tgt, pred & kept[:, None])
    reclaimed = targeted & ~kept
    assert not np.any(reclaimed & ~ctx.any(1))
    # Only as many cells are reclaimed as the contexts were short of min_keep.
    deficit = np.maximum(min_keep - (enc & ~targeted[:, None]).sum((2, 3)), 0).sum(1)
    assert np.all(reclaimed.sum((1, 2)) <= deficit)
    if masker.n_ctx == 1:
        np.testing.assert_array_equal(reclaimed.sum((1, 2)), deficit)
    if overrides:
        assert np.mean(deficit > 0) > 0.3, "the heavy config must exercise the repair"


def test_multiblock_sampled_masks_honour_min_keep():
    masker = masking.make_masker(_config("multiblock", **HEAVY), (14, 14))
    assert masker.k_ctx == masker.min_keep  # the 5th percentile is below min_keep here
    masks, _, _ = _draw(masker)
    assert masks.ctx_valid.sum(-1).min() >= masker.min_keep
    assert not masks.tgt_valid.all(), "repaired samples flag the reclaimed target slots invalid"
    # ctx_keep overrides the estimate.
    fixed = masking.make_masker(_config("multiblock", ctx_keep=30, **HEAVY), (14, 14))
    assert fixed.k_ctx == 30 and fixed.k_tgt == masker.k_tgt


@pytest.mark.parametrize("grid", GRIDS)
def test_multiblock_context_slots_sit_at_the_5th_percentile(grid):
    masker = masking.make_masker(_config("multiblock"), grid)
    _, ctx, _ = _draw(masker)  # other draws than the config-time estimate used
    sizes = ctx.sum((2, 3))
    assert 0.02 < np.mean(sizes < masker.k_ctx) <= 0.08
    assert np.mean(sizes <= masker.k_ctx) >= 0.04


# ------------------------------------------------------------------------------------------------
# config errors


@pytest.mark.parametrize("strategy,overrides,grid,knob", [
    ("stripes", dict(ratio=(0.9, 0.95)), (14, 14), "stripes.ratio"),           # unreachable ratio
    ("stripes", dict(orientation="horizontal", k=1, width=(2, 2), ratio=(0.2, 0.3)), (14, 14),
     "stripes.ratio"),                                                            # falls in a gap
    ("stripes", dict(ratio=(0.01, 0.5)), (7, 7), "stripes.ratio[0]"),            # Kc = 0
    ("stripes", dict(ratio=(0.25, 0.999)), (7, 7), "stripes.ratio[1]"),          # Kt = 0
    ("stripes", dict(k=3, width=(3, 3)), (7, 7), "stripes.k"),                   # bands do not fit
    ("stripes", dict(width=(3, 1)), (14, 14), "stripes.width"),
    ("stripes", dict(orientation="diagonal"), (14, 14), "stripes.orientation"),
    ("quadrant", dict(q=4), (14, 14), "quadrant.q"),
    ("quadrant", dict(q=0), (14, 14), "quadrant.q"),
    ("multiblock", dict(min_keep=40), (7, 7), "multiblock.min_keep"),            # > smallest block
    ("multiblock", dict(min_keep=0), (7, 7), "multiblock.min_keep"),
    ("multiblock", dict(ctx_keep=5), (7, 7), "multiblock.ctx_keep"),             # < min_keep
    ("multiblock", dict(pred_scale=(0.2, 1.5)), (7, 7), "multiblock.pred_scale"),
])
def test_bad_configs_raise_naming_the_knob(strategy, overrides, grid, knob):
    with pytest.raises(ValueError, match=knob.replace(".", r"\.").replace("[", r"\[")):
        masking.make_masker(_config(strategy, **overrides), grid)


def test_unknown_strategy_is_rejected():
    cfg = masking.default_mask_config()
    cfg.strategy = "checkerboard"
    with pytest.raises(ValueError, match="mask.strategy"):
        masking.make_masker(cfg, (14, 14))
