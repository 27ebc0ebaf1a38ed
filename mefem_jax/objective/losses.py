"""The MeFEm loss pieces (docs/METHOD.md 5): target normalisation, circular loss weights, CLS reassignment,
and the weighted per-token regression loss.

Everything here is a pure function of arrays; `jepa.py` wires them to the encoders and the masks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mefem_jax import config_checks as checks


def default_loss_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            kind="smooth_l1",  # or "l2"
            beta=1.0,  # smooth-L1 transition point (torch's default, as I-JEPA uses)
            target_ln_eps=1e-5,  # torch F.layer_norm's default eps, as I-JEPA normalises its targets
            circular=dict(
                enabled=True,
                profile="cosine",  # or "gaussian"
                # Radii are in units of the half image side: r = 1 at the middle of an edge, ~1.41 at a corner.
                r0=0.45,  # full weight inside this radius: the inner face (eyes, nose, mouth)
                r1=1.0,  # weight reaches w_min here: hair, ears, background
                w_min=0.25,
            ),
            cls=dict(
                p_target=0.5,  # probability, per sample, that CLS is moved from the context to the target
                loss_weight=1.0,  # weight of the CLS slot relative to one patch token of weight 1
            ),
            # Optional anti-collapse term, NOT part of MeFEm (weight 0 = off, the published recipe).
            # LeJEPA's SIGReg on the context encoder's CLS and mean-pooled outputs: see `sigreg`.
            sigreg=dict(
                weight=0.0,  # loss = jepa_loss + weight * sigreg
                slices=256,  # random 1-D projections per step
                knots=17,  # quadrature points of the characteristic-function integral on [0, t_max]
                t_max=3.0,
            ),
        )
    )


# Start-up checks of `loss` (config_checks.check_section).
LOSS_RULES = (
    checks.one_of("kind", ("smooth_l1", "l2")),
    checks.positive("beta", "target_ln_eps"),
    checks.probability("cls.p_target"),
    checks.non_negative("cls.loss_weight"),
    checks.one_of("circular.profile", ("cosine", "gaussian")),
    checks.in_range("circular.w_min", lo=0, hi=1, closed_lo=False),
    checks.non_negative("sigreg.weight"),
    checks.positive("sigreg.slices", "sigreg.knots", "sigreg.t_max"),
)


# --------------------------------------------------------------------------------------- targets


def normalize_targets(h: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Layer norm without affine over the channel axis, in float32 (I-JEPA's `F.layer_norm(h, (D,))`)."""
    h = h.astype(jnp.float32)
    mean = h.mean(-1, keepdims=True)
    var = jnp.square(h - mean).mean(-1, keepdims=True)
    return (h - mean) * jax.lax.rsqrt(var + eps)


# ------------------------------------------------------------------------------- circular weights


def patch_radii(grid: tuple[int, int]) -> np.ndarray:
    """Distance of each patch centre from the image centre, in units of the half side (float64)."""
    gh, gw = grid
    y = (np.arange(gh) + 0.5) / gh * 2.0 - 1.0
    x = (np.arange(gw) + 0.5) / gw * 2.0 - 1.0
    return np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)


def circular_weights(grid: tuple[int, int], r0: float, r1: float, w_min: float, profile: str = "cosine") -> np.ndarray:
    """The (gh, gw) loss-weight matrix: 1 inside r0, falling smoothly to w_min at r1, mean 1 over the grid.

    Faces are centred by the crop, so the weights favour the face over hair and background. The raw
    profile is a function of the radius alone (hence symmetric and non-increasing in r); the final
    division by its mean keeps the loss scale comparable with unweighted training.
    """
    if not 0.0 <= r0 < r1:
        raise ValueError(f"loss.circular needs 0 <= r0 < r1, got r0={r0}, r1={r1}")
    if not 0.0 < w_min <= 1.0:
        raise ValueError(f"loss.circular.w_min must be in (0, 1], got {w_min}")
    r = patch_radii(grid)
    t = np.clip((r - r0) / (r1 - r0), 0.0, 1.0)  # 0 inside r0, 1 beyond r1
    if profile == "cosine":
        fall = 0.5 * (1.0 + np.cos(np.pi * t))
    elif profile == "gaussian":
        # Gaussian with sigma = (r1 - r0) / 2, shifted and rescaled so it reaches exactly 0 at r1.
        g = np.exp(-0.5 * (2.0 * t) ** 2)
        fall = (g - np.exp(-2.0)) / (1.0 - np.exp(-2.0))
    else:
        raise ValueError(f"loss.circular.profile must be 'cosine' or 'gaussian', got {profile!r}")
    w = w_min + (1.0 - w_min) * fall
    return w / w.mean()


