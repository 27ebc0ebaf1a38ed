"""Encoder parameters <-> timm ViT state dicts: the key table, both directions, in memory.

MeFEm's released weights are flat timm `VisionTransformer` state dicts, so that is the interchange
format of every weights file here. `KEY_TABLE` maps each encoder parameter path to its timm key and a
transform kind; nothing else in the package knows key names. `params_to_timm` / `timm_to_params`
check their input against the complete layout of the configured model and raise one
`ConversionError` that lists every unknown, missing and mis-shaped key rather than stopping at the
first (so a user fixing a checkpoint sees all of it at once).

Pure: numpy and the model definition only, no torch (a torch tensor is converted by duck typing). The
files are read by `mefem_jax.weights.encoders` and written by `mefem_jax.weights.release`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mefem_jax.models.vit import (encoder_dims, encoder_from_config, patch_grid, sincos_pos_embed, stack_blocks,
                                  unstack_blocks)

# An imported sin-cos model must find this table in the file's pos_embed, to this tolerance.
SINCOS_ATOL = 1e-4


class ConversionError(ValueError):
    """A checkpoint does not fit the configured model. `problems` lists every mismatch."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:  # one line, so a command line can print it as its error
            super().__init__(f"{what}: {self.problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s)\n{lines}")


# ---------------------------------------------------------------------------------------------
# The key table.
# (JAX path, timm key, transform); `{i}` stands for a block index. Rows are in timm's
# state-dict order, so exports list keys exactly as MeFEm's files do.
#   identity: same array.  conv: HWIO <-> OIHW.  dense: Flax kernel (in, out) = torch weight.T.
# ---------------------------------------------------------------------------------------------
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    ("cls_token", "cls_token", "identity"),
    ("pos_embed", "pos_embed", "identity"),
    ("patch_embed/proj/kernel", "patch_embed.proj.weight", "conv"),
    ("patch_embed/proj/bias", "patch_embed.proj.bias", "identity"),
    ("blocks_{i}/norm1/scale", "blocks.{i}.norm1.weight", "identity"),
    ("blocks_{i}/norm1/bias", "blocks.{i}.norm1.bias", "identity"),
    ("blocks_{i}/attn/qkv/kernel", "blocks.{i}.attn.qkv.weight", "dense"),
    ("blocks_{i}/attn/qkv/bias", "blocks.{i}.attn.qkv.bias", "identity"),
    ("blocks_{i}/attn/proj/kernel", "blocks.{i}.attn.proj.weight", "dense"),
    ("blocks_{i}/attn/proj/bias", "blocks.{i}.attn.proj.bias", "identity"),
    ("blocks_{i}/norm2/scale", "blocks.{i}.norm2.weight", "identity"),
    ("blocks_{i}/norm2/bias", "blocks.{i}.norm2.bias", "identity"),
    ("blocks_{i}/mlp/fc1/kernel", "blocks.{i}.mlp.fc1.weight", "dense"),
    ("blocks_{i}/mlp/fc1/bias", "blocks.{i}.mlp.fc1.bias", "identity"),
    ("blocks_{i}/mlp/fc2/kernel", "blocks.{i}.mlp.fc2.weight", "dense"),
    ("blocks_{i}/mlp/fc2/bias", "blocks.{i}.mlp.fc2.bias", "identity"),
    ("norm/scale", "norm.weight", "identity"),
    ("norm/bias", "norm.bias", "identity"),
)

# kind -> (JAX array -> timm array, timm array -> JAX array)
_TRANSFORMS = {
    "identity": (lambda a: a, lambda a: a),
    "conv": (lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0)),
    "dense": (lambda a: a.T, lambda a: a.T),
}


def _transformed_shape(shape: tuple[int, ...], kind: str, to_timm: bool) -> tuple[int, ...]:
    """The shape an array of `shape` takes through a transform (on a zero-stride view: no memory)."""
    return _TRANSFORMS[kind][0 if to_timm else 1](np.broadcast_to(np.float32(0), shape)).shape


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_ROWS = [(_template_regex(j), _template_regex(t), j, t, kind) for j, t, kind in KEY_TABLE]


def jax_to_timm_key(path: str) -> tuple[str, str] | None:
    """'blocks_3/attn/qkv/kernel' -> ('blocks.3.attn.qkv.weight', 'dense'); None if no row fits."""
    for jax_re, _, _, timm_t, kind in _ROWS:
        m = jax_re.match(path)
        if m:
            return timm_t.format(**m.groupdict()), kind
    return None


def timm_to_jax_key(key: str) -> tuple[str, str] | None:
    """'blocks.3.attn.qkv.weight' -> ('blocks_3/attn/qkv/kernel', 'dense'); None if no row fits."""
    for _, timm_re, jax_t, _, kind in _ROWS:
        m = timm_re.match(key)
        if m:
            return jax_t.format(**m.groupdict()), kind
    return None


