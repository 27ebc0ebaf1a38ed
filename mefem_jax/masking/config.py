"""The `mask` config section and `make_masker`: config + patch grid -> the strategy's `Masker`, with every
static slot count fixed."""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from mefem_jax import config_checks as checks
from mefem_jax.masking.base import Masker
from mefem_jax.masking.multiblock import make_multiblock
from mefem_jax.masking.quadrant import make_quadrant
from mefem_jax.masking.stripes import make_stripes


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


_FACTORIES = {"stripes": make_stripes, "quadrant": make_quadrant, "multiblock": make_multiblock}

# Start-up checks of `mask` (config_checks.check_section); the grid-dependent ones stay in make_masker,
# which knows the grid.
MASK_RULES = (
    checks.one_of("strategy", _FACTORIES),
    checks.one_of("quadrant.q", (1, 2, 3)),
    checks.positive("stripes.k"),
    checks.ordered_pair("stripes.ratio", 0, 1),
    checks.positive("multiblock.n_pred", "multiblock.n_enc", "multiblock.min_keep"),
    checks.ordered_pair("multiblock.enc_scale", 0, 1),
    checks.ordered_pair("multiblock.pred_scale", 0, 1),
)


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