def loss_weight_grid(loss_cfg, grid: tuple[int, int]) -> np.ndarray:
    c = loss_cfg.circular
    if not c.enabled:
        return np.ones(grid, np.float64)
    return circular_weights(grid, c.r0, c.r1, c.w_min, c.profile)


# ----------------------------------------------------------------------------------- the loss


def token_loss(pred: jax.Array, target: jax.Array, kind: str = "smooth_l1", beta: float = 1.0) -> jax.Array:
    """Per-token regression loss averaged over channels: [..., D] -> [...], float32."""
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "smooth_l1":
        a = jnp.abs(diff)
        per = jnp.where(a < beta, 0.5 * jnp.square(diff) / beta, a - 0.5 * beta)
    elif kind == "l2":
        per = jnp.square(diff)
    else:
        raise ValueError(f"loss.kind must be 'smooth_l1' or 'l2', got {kind!r}")
    return per.mean(-1)


def slot_weights(weight_grid: jax.Array, tgt_idx: jax.Array, tgt_valid: jax.Array, cls_target: jax.Array,
                 cls_weight: float) -> jax.Array:
    """Weights of the predictor's output slots [..., 1 + Kt]: the CLS slot first, then the target patches.

    A patch slot weighs w[idx] (circular weighting) or 0 when it is padding; the CLS slot weighs
    `cls_weight` when CLS was reassigned to the target for that sample and 0 when it stayed in the context
    (the slot still exists so shapes never change with the coin flip).
    """
    patch_w = jnp.take(weight_grid.reshape(-1), tgt_idx) * tgt_valid
    cls_w = jnp.where(cls_target, cls_weight, 0.0).astype(patch_w.dtype)
    cls_w = jnp.broadcast_to(cls_w.reshape(cls_w.shape + (1,) * (patch_w.ndim - cls_w.ndim)), patch_w.shape[:-1] + (1,))
    return jnp.concatenate([cls_w, patch_w], axis=-1)


def weighted_loss(pred: jax.Array, target: jax.Array, weights: jax.Array, kind: str, beta: float):
    """sum(w * l) / sum(w) over every slot of the batch, plus the per-slot losses for metrics."""
    per_slot = token_loss(pred, target, kind, beta)
    total = jnp.sum(weights * per_slot) / jnp.maximum(jnp.sum(weights), 1e-12)
    return total, per_slot


# ------------------------------------------------------------------------------ anti-collapse


def sigreg(x: jax.Array, rng: jax.Array, slices: int = 256, knots: int = 17, t_max: float = 3.0) -> jax.Array:
    """Sketched isotropic-Gaussian regulariser (LeJEPA's SIGReg): 0 when `x` [N, D] looks like N(0, I).

    A JEPA's EMA target can drift towards a low-rank representation that is easy to predict (the
    effective rank halves in the first few hundred steps of a small run). SIGReg pushes the batch of
    embeddings towards an isotropic Gaussian, which has full rank by definition: it draws `slices`
    random unit directions, projects the batch onto each, and scores every 1-D projection with the
    Epps-Pulley statistic

        N * integral |phi_emp(t) - exp(-t^2/2)|^2 exp(-t^2/2) dt,

    the weighted squared distance between the projection's empirical characteristic function and
    the standard normal's. The integrand is even in t, so we integrate over [0, t_max] (trapezoid
    rule on `knots` points) and double it; beyond t = 3 the Gaussian window is below 1 %. The
    statistic is O(1) for Gaussian data and grows like N for collapsed data. Fresh directions every
    step (from `rng`) make the sketch unbiased over training at a cost of O(N * D * slices).
    """
    n, d = x.shape
    x = x.astype(jnp.float32)
    directions = jax.random.normal(rng, (d, slices), jnp.float32)
    directions = directions / jnp.linalg.norm(directions, axis=0, keepdims=True)
    proj = x @ directions  # [N, S]
    t = jnp.linspace(0.0, t_max, knots)
    window = jnp.exp(-0.5 * t ** 2)  # also the standard normal's characteristic function
    arg = proj[:, :, None] * t  # [N, S, T]
    err = jnp.square(jnp.cos(arg).mean(0) - window) + jnp.square(jnp.sin(arg).mean(0))  # [S, T]
    integrand = err * window
    dt = t[1] - t[0]
    integral = 2.0 * dt * (integrand.sum(-1) - 0.5 * (integrand[:, 0] + integrand[:, -1]))
    return n * integral.mean()
