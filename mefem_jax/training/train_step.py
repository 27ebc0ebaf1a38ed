"""The train state and the one jitted update: gradients of the JEPA loss, AdamW, then the EMA target.

`make_train_step` returns a pure function `(state, images) -> (state, metrics)`; `train.py` jits it with
the state donated (and, on a mesh, with the shardings from `sharding.py`). The per-step randomness is
`fold_in(state.rng, state.step)`, so a resumed run draws exactly the masks an uninterrupted one would.
`images` is the pipeline's uint8 batch: the step normalises it and, with data.augment_on=device, crops
and flips it first (data/device_augment.py), with a key folded from the same per-step key, so a
resumed run also draws the same crops. Float images are taken as already normalised.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from mefem_jax.data import device_augment
from mefem_jax.masking import make_masker
from mefem_jax.models.predictor import predictor_from_config
from mefem_jax.models.vit import encoder_from_config, patch_grid
from mefem_jax.objective import jepa
from mefem_jax.training import optim


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates done
    params: Any  # {"encoder": ..., "predictor": ...}, float32 master weights
    target_params: Any  # EMA copy of params["encoder"]
    opt_state: Any
    rng: jax.Array  # base key (raw uint32[2]); never split in place, see module docstring


@dataclasses.dataclass(frozen=True)
class Pieces:
    """Everything static that the step closes over, built once from the config."""

    objective: jepa.JEPA
    tx: optax.GradientTransformation
    lr: Callable
    wd: Callable
    ema: Callable
    image_size: int
    input_size: int  # px of the uint8 images the step takes (data.source_size with device crops)
    prepare_images: Callable  # (uint8 batch, rng) -> normalised float32 [b, S, S, 3]


def build(config) -> Pieces:
    encoder = encoder_from_config(config.model)
    predictor = predictor_from_config(config.model, config.predictor)
    masker = make_masker(config.mask, patch_grid(config.model))
    batch, steps = config.data.batch_size, config.total_steps
    return Pieces(
        objective=jepa.make_jepa(config, encoder, predictor, masker),
        tx=optim.make_optimizer(config.optim, batch, steps),
        lr=optim.lr_schedule(config.optim, batch, steps),
        wd=optim.wd_schedule(config.optim, steps),
        ema=optim.ema_schedule(config.optim, steps),
        image_size=config.model.image_size,
        input_size=device_augment.input_size(config.data, config.model.image_size),
        prepare_images=device_augment.prepare_from_config(config.data, config.model.image_size),
    )


def init_state(pieces: Pieces, rng: jax.Array) -> TrainState:
    """Fresh parameters; the target encoder starts as an exact copy of the context encoder.

    Jitted: run eagerly, flax's init dispatches hundreds of tiny ops one by one (~20 s on a 2-core CPU).
    `train.py` wraps it again with out_shardings, which places every leaf directly in its shards."""
    return jax.jit(functools.partial(_init_state, pieces))(rng)


def _init_state(pieces: Pieces, rng: jax.Array) -> TrainState:
    obj = pieces.objective
    enc_rng, pred_rng, state_rng = jax.random.split(rng, 3)
    s = pieces.image_size
    images = jnp.zeros((1, s, s, 3), jnp.float32)
    enc_params = obj.encoder.init(enc_rng, images)["params"]
    masks, cls_target = obj.sample(pred_rng, 1)
    ctx = obj.encoder.apply({"params": enc_params}, images, patch_idx=masks.ctx_idx[:, 0])
    pred_params = obj.predictor.init(
        pred_rng, ctx, masks.ctx_idx[:, 0], masks.ctx_valid[:, 0], ~cls_target, masks.tgt_idx[:, 0],
        masks.tgt_valid[:, 0])["params"]
    params = {"encoder": enc_params, "predictor": pred_params}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        target_params=jax.tree.map(jnp.copy, enc_params),
        opt_state=pieces.tx.init(params),
        rng=state_rng,
    )


# The augmentation's key is folded off the step key, which the objective keeps to itself unchanged, so
# the masks of a step are the same with host and device augmentation.
_AUGMENT_STREAM = 0x617567  # "aug"


def make_train_step(pieces: Pieces):
    obj = pieces.objective

    def train_step(state: TrainState, images: jax.Array):
        rng = jax.random.fold_in(state.rng, state.step)
        images = pieces.prepare_images(images, jax.random.fold_in(rng, _AUGMENT_STREAM))
        grad_fn = jax.value_and_grad(obj.loss, has_aux=True)
        (_, metrics), grads = grad_fn(state.params, state.target_params, images, rng)
        updates, opt_state = pieces.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        momentum = pieces.ema(state.step)
        target = optim.ema_update(state.target_params, params["encoder"], momentum)
        metrics = dict(
            metrics,
            lr=pieces.lr(state.step),
            wd=pieces.wd(state.step),
            ema_momentum=momentum,
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(params),
        )
        new_state = state.replace(step=state.step + 1, params=params, target_params=target, opt_state=opt_state)
        return new_state, metrics

    return train_step
