"""Context / target masks for JEPA pretraining, sampled on device with static shapes.

A JEPA step encodes a *context* subset of the patch grid and predicts the target encoder's features
at *target* cells. This module draws those subsets. Three strategies share one pipeline:

1. ``regions(u)`` (strategy specific) turns a vector of uniforms into boolean grid masks,
   ``[n_ctx, gh, gw]`` for the contexts and ``[n_tgt, gh, gw]`` for the targets, using only
   broadcast ``jnp.arange`` comparisons.
2. ``select_cells`` (base.py) turns each mask into exactly ``K`` indices with ``lax.top_k(mask + uniform noise)``.
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
from mefem_jax.masking.base import Masker, Masks
from mefem_jax.masking.config import MASK_RULES, default_mask_config, make_masker

__all__ = ["MASK_RULES", "Masker", "Masks", "default_mask_config", "make_masker"]
