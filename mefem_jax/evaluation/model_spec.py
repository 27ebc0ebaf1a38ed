"""What `--model` names: a spec -> (encoder, params, model config, identity).

    random:vits                     random init of ViT-S at 224 px (also vitti, vitb, vitl)
    random:vitti@64:width=64,depth=2,heads=2,seed=1     ... at 64 px, with overrides
    MeFEm-S.pth.tar | model.safetensors | EXPORT_FOLDER | I-JEPA checkpoint.pth.tar
    WORKDIR                         a training run's folder holding checkpoints/ (latest step)

Weight files go through `mefem_jax.export.read_state_dict`; the architecture is read off the
tensors themselves (width, depth, patch, image size, learned or sin-cos position table), so a bare
`.pth.tar` needs no side file. Only the head count is not in the tensors: it comes from a
`config.json` beside the weights (timm hub format), else from the standard ViT of that width, else
from a `:heads=N` option. A training workdir is read through `mefem_jax.checkpoint`.

`identity` says which weights these are (path + modification time + size, or the random spec) and
keys the embedding cache, so an overwritten checkpoint is never served stale features.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mefem_jax import export
from mefem_jax.evaluation.spec_options import SpecError, split_options
from mefem_jax.models.vit import (VARIANTS, ViT, encoder_dims, encoder_from_config, sincos_pos_embed,
                                  unstack_blocks)

RANDOM_VARIANTS = {"vitti": "Ti", "vits": "S", "vitb": "B", "vitl": "L"}
_INT_OPTIONS = ("width", "depth", "heads", "patch", "seed")


class ModelSpecError(SpecError):
    """A --model spec that names no model we can build or read."""


@dataclass
class LoadedModel:
    encoder: ViT
    params: Any
    model_cfg: ml_collections.ConfigDict
    identity: dict

    @property
    def image_size(self) -> int:
        return int(self.model_cfg.image_size)


def model_config(variant: str, image_size: int = 224, patch_size: int = 16, posemb: str = "sincos",
                 dtype: str = "float32", width=None, depth=None, heads=None) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        variant=variant, patch_size=patch_size, image_size=image_size, posemb=posemb, dtype=dtype,
        remat=False, width=width, depth=depth, heads=heads))


def _check_options(spec: str, opts: tuple[tuple[str, str], ...], ints: tuple[str, ...],
                   strings: tuple[str, ...] = ()) -> dict[str, Any]:
    """Options as typed values; unknown keys and non-integers are errors."""
    opts = dict(opts)
    unknown = sorted(set(opts) - set(ints) - set(strings))
    if unknown:
        raise ModelSpecError(f"model spec {spec!r}: unknown option(s) {unknown}; allowed: "
                             f"{list(ints + strings) or 'none'}")
    out: dict[str, Any] = {k: opts[k] for k in strings if k in opts}
    for key in ints:
        if key in opts:
            if not opts[key].isdigit():
                raise ModelSpecError(f"model spec {spec!r}: {key} must be an integer, got {opts[key]!r}")
            out[key] = int(opts[key])
    return out


def load_model(spec: str, which: str = "target", dtype: str = "float32") -> LoadedModel:
    """Resolve `--model`. `which`: "target" (EMA encoder, the default) or "context" for
    checkpoints holding both; `dtype`: the forward's compute dtype."""
    if which not in ("target", "context"):
        raise ModelSpecError(f"which must be 'target' or 'context', got {which!r}")
    text = spec.strip()
    if text.startswith("random:"):
        return _random_model(text, dtype)
    path_text, opts = split_options(text, ModelSpecError)
    path = Path(path_text)
    if path.is_dir() and (path / "checkpoints").is_dir():
        _check_options(text, opts, ())
        return _workdir_model(path, which, dtype)
    if path.exists():
        return _file_model(path, which, dtype, _check_options(text, opts, ("heads",)))
    raise ModelSpecError(
        f"unknown model spec {spec!r}: expected random:vitti|vits|vitb|vitl[@SIZE][:key=value,...], "
        "a weights file (.pth.tar / .safetensors), an exported folder, or a training workdir "
        "with checkpoints/")


