"""Optimiser and the three schedules of the I-JEPA recipe (docs/METHOD.md 6).

  learning rate   linear warm-up start_lr -> lr, then cosine down to final_lr
  weight decay    cosine from wd to final_wd (I-JEPA *increases* it, 0.04 -> 0.4)
  EMA momentum    linear from ema[0] to ema[1] over `ema_horizon * total_steps` steps

All three are pure functions of the integer step, so the train step evaluates them on device and a resumed
run continues on exactly the same curve. The update made at step `t` (0-based) uses the values at `t`.

AdamW semantics follow torch.optim.AdamW, which decays by `lr * wd * p` (decoupled, but scaled by the
learning rate). optax reproduces that with `scale_by_adam -> add_decayed_weights(wd) -> scale(-lr)`:
the update is `-lr * (adam + wd * p)`, identical to torch's `p * (1 - lr*wd) - lr * adam`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from mefem_jax import config_checks as checks


def default_optim_config() -> ml_collections.ConfigDict:
    """I-JEPA ViT-H/14 recipe numbers; learning rates are quoted at `ref_batch` and scaled linearly."""
    return ml_collections.ConfigDict(
        dict(
            lr=1e-3,
            start_lr=2e-4,
            final_lr=1e-6,
            ref_batch=2048,  # lr, start_lr, final_lr are given for this global batch
            warmup_steps=1000,
            wd=0.04,
            final_wd=0.4,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            grad_clip=0.0,  # global-norm clip; 0 disables it (I-JEPA does not clip)
            ema=(0.996, 1.0),
            # I-JEPA stretches its momentum schedule by 1.25 so it never reaches 1.0; 1.0 here reaches
            # ema[1] exactly on the last step.
            ema_horizon=1.0,
        )
    )


# Start-up checks of `optim` (config_checks.check_section).
OPTIM_RULES = (
    checks.positive("lr", "ref_batch", "eps", "ema_horizon"),
    checks.non_negative("start_lr", "final_lr", "warmup_steps", "wd", "final_wd", "grad_clip"),
    checks.in_range("b1", "b2", lo=0, hi=1, closed_hi=False),
    checks.ordered_pair("ema", 0, 1),
)


def scaled_lrs(cfg: ml_collections.ConfigDict, batch_size: int) -> tuple[float, float, float]:
    """(start_lr, lr, final_lr) after the linear batch-size scaling rule."""
    scale = batch_size / cfg.ref_batch
    return cfg.start_lr * scale, cfg.lr * scale, cfg.final_lr * scale


def lr_schedule(cfg, batch_size: int, total_steps: int):
    start, peak, final = scaled_lrs(cfg, batch_size)
    warmup = max(int(cfg.warmup_steps), 0)
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = start + (peak - start) * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def wd_schedule(cfg, total_steps: int):
    def schedule(step):
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
        return cfg.final_wd + (cfg.wd - cfg.final_wd) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))

    return schedule


def ema_schedule(cfg, total_steps: int):
    m0, m1 = cfg.ema
    horizon = max(cfg.ema_horizon * total_steps, 1.0)

    def schedule(step):
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / horizon, 0.0, 1.0)
        return m0 + (m1 - m0) * frac

    return schedule


def decay_mask(params):
    """True for the leaves that get weight decay: Dense and conv `kernel`s only.

    Biases, LayerNorm scales, the CLS / mask / query tokens and a learned position embedding are not
    decayed (timm's `no_weight_decay` convention; I-JEPA's "no bias, no 1-D" rule leaves its (1,1,D)
    mask token decayed, which only pulls an embedding towards zero).
    """
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def make_optimizer(cfg, batch_size: int, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts += [
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(wd_schedule(cfg, total_steps), mask=decay_mask),
        optax.scale_by_learning_rate(lr_schedule(cfg, batch_size, total_steps)),
    ]
    return optax.chain(*parts)


def ema_update(target, online, momentum):
    """target <- m * target + (1 - m) * online, leaf by leaf, in the target's dtype."""
    return jax.tree.map(lambda t, o: (momentum * t + (1.0 - momentum) * o).astype(t.dtype), target, online)
