"""Weights files -> a flat timm-layout state dict, whatever wraps it.

Reads `.safetensors` (timm, our exports) and torch files (`.pth` / `.pth.tar`: a MeFEm release, a
state dict wrapped under `state_dict` or `model`, a DistributedDataParallel `module.` prefix, or an
official I-JEPA checkpoint, which gets the CLS token it never had). Every file that cannot be read is
one `ConversionError` naming it. torch is imported only when a torch file is read.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_safetensors_file

from mefem_jax.models.vit import trunc_normal
from mefem_jax.weights.spec import check_which
from mefem_jax.weights.timm_keys import ConversionError, to_float32

# What an exported folder holds its weights in, in order of preference.
WEIGHTS_FILES = ("model.safetensors", "model.pth.tar")
# The names an official I-JEPA checkpoint gives the two encoders.
_IJEPA_KEYS = {"target": "target_encoder", "context": "encoder"}


def folder_weights(folder: Path) -> Path | None:
    """The weights file of an exported folder (WEIGHTS_FILES), or None when it holds neither."""
    return next((folder / n for n in WEIGHTS_FILES if (folder / n).is_file()), None)


def _first_line(err: Exception) -> str:
    """'Type: first sentence' of a library's error, which can run to paragraphs."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text.split('. ')[0]}"


def load_pth(path: str | Path) -> Any:
    """torch.load on CPU with weights_only (no code execution from the file)."""
    import torch  # torch is optional (the `torch` extra) and slow to import: only for .pth files
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _load_torch_file(path: Path) -> Any:
    """load_pth, with a damaged or foreign file named in one line (torch's own errors name no file)."""
    try:
        return load_pth(path)
    except pickle.UnpicklingError:
        # torch's message here advises weights_only=False, i.e. running code from the file: not repeated.
        raise ConversionError(f"cannot read {path}", [
            "torch.load(weights_only=True) refused it: not a torch checkpoint, damaged, or it holds "
            "objects other than tensors"]) from None
    except (EOFError, RuntimeError) as err:  # empty file, broken zip archive
        raise ConversionError(f"cannot read {path}", [
            f"not a readable torch checkpoint (truncated, damaged or another format): {_first_line(err)}"]) from None


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """load_file, with a damaged or foreign file named in one line instead of a bare SafetensorError."""
    try:
        return load_safetensors_file(str(path))
    except SafetensorError as err:
        raise ConversionError(f"cannot read {path}", [
            f"not a valid safetensors file (truncated, damaged or another format): {_first_line(err)}"]) from None


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Drop a DistributedDataParallel prefix when every key carries it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _adapt_ijepa(state_dict: dict[str, Any], seed: int) -> tuple[dict[str, Any], list[str]]:
    """Give an I-JEPA encoder the CLS token it never had.

    I-JEPA's ViT has no CLS token and its (fixed sin-cos) pos_embed covers patches only. Add a
    zero CLS row to pos_embed (our table is zero at CLS) and a freshly initialised cls_token.
    """
    notes = []
    state_dict = {k: to_float32(v) for k, v in state_dict.items()}
    if "cls_token" not in state_dict and "pos_embed" in state_dict:
        pos = state_dict["pos_embed"]
        width = pos.shape[-1]
        n = pos.shape[1]
        if int(round(np.sqrt(n))) ** 2 == n:  # patches only: prepend the CLS row
            state_dict["pos_embed"] = np.concatenate([np.zeros((1, 1, width), np.float32), pos], 1)
            notes.append("pos_embed had no CLS row; added a zero row")
        cls = trunc_normal()(jax.random.key(seed), (1, 1, width), jnp.float32)
        state_dict["cls_token"] = np.asarray(cls)
        notes.append(f"checkpoint has no cls_token; initialised a fresh one (trunc-normal 0.02, "
                     f"seed {seed}): CLS features are untrained until fine-tuned")
    return state_dict, notes


def read_state_dict(path: str | Path, which: str = "target", seed: int = 0) -> tuple[dict[str, Any], list[str]]:
    """Read a weights file into a flat timm-layout state dict; also return notes on what was adapted.

    Accepts: a folder holding `model.safetensors` (or `model.pth.tar`); a `.safetensors` file; a
    torch file holding a flat state dict (MeFEm `.pth.tar`), one wrapped under `state_dict` or
    `model`, or an official I-JEPA checkpoint (`encoder` / `target_encoder` / `predictor` dicts,
    `module.` prefix), of which the `which` encoder is read.
    """
    check_which(which)
    path = Path(path)
    notes: list[str] = []
    if path.is_dir():
        weights = folder_weights(path)
        if weights is not None:
            return read_state_dict(weights, which, seed)
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.pth.tar")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        return _load_safetensors(path), notes

    obj = _load_torch_file(path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"cannot read {path}", [f"expected a dict, found {type(obj).__name__}"])
    if "encoder" in obj or "target_encoder" in obj:
        key = _IJEPA_KEYS[which]
        if key not in obj:
            raise ConversionError(f"cannot read {path}", [
                f"I-JEPA checkpoint has no {key!r}; it holds {sorted(k for k in obj)}"])
        notes.append(f"I-JEPA checkpoint: read {key!r}")
        state_dict, adapted = _adapt_ijepa(_strip_prefix(obj[key]), seed)
        return state_dict, notes + adapted
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), Mapping):
            notes.append(f"read the state dict under {wrapper!r}")
            obj = obj[wrapper]
            break
    return _strip_prefix(obj), notes
