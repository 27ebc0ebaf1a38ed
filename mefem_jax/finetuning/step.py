"""The fine-tuning state and its jitted update, laid out on the mesh as pretraining's is (run_setup.py).

    state, metrics = step(state, {"image": uint8 [b, R, R, 3], "labels": float32 [b, targets]})

The image is cropped, flipped and normalised inside the step (data/device_augment.py), drop path draws
from the step's key, and both keys are `fold_in(state.rng, state.step)`: a resumed fine-tune computes
what an uninterrupted one does. The encoder and head are sharded by training/sharding.py's rules.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mefem_jax.data import device_augment
from mefem_jax.finetuning import layer_decay, outputs as outputs_lib
from mefem_jax.finetuning.model import Classifier
from mefem_jax.models.vit import encoder_dims, encoder_from_config
from mefem_jax.training import optim, sharding
from mefem_jax.training.run_setup import RunSetup

_AUGMENT_STREAM, _DROP_STREAM = 0x617567, 0x64726F70  # "aug", "drop"


@flax.struct.dataclass
class FinetuneState:
    step: jax.Array   # int32 scalar: updates done
    params: Any       # {"encoder": ..., "head": ...}
    opt_state: Any
    rng: jax.Array    # base key; the step's is fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class FinetunePieces:
    model: Classifier
    outputs: tuple[outputs_lib.Output, ...]
    tx: optax.GradientTransformation
    lr: Callable
    image_size: int
    input_size: int
    prepare_images: Callable
    momentum: float  # head.standardize='batch': the tracked statistics' share kept per step


def build(config, outputs: tuple[outputs_lib.Output, ...]) -> FinetunePieces:
    encoder = encoder_from_config(config.model).clone(drop_path=float(config.drop_path))
    model = Classifier(encoder, outputs_lib.num_logits(outputs), config.head.readout, config.head.standardize)
    _, depth, _ = encoder_dims(config.model)
    batch, steps = config.data.batch_size, config.total_steps
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_images(config)))["params"]
    scales = layer_decay.lr_scales(shapes, depth, float(config.optim.layer_decay), float(config.head.lr_scale))
    return FinetunePieces(
        model=model, outputs=outputs, tx=layer_decay.make_optimizer(config.optim, batch, steps, scales),
        lr=optim.lr_schedule(config.optim, batch, steps), image_size=config.model.image_size,
        input_size=device_augment.input_size(config.data, config.model.image_size),
        prepare_images=device_augment.prepare_from_config(config.data, config.model.image_size),
        momentum=float(config.head.momentum))


def dummy_images(config) -> jax.Array:
    s = config.model.image_size
    return jnp.zeros((1, s, s, 3), jnp.float32)


def make_train_step(pieces: FinetunePieces):
    def train_step(state: FinetuneState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        images = pieces.prepare_images(batch["image"], jax.random.fold_in(rng, _AUGMENT_STREAM))

        def loss_fn(params):
            logits, sown = pieces.model.apply({"params": params}, images, deterministic=False,
                                              rngs={"dropout": jax.random.fold_in(rng, _DROP_STREAM)},
                                              mutable=["batch_stats"])
            loss, terms = outputs_lib.loss(pieces.outputs, logits, batch["labels"])
            return loss, (terms, sown.get("batch_stats", {}))

        (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = pieces.tx.update(grads, state.opt_state, state.params)
        params = _track_batch_stats(optax.apply_updates(state.params, updates), batch_stats, pieces.momentum)
        metrics = dict(terms, loss=loss, lr=pieces.lr(state.step), grad_norm=optax.tree.norm(grads),
                       param_norm=optax.tree.norm(params))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _track_batch_stats(params, batch_stats, momentum: float):
    """head.standardize='batch': input_mean / input_std move towards this batch's, as BatchNorm's running
    averages do (torch's momentum 0.1 is our 0.9: the share of the old value)."""
    if not batch_stats:
        return params
    head = dict(params["head"])
    for key, (value,) in batch_stats["head"].items():
        head[key] = momentum * head[key] + (1 - momentum) * value
    return dict(params, head=head)


def make_predict(pieces: FinetunePieces):
    """Jitted (params, uint8 images) -> logits, deterministic: the whole face, no flip, no drop path."""
    return jax.jit(lambda params, images: pieces.model.apply(
        {"params": params}, _centre(images, pieces.image_size)))


def _centre(images: jax.Array, size: int) -> jax.Array:
    """uint8 [b, R, R, 3] -> float32 normalised at `size` px: the whole square, resampled as the step's
    crops are (data/device_augment.py), without a flip."""
    b = images.shape[0]
    if images.shape[1] != size:
        boxes = jnp.tile(jnp.asarray([[0.0, 0.0, 1.0, 1.0]]), (b, 1))
        images = device_augment.crop_resize(images, boxes, jnp.zeros((b,), bool), size)
    return device_augment.normalize(images)


def in_batches(fn: Callable, params, images: np.ndarray, batch_size: int) -> np.ndarray:
    """float64 `fn(params, batch)` over uint8 images, in batches of one fixed shape (the last is padded):
    one compile for any number of faces."""
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(fn(params, chunk))[:n])
    return np.concatenate(out).astype(np.float64)


