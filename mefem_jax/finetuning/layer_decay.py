"""Layer-wise learning-rate decay (BEiT, MAE) and the fine-tuning optimiser built on it.

MAE's `param_groups_lrd` numbers the layers of a ViT of depth L from the input:

    layer 0        patch embedding, CLS token, position embedding
    layer i + 1    block i
    layer L + 1    the final norm and the head

and multiplies the learning rate of layer l by `decay ** (L + 1 - l)`: the head learns at the full rate,
the last block at `decay`, the embedding at `decay ** (L + 1)`. Features near the input, which transfer
best, move least. AdamW is otherwise training/optim.py's (torch semantics, decoupled decay scaled by
the learning rate, decay on kernels only: not on biases, norms or tokens, as MAE's `no_weight_decay`),
and since both the Adam step and the decay are scaled by the learning rate, scaling a leaf's final
update by its layer's factor is exactly MAE's per-group learning rate.

Two additions: the head's linear layer can learn `head_scale` times faster than the final norm (a head
learning from near zero is what sets how many steps a short fine-tune needs), and the head's fixed input
standardisation (`input_mean`, `input_std`: finetuning/model.py) gets a factor of 0: the optimiser never
moves it (with head.standardize='batch' the step tracks the batch statistics into it instead).
"""
from __future__ import annotations

import re

import jax
import optax
from flax import traverse_util

from mefem_jax.training import optim

_BLOCK = re.compile(r"blocks_(\d+)$")
_EMBEDDING = ("patch_embed", "cls_token", "pos_embed")
_FIXED = ("input_mean", "input_std")  # the head's input standardisation, measured once before step 0


def layer_id(path: tuple[str, ...], depth: int) -> int:
    """MAE's layer number of one parameter of {"encoder": ViT params, "head": ...}."""
    if path[0] != "encoder":
        return depth + 1  # the head
    name = path[1]
    if name in _EMBEDDING:
        return 0
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    if name == "blocks":
        raise ValueError("layer-wise lr decay needs unrolled blocks (model.scan_layers=False)")
    return depth + 1  # the final norm


def lr_scales(params, depth: int, decay: float, head_scale: float = 1.0):
    """The per-leaf learning-rate factor, a pytree like `params`: `decay ** (depth + 1 - layer_id)` in
    the encoder, `head_scale` for the head's kernel and bias, 0 for its input standardisation."""
    def scale(path):
        if path[0] != "encoder":
            return 0.0 if path[-1] in _FIXED else head_scale
        return decay ** (depth + 1 - layer_id(path, depth))

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: scale(k) for k in flat})


def _scale_by_tree(scales) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_cfg, batch_size: int, total_steps: int, scales) -> optax.GradientTransformation:
    """training/optim.py's AdamW with warm-up + cosine, each leaf's step times its layer's factor."""
    return optax.chain(optim.make_optimizer(optim_cfg, batch_size, total_steps), _scale_by_tree(scales))
