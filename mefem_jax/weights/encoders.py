"""Any encoder weights -> (ViT module, params, model config): the one way weights come in.

    random:vits                     random init of ViT-S at 224 px (also vitti, vitb, vitl; spec.py)
    random:vitti@64:width=64,depth=2,heads=2,seed=1     ... at 64 px, with overrides
    WORKDIR                         a training run's folder holding checkpoints/ (newest step; runs.py)
    WORKDIR/checkpoints/N           one step of a run
    WORKDIR/selected                the step a run's validation probes picked (eval.select)
    EXPORT_FOLDER                   model.safetensors or model.pth.tar, with config.json
    FILE.safetensors | FILE.pth.tar a timm state dict, a MeFEm release, or an I-JEPA checkpoint (files.py)

`evaluate --model`, `export --checkpoint/--workdir` and `train --config.init_from` all resolve their
weights through `load_encoder`; `load_encoder_params` then fits them to the run's own model config.

The architecture of a weights file is read off its tensors (infer.py), so a bare `.pth.tar` needs no
side file; `:heads=N` gives the one thing the tensors may not. `which` picks the EMA "target" encoder
(what I-JEPA evaluates; the default) or the online "context" encoder of sources that hold both.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from mefem_jax.models.vit import ViT, encoder_from_config
from mefem_jax.spec_options import split_options
from mefem_jax.weights.files import folder_weights, read_state_dict
from mefem_jax.weights.infer import infer_model_config
from mefem_jax.weights.runs import is_selected_step, load_run_encoder, load_selected_encoder, run_step
from mefem_jax.weights.spec import LoadedEncoder, ModelSpecError, check_options, check_which, random_model_config
from mefem_jax.weights.timm_keys import params_to_timm, timm_to_params

logger = logging.getLogger(__name__)


def load_encoder(spec: str, which: str = "target", dtype: str = "float32") -> LoadedEncoder:
    """Resolve a model spec (module docstring). `dtype`: the forward's compute dtype."""
    check_which(which)
    text = str(spec).strip()
    if text.startswith("random:"):
        return _random_encoder(text, dtype)
    path_text, opts = split_options(text, ModelSpecError)
    path = Path(path_text)
    if is_selected_step(path_text):
        check_options(text, opts, ())
        return load_selected_encoder(path_text, which, dtype)
    run = run_step(path_text)
    if run is not None:
        check_options(text, opts, ())
        return load_run_encoder(run[0], which, dtype, step=run[1])
    if path.exists():
        return _file_encoder(path, which, dtype, check_options(text, opts, ("heads",)))
    raise ModelSpecError(
        f"unknown model spec {spec!r}: expected random:vitti|vits|vitb|vitl[@SIZE][:key=value,...], "
        "a weights file (.pth.tar / .safetensors), an exported folder, or a training workdir "
        "with checkpoints/ (or its selected/ step)")


def load_encoder_params(source: str | Path, model_cfg, which: str = "target") -> dict:
    """The encoder weights at `source` (a weights file or folder, a training run or one of its steps) as
    params of the configured encoder (`model_cfg`, in its own `scan_layers` layout).

    Every mismatch with that encoder is one `ConversionError`; adaptations (e.g. a fresh CLS token for
    I-JEPA weights) are logged as warnings. The head count need not be inferable: it shapes no parameter.
    """
    check_which(which)
    source = str(source)
    run = run_step(source)
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


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "mtime_ns": st.st_mtime_ns, "size": st.st_size}


def _file_encoder(path: Path, which: str, dtype: str, opts: dict[str, int]) -> LoadedEncoder:
    weights = path
    if path.is_dir():
        weights = folder_weights(path)
        if weights is None:
            raise ModelSpecError(f"{path} holds neither model.safetensors, model.pth.tar nor checkpoints/")
    state_dict, notes = read_state_dict(weights, which)
    cfg = infer_model_config(state_dict, weights.parent / "config.json", heads=opts.get("heads"), dtype=dtype)
    params = timm_to_params(state_dict, cfg)
    identity = {"kind": "file", **_file_stamp(weights), "which": which, "notes": notes}
    return LoadedEncoder(encoder_from_config(cfg), params, cfg, identity)
