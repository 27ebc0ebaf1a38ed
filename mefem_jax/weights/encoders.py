"""Any encoder weights -> (ViT module, params, model config): the one way weights come in.

    random:vits                     random init of ViT-S at 224 px (also vitti, vitb, vitl)
    random:vitti@64:width=64,depth=2,heads=2,seed=1     ... at 64 px, with overrides
    WORKDIR                         a training run's folder holding checkpoints/ (newest step)
    WORKDIR/checkpoints/N           one step of a run
    EXPORT_FOLDER                   model.safetensors or model.pth.tar, with config.json
    FILE.safetensors | FILE.pth.tar a timm state dict, a MeFEm release, or an I-JEPA checkpoint

`evaluate --model`, `export --checkpoint/--workdir` and `train --config.init_from` all resolve their
weights through `load_encoder`; `load_encoder_params` then fits them to the run's own model config.

The architecture of a weights file is read off its tensors (width, depth, patch, image size, learned or
sin-cos position table), so a bare `.pth.tar` needs no side file. Only the head count is not in the
tensors: it comes from a `config.json` beside the weights (timm hub format), else from the standard
ViT of that width, else from a `:heads=N` option. `which` picks the EMA "target" encoder (what I-JEPA
evaluates; the default) or the online "context" encoder of sources that hold both.

`identity` says which weights these are (path + modification time + size, or the random spec) and keys
the embedding cache, so an overwritten checkpoint is never served stale features.
"""
from __future__ import annotations

import functools
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_safetensors_file

from mefem_jax.training import checkpoint
from mefem_jax.weights.timm_keys import (SINCOS_ATOL, ConversionError, params_to_timm, timm_to_params,
                                        to_float32)
from mefem_jax.models.vit import (VARIANTS, ViT, default_model_config, encoder_dims, encoder_from_config,
                                  sincos_pos_embed, trunc_normal, unstack_blocks)
from mefem_jax.spec_options import SpecError, split_options

logger = logging.getLogger(__name__)

RANDOM_VARIANTS = {"vitti": "Ti", "vits": "S", "vitb": "B", "vitl": "L"}
_INT_OPTIONS = ("width", "depth", "heads", "patch", "seed")
WHICH = ("target", "context")
# The names an official I-JEPA checkpoint gives the two encoders.
_IJEPA_KEYS = {"target": "target_encoder", "context": "encoder"}


class ModelSpecError(SpecError):
    """A model spec that names no encoder we can build or read."""


@dataclass
class LoadedEncoder:
    encoder: ViT  # unrolled blocks, the evaluation layout
    params: Any
    model_cfg: ml_collections.ConfigDict
    identity: dict
    run_config: dict | None = None  # the training run's saved config, for workdir sources
    run_dir: str | None = None  # that run's folder, as the caller named it

    @property
    def image_size(self) -> int:
        return int(self.model_cfg.image_size)


def model_config(variant: str, dtype: str = "float32", **arch) -> ml_collections.ConfigDict:
    """The `model` schema (models/vit.default_model_config) for evaluating one encoder: unrolled blocks
    (`scan_layers=False`, the layout every loader here returns), no remat, the given compute dtype."""
    cfg = default_model_config()
    cfg.update(variant=variant, dtype=dtype, remat=False, scan_layers=False)
    cfg.update({k: v for k, v in arch.items() if v is not None})  # None: the variant's width/depth/heads
    return cfg


def _check_which(which: str) -> None:
    if which not in WHICH:
        raise ValueError(f"which must be 'target' or 'context', got {which!r}")


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


def _is_orbax_step(path: Path) -> bool:
    return path.is_dir() and (path / "_CHECKPOINT_METADATA").is_file()


# ---------------------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------------------
def _run_step(source: str) -> tuple[str, int | None] | None:
    """(workdir, step) when `source` is a training run or one of its checkpoint steps, else None.
    Remote paths (gs://) can only be runs: weights files are read from local disk."""
    path = Path(source)
    if "://" in source or (path / "checkpoints").is_dir():
        return source, None
    if _is_orbax_step(path):
        if not path.name.isdigit() or path.parent.name != "checkpoints":
            raise ModelSpecError(f"{path} is an Orbax checkpoint but not WORKDIR/checkpoints/<step>; "
                                 "pass the training workdir (and its step)")
        return str(path.parent.parent), int(path.name)
    return None


def load_encoder(spec: str, which: str = "target", dtype: str = "float32") -> LoadedEncoder:
    """Resolve a model spec (module docstring). `dtype`: the forward's compute dtype."""
    _check_which(which)
    text = str(spec).strip()
    if text.startswith("random:"):
        return _random_encoder(text, dtype)
    path_text, opts = split_options(text, ModelSpecError)
    path = Path(path_text)
    run = _run_step(path_text)
    if run is not None:
        _check_options(text, opts, ())
        return load_run_encoder(run[0], which, dtype, step=run[1])
    if path.exists():
        return _file_encoder(path, which, dtype, _check_options(text, opts, ("heads",)))
    raise ModelSpecError(
        f"unknown model spec {spec!r}: expected random:vitti|vits|vitb|vitl[@SIZE][:key=value,...], "
        "a weights file (.pth.tar / .safetensors), an exported folder, or a training workdir "
        "with checkpoints/")


