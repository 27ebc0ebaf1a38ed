"""Model specs: the words every weights source is named in, and what naming one yields.

    random:vits                                         random init of ViT-S at 224 px (vitti, vitb, vitl)
    random:vitti@64:width=64,depth=2,heads=2,seed=1     ... at 64 px, with overrides (posemb=learn too)

The other sources (runs, weights files, exported folders) are listed in encoders.py, which resolves
every spec. Options follow the shared `SOURCE:key=value,...` grammar (spec_options.py); here are which
options each kind of source takes (`check_options`), what `random:` builds (`random_model_config`), the
model config every loader returns (`model_config`: unrolled blocks, the evaluation layout), which of a
run's two encoders is meant (`WHICH`), and `LoadedEncoder`, what every source becomes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import ml_collections

from mefem_jax.models.vit import ViT, default_model_config, encoder_dims
from mefem_jax.spec_options import SpecError, split_options

RANDOM_VARIANTS = {"vitti": "Ti", "vits": "S", "vitb": "B", "vitl": "L"}
_INT_OPTIONS = ("width", "depth", "heads", "patch", "seed")
# The EMA "target" encoder (what I-JEPA evaluates; the default) or the online "context" encoder.
WHICH = ("target", "context")


class ModelSpecError(SpecError):
    """A model spec that names no encoder we can build or read."""


@dataclass
class LoadedEncoder:
    encoder: ViT  # unrolled blocks, the evaluation layout
    params: Any
    model_cfg: ml_collections.ConfigDict
    # Which weights these are (path + modification time + size, or the random spec): keys the embedding
    # cache, so an overwritten checkpoint is never served stale features.
    identity: dict
    run_config: dict | None = None  # the training run's saved config, for workdir sources
    run_dir: str | None = None  # that run's folder, as the caller named it

    @property
    def image_size(self) -> int:
        return int(self.model_cfg.image_size)


def check_which(which: str) -> None:
    if which not in WHICH:
        raise ValueError(f"which must be 'target' or 'context', got {which!r}")


def check_options(spec: str, opts: tuple[tuple[str, str], ...], ints: tuple[str, ...],
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


def model_config(variant: str, dtype: str = "float32", **arch) -> ml_collections.ConfigDict:
    """The `model` schema (models/vit.default_model_config) for evaluating one encoder: unrolled blocks
    (`scan_layers=False`, the layout every loader here returns), no remat, the given compute dtype."""
    cfg = default_model_config()
    cfg.update(variant=variant, dtype=dtype, remat=False, scan_layers=False)
    cfg.update({k: v for k, v in arch.items() if v is not None})  # None: the variant's width/depth/heads
    return cfg


def saved_model_config(saved: dict, dtype: str = "float32") -> ml_collections.ConfigDict:
    """`model_config` for the `model` section a run saved (its config.json, a checkpoint, a kept step)."""
    return model_config(saved["variant"], dtype, **{k: saved.get(k) for k in (
        "image_size", "patch_size", "posemb", "width", "depth", "heads")})


def random_model_config(spec: str, dtype: str = "float32") -> tuple[ml_collections.ConfigDict, int]:
    """`random:NAME[@SIZE][:options]` -> (model config, init seed)."""
    head, opts = split_options(spec, ModelSpecError)
    m = re.fullmatch(r"random:(\w+?)(?:@(\d+))?", head)
    if not m or m.group(1) not in RANDOM_VARIANTS:
        raise ModelSpecError(f"unknown model spec {spec!r}: expected random:NAME[@SIZE] with NAME "
                             f"in {sorted(RANDOM_VARIANTS)}")
    values = check_options(spec, opts, _INT_OPTIONS, ("posemb",))
    cfg = model_config(RANDOM_VARIANTS[m.group(1)], dtype, image_size=int(m.group(2) or 224),
                       patch_size=values.get("patch", 16), posemb=values.get("posemb", "sincos"),
                       width=values.get("width"), depth=values.get("depth"), heads=values.get("heads"))
    try:
        encoder_dims(cfg)  # e.g. a width the variant's head count does not divide
    except ValueError as err:
        raise ModelSpecError(f"model spec {spec!r}: {err}") from err
    return cfg, values.get("seed", 0)