def random_model_config(spec: str, dtype: str = "float32") -> tuple[ml_collections.ConfigDict, int]:
    """`random:NAME[@SIZE][:options]` -> (model config, init seed)."""
    head, opts = split_options(spec, ModelSpecError)
    m = re.fullmatch(r"random:(\w+?)(?:@(\d+))?", head)
    if not m or m.group(1) not in RANDOM_VARIANTS:
        raise ModelSpecError(f"unknown model spec {spec!r}: expected random:NAME[@SIZE] with NAME "
                             f"in {sorted(RANDOM_VARIANTS)}")
    values = _check_options(spec, opts, _INT_OPTIONS, ("posemb",))
    cfg = model_config(RANDOM_VARIANTS[m.group(1)], image_size=int(m.group(2) or 224),
                       patch_size=values.get("patch", 16), posemb=values.get("posemb", "sincos"),
                       dtype=dtype, width=values.get("width"), depth=values.get("depth"),
                       heads=values.get("heads"))
    try:
        encoder_dims(cfg)  # e.g. a width the variant's head count does not divide
    except ValueError as err:
        raise ModelSpecError(f"model spec {spec!r}: {err}") from err
    return cfg, values.get("seed", 0)


@functools.partial(jax.jit, static_argnames="encoder")
def _init_params(key: jax.Array, *, encoder: ViT):
    # Jitted with the encoder static: one compilation per architecture, reused for every seed.
    images = jnp.zeros((1, encoder.image_size, encoder.image_size, 3), jnp.float32)
    return encoder.init(key, images)["params"]


def _random_model(spec: str, dtype: str) -> LoadedModel:
    cfg, seed = random_model_config(spec, dtype)
    encoder = encoder_from_config(cfg)
    params = _init_params(jax.random.key(seed), encoder=encoder)
    return LoadedModel(encoder, params, cfg, {"kind": "random", "spec": spec, "seed": seed})


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def _file_model(path: Path, which: str, dtype: str, opts: dict[str, int]) -> LoadedModel:
    weights = path
    if path.is_dir():
        weights = next((path / n for n in ("model.safetensors", "model.pth.tar") if (path / n).is_file()), None)
        if weights is None:
            raise ModelSpecError(f"{path} holds neither model.safetensors, model.pth.tar nor checkpoints/")
    state_dict, notes = export.read_state_dict(weights, which="target_encoder" if which == "target" else "encoder")
    cfg = infer_model_config(state_dict, weights.parent / "config.json", heads=opts.get("heads"), dtype=dtype)
    params = export.timm_to_params(state_dict, cfg)
    identity = {"kind": "file", **_file_stamp(weights), "which": which, "notes": notes}
    return LoadedModel(encoder_from_config(cfg), params, cfg, identity)


def _float_array(value: Any) -> np.ndarray:
    """numpy or (CPU) torch tensor -> float32 numpy; .float() first since numpy has no bfloat16."""
    return np.asarray(value.float() if type(value).__module__.startswith("torch") else value, np.float32)


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
        # export.timm_config writes num_heads into model_args whenever it is not the standard one.
        heads = (_read_config_json(config_json).get("model_args") or {}).get("num_heads")
    standard = next((name for name, dims in VARIANTS.items() if dims[0] == width), None)
    if heads is None:
        if standard is None:
            raise ModelSpecError(f"width {width} is not a standard ViT width and no config.json gives "
                                 "the head count: add :heads=N to the model spec")
        heads = VARIANTS[standard][2]

    table = sincos_pos_embed(width, side, side)
    # A file written from a sin-cos model carries exactly that table; anything else was learned.
    pos = _float_array(state_dict["pos_embed"])
    posemb = "sincos" if np.abs(pos - table).max() <= export.SINCOS_ATOL else "learn"
    return model_config(standard or "S", image_size=side * patch, patch_size=patch, posemb=posemb,
                        dtype=dtype, width=width, depth=depth, heads=int(heads))


def _workdir_model(workdir: Path, which: str, dtype: str) -> LoadedModel:
    try:
        from mefem_jax.checkpoint import load_params_for_eval
    except ImportError as err:
        raise ModelSpecError(f"{workdir} is a training workdir, but mefem_jax.checkpoint cannot be "
                             f"imported to read it: {err}") from err
    params, config, step = load_params_for_eval(workdir, which)
    params = unstack_blocks(params)  # evaluation builds the unrolled encoder (no scan_layers below)
    model = dict(config["model"])
    cfg = model_config(model["variant"], image_size=model["image_size"], patch_size=model["patch_size"],
                       posemb=model["posemb"], dtype=dtype, width=model.get("width"),
                       depth=model.get("depth"), heads=model.get("heads"))
    step_dir = workdir / "checkpoints" / str(step)
    identity = {"kind": "workdir", "path": str(workdir.resolve()), "step": int(step), "which": which,
                "mtime_ns": step_dir.stat().st_mtime_ns if step_dir.exists() else None}
    return LoadedModel(encoder_from_config(cfg), params, cfg, identity)