def features(pieces: FinetunePieces, encoder_params, images: np.ndarray, batch_size: int,
             augment: jax.Array | None = None) -> np.ndarray:
    """The frozen encoder's head input [n, D] for uint8 images at the step's input size: of the whole
    face, or with `augment` (a key) of one crop and flip per face drawn as the step draws them."""
    def head_input(p, x, key):
        x = _centre(x, pieces.image_size) if key is None else pieces.prepare_images(x, key)
        return pieces.model.apply({"params": {"encoder": p}}, x, method=Classifier.features)

    fn = jax.jit(head_input)
    keys = iter(range(len(images)))  # one key per batch, folded from `augment`
    return in_batches(lambda p, x: fn(p, x, None if augment is None else jax.random.fold_in(augment, next(keys))),
                      encoder_params, images, batch_size)


def prepare(config, outputs, start_params: Callable[[], dict], devices=None) -> RunSetup:
    """The fine-tune as a RunSetup (the shared loop's view). `start_params()` gives the step-0
    {"encoder", "head"} (the pretrained encoder, a fresh or probe-fitted head); called only for a fresh run."""
    mesh = sharding.make_mesh(config.mesh, devices)
    batch = int(config.data.batch_size)
    if batch % mesh.size:
        raise ValueError(f"data.batch_size={batch} must be divisible by the {mesh.size} devices")
    pieces = build(config, outputs)
    rng = jax.random.PRNGKey(config.seed)

    def init_fn(params, key):
        return FinetuneState(step=jnp.zeros((), jnp.int32), params=params, opt_state=pieces.tx.init(params),
                             rng=key)

    shapes = jax.eval_shape(lambda: pieces.model.init(jax.random.PRNGKey(0), dummy_images(config)))["params"]
    abstract = jax.eval_shape(init_fn, shapes, rng)
    state_sh = sharding.state_shardings(abstract, pieces.tx, mesh, min_fsdp_size=config.mesh.min_fsdp_size)
    batch_sh = sharding.batch_sharding(mesh)
    train_step = make_train_step(pieces)

    def step_on_mesh(state, inputs):  # traced under the mesh, so models/activation_sharding.py sees it
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(state, inputs)

    step = jax.jit(step_on_mesh, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=0)
    fresh = jax.jit(init_fn, out_shardings=state_sh)
    return RunSetup(pieces=pieces, mesh=mesh, rng=rng, abstract_state=abstract, state_sharding=state_sh,
                    batch_sharding=batch_sh, init_fn=lambda key: fresh(start_params(), key), step=step,
                    batch_size=batch)