def load_encoder_params(source: str | Path, model_cfg, which: str = "target") -> dict:
    """The encoder weights at `source` (a weights file or folder, a training run or one of its steps) as
    params of the configured encoder (`model_cfg`, in its own `scan_layers` layout).

    Every mismatch with that encoder is one `ConversionError`; adaptations (e.g. a fresh CLS token for
    I-JEPA weights) are logged as warnings. The head count need not be inferable: it shapes no parameter.
    """
    _check_which(which)
    source = str(source)
    run = _run_step(source)
    if run is not None:
        loaded = load_run_encoder(run[0], which, step=run[1])
        state_dict, notes = params_to_timm(loaded.params, loaded.model_cfg), []
    else:
        state_dict, notes = read_state_dict(source, which)
    for note in notes:
        logger.warning("%s: %s", source, note)
    # The timm layout is the interchange format: converting from it validates every key and shape
    # against the configured encoder and yields its block layout (scanned or unrolled).
    return timm_to_params(state_dict, model_cfg)


# ---------------------------------------------------------------------------------------------
# Random init.
# ---------------------------------------------------------------------------------------------
def random_model_config(spec: str, dtype: str = "float32") -> tuple[ml_collections.ConfigDict, int]:
    """`random:NAME[@SIZE][:options]` -> (model config, init seed)."""
    head, opts = split_options(spec, ModelSpecError)
    m = re.fullmatch(r"random:(\w+?)(?:@(\d+))?", head)
    if not m or m.group(1) not in RANDOM_VARIANTS:
        raise ModelSpecError(f"unknown model spec {spec!r}: expected random:NAME[@SIZE] with NAME "
                             f"in {sorted(RANDOM_VARIANTS)}")
    values = _check_options(spec, opts, _INT_OPTIONS, ("posemb",))
    cfg = model_config(RANDOM_VARIANTS[m.group(1)], dtype, image_size=int(m.group(2) or 224),
                       patch_size=values.get("patch", 16), posemb=values.get("posemb", "sincos"),
                       width=values.get("width"), depth=values.get("depth"), heads=values.get("heads"))
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


def _random_encoder(spec: str, dtype: str) -> LoadedEncoder:
    cfg, seed = random_model_config(spec, dtype)
    encoder = encoder_from_config(cfg)
    params = _init_params(jax.random.key(seed), encoder=encoder)
    return LoadedEncoder(encoder, params, cfg, {"kind": "random", "spec": spec, "seed": seed})


# ---------------------------------------------------------------------------------------------
# Training runs.
# ---------------------------------------------------------------------------------------------
def load_run_encoder(workdir: str, which: str = "target", dtype: str = "float32",
                     step: int | None = None) -> LoadedEncoder:
    """A training run's encoder at `step` (default the newest); `run_config` is the run's saved config."""
    _check_which(which)
    params, config, step = checkpoint.load_params_for_eval(workdir, which, step)
    saved = config["model"]
    cfg = model_config(saved["variant"], dtype, **{k: saved.get(k) for k in (
        "image_size", "patch_size", "posemb", "width", "depth", "heads")})
    local = "://" not in workdir
    step_dir = Path(workdir) / "checkpoints" / str(step)
    identity = {"kind": "workdir", "path": str(Path(workdir).resolve()) if local else workdir,
                "step": int(step), "which": which,
                "mtime_ns": step_dir.stat().st_mtime_ns if local and step_dir.exists() else None}
    # The run may have trained with scanned blocks; evaluation builds the unrolled encoder.
    return LoadedEncoder(encoder_from_config(cfg), unstack_blocks(params), cfg, identity, run_config=config,
                         run_dir=workdir)


# ---------------------------------------------------------------------------------------------
# Weights files.
# ---------------------------------------------------------------------------------------------
def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def _file_encoder(path: Path, which: str, dtype: str, opts: dict[str, int]) -> LoadedEncoder:
    weights = path
    if path.is_dir():
        weights = next((path / n for n in ("model.safetensors", "model.pth.tar") if (path / n).is_file()), None)
        if weights is None:
            raise ModelSpecError(f"{path} holds neither model.safetensors, model.pth.tar nor checkpoints/")
    state_dict, notes = read_state_dict(weights, which)
    cfg = infer_model_config(state_dict, weights.parent / "config.json", heads=opts.get("heads"), dtype=dtype)
    params = timm_to_params(state_dict, cfg)
    identity = {"kind": "file", **_file_stamp(weights), "which": which, "notes": notes}
    return LoadedEncoder(encoder_from_config(cfg), params, cfg, identity)


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
    _check_which(which)
    path = Path(path)
    notes: list[str] = []
    if path.is_dir():
        for name in ("model.safetensors", "model.pth.tar"):
            if (path / name).is_file():
                return read_state_dict(path / name, which, seed)
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
    pos = to_float32(state_dict["pos_embed"])
    posemb = "sincos" if np.abs(pos - table).max() <= SINCOS_ATOL else "learn"
    return model_config(standard or "S", dtype, image_size=side * patch, patch_size=patch, posemb=posemb,
                        width=width, depth=depth, heads=int(heads))
