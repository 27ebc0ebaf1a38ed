"""A timm-layout state dict -> the encoder it describes, so a bare `.pth.tar` needs no side file.

Width, depth, patch, image size and a learned or sin-cos position table are read off the tensors. Only
the head count is not in them: it comes from the caller (a `:heads=N` option), else a `config.json`
beside the weights (timm hub format), else the standard ViT of that width.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import ml_collections
import numpy as np

from mefem_jax.models.vit import VARIANTS, sincos_pos_embed
from mefem_jax.weights.spec import ModelSpecError, model_config
from mefem_jax.weights.timm_keys import SINCOS_ATOL, to_float32


def _read_config_json(path: Path) -> dict:
    """The timm config.json beside a weights file; a damaged one is named in one line."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, not JSON
        raise ModelSpecError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    if not isinstance(config, dict):
        raise ModelSpecError(f"cannot read {path}: expected a JSON object, found {type(config).__name__}")
    return config


def infer_model_config(state_dict: dict, config_json: Path | None = None, heads: int | None = None,
                       dtype: str = "float32") -> ml_collections.ConfigDict:
    """The encoder a timm-layout state dict describes."""
    missing = [k for k in ("patch_embed.proj.weight", "pos_embed") if k not in state_dict]
    if missing:
        raise ModelSpecError(f"not a ViT state dict: no {missing} (keys start with {sorted(state_dict)[:5]})")
    proj = state_dict["patch_embed.proj.weight"]
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    n_tokens = int(state_dict["pos_embed"].shape[1])
    side = int(round(np.sqrt(n_tokens - 1)))
    if side * side != n_tokens - 1:
        raise ModelSpecError(f"pos_embed has {n_tokens} rows: not 1 CLS + a square patch grid")

    if heads is None and config_json is not None and config_json.is_file():
        # release.timm_config writes num_heads into model_args whenever it is not the standard one.
        heads = (_read_config_json(config_json).get("model_args") or {}).get("num_heads")
    standard = next((name for name, dims in VARIANTS.items() if dims[0] == width), None)
    if heads is None:
        if standard is None:
            raise ModelSpecError(f"width {width} is not a standard ViT width and no config.json gives "
                                 "the head count: add :heads=N to the model spec")
        heads = VARIANTS[standard][2]

    table = sincos_pos_embed(width, side, side)
    # A file written from a sin-cos model carries exactly that table; anything else was learned.
    pos = to_float32(state_dict["pos_embed"])
    posemb = "sincos" if np.abs(pos - table).max() <= SINCOS_ATOL else "learn"
    return model_config(standard or "S", dtype, image_size=side * patch, patch_size=patch, posemb=posemb,
                        width=width, depth=depth, heads=int(heads))