# ---------------------------------------------------------------------------------------------
# The layout of one configured model.
# ---------------------------------------------------------------------------------------------
def encoder_param_shapes(model_cfg) -> dict[str, tuple[int, ...]]:
    """JAX parameter path -> shape for the configured encoder (abstract init, no FLOPs)."""
    # The unrolled layout (blocks_{i}) whatever model.scan_layers says: the table names one block each.
    model = encoder_from_config(model_cfg).clone(scan=False)
    images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def timm_layout(model_cfg) -> dict[str, tuple[tuple[int, ...], str | None, str]]:
    """timm key -> (shape, JAX path, transform) for the configured encoder, in timm's order.

    A sin-cos model has no `pos_embed` parameter; its row has JAX path None and kind "sincos":
    the timm file carries the fixed table.
    """
    jax_shapes = encoder_param_shapes(model_cfg)
    width, depth, _ = encoder_dims(model_cfg)
    # timm's order: everything before the blocks, then block 0's keys, block 1's, ..., then the rest.
    block_rows = [row for row in KEY_TABLE if "{i}" in row[0]]
    ordered = []
    for row in KEY_TABLE:
        if "{i}" not in row[0]:
            ordered.append((row, None))
        elif row is block_rows[0]:
            ordered += [(block_row, i) for i in range(depth) for block_row in block_rows]
    layout = {}
    for (jax_t, timm_t, kind), i in ordered:
        path, key = jax_t.format(i=i), timm_t.format(i=i)
        if path in jax_shapes:
            layout[key] = (_transformed_shape(jax_shapes[path], kind, to_timm=True), path, kind)
        elif key == "pos_embed":
            rows, cols = patch_grid(model_cfg)
            layout[key] = ((1, 1 + rows * cols, width), None, "sincos")
    uncovered = set(jax_shapes) - {path for _, path, _ in layout.values()}
    if uncovered:  # a parameter was added to ViT without a row in KEY_TABLE
        raise ConversionError("KEY_TABLE is incomplete", [f"no timm key for {p}" for p in sorted(uncovered)])
    return layout


def _sincos_table(model_cfg) -> np.ndarray:
    width, _, _ = encoder_dims(model_cfg)
    return sincos_pos_embed(width, *patch_grid(model_cfg))


def to_float32(value: Any) -> np.ndarray:
    """numpy / jax / torch array -> float32 numpy, without importing torch."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().float().numpy()  # .float(): numpy has no bfloat16
    return np.asarray(value, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# In-memory conversion, both directions.
# ---------------------------------------------------------------------------------------------
def params_to_timm(params: Mapping, model_cfg) -> dict[str, np.ndarray]:
    """Encoder params -> flat float32 timm state dict (MeFEm's layout, timm's key order).

    The arrays are copied to the host, so on several hosts pass fully replicated (gathered)
    params.
    """
    if set(params) == {"params"}:  # accept the whole variables dict too
        params = params["params"]
    flat = traverse_util.flatten_dict(unstack_blocks(params), sep="/")  # scanned or not
    layout = timm_layout(model_cfg)
    paths = [path for _, path, _ in layout.values() if path is not None]

    problems = [f"unexpected parameter {p}" + ("" if jax_to_timm_key(p) else " (no row in KEY_TABLE)")
                for p in flat if p not in paths]
    problems += [f"missing parameter {p}" for p in paths if p not in flat]
    out = {}
    for key, (shape, path, kind) in layout.items():
        if kind == "sincos":
            out[key] = _sincos_table(model_cfg)
        elif path in flat:
            value = to_float32(flat[path])
            expected = _transformed_shape(shape, kind, to_timm=False)
            if value.shape != expected:
                problems.append(f"{path}: shape {value.shape}, the model has {expected}")
            else:
                out[key] = np.ascontiguousarray(_TRANSFORMS[kind][0](value))
    if problems:
        raise ConversionError("cannot export these parameters", problems)
    return out


def timm_to_params(state_dict: Mapping[str, Any], model_cfg) -> dict:
    """Flat timm state dict -> encoder params (nested dict of float32 numpy arrays)."""
    layout = timm_layout(model_cfg)
    arrays = {k: to_float32(v) for k, v in state_dict.items()}

    problems = []
    for key in arrays:
        if key not in layout:
            if key.startswith(("head.", "fc_norm.")):
                hint = " (a classifier head: export the backbone with num_classes=0)"
            elif timm_to_jax_key(key) is None:
                hint = " (not a timm ViT encoder key)"
            else:
                hint = f" (the configured encoder has no {timm_to_jax_key(key)[0]})"
            problems.append(f"unexpected key {key}{hint}")
    problems += [f"missing key {k}" for k in layout if k not in arrays]

    flat = {}
    for key, (shape, path, kind) in layout.items():
        if key not in arrays:
            continue
        array = arrays[key]
        if array.shape != shape:
            problems.append(f"{key}: shape {array.shape} in the checkpoint, {shape} in the model")
        elif kind == "sincos":
            err = float(np.abs(array - _sincos_table(model_cfg)).max())
            if err > SINCOS_ATOL:
                problems.append(
                    f"pos_embed differs from the fixed sin-cos table (max |diff| {err:.3g}); the "
                    f"checkpoint learned its position embedding: set model.posemb=learn to import it")
        else:
            flat[path] = np.ascontiguousarray(_TRANSFORMS[kind][1](array))
    if problems:
        raise ConversionError("checkpoint does not match the configured encoder", problems)
    params = traverse_util.unflatten_dict(flat, sep="/")
    return stack_blocks(params) if model_cfg.get("scan_layers", False) else params
