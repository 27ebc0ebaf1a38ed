"""One tiny-config factory for every test that builds a model, a step or a run.

The tests' model is a width-64, depth-2 encoder with a width-32, depth-1 predictor on the smoke recipe's
112 px faces (a 7x7 patch grid): every train step the suite compiles is this one, or a stated variation
of it, so the session's XLA cache serves most of them.
"""
from __future__ import annotations

import ml_collections

# Dotted overrides of `configs/vits.py:smoke`, as `--config.KEY=VALUE` would give them.
TINY_RUN = {
    "model.width": 64, "model.depth": 2, "model.heads": 2,
    "predictor.width": 32, "predictor.depth": 1, "predictor.heads": 2,
    "data.batch_size": 8, "optim.ref_batch": 8,
}
# The same encoder alone, as a model spec that `weights.encoders.load_encoder` reads (64 px: a 4x4 grid).
TINY_SPEC = "random:vitti@64:width=64,depth=2,heads=2"


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """`configs/vits.py:smoke` with TINY_RUN, then `overrides` given with dotted keys, e.g.
    `tiny_config(**{"mask.strategy": "quadrant", "total_steps": 20})`; unlocked."""
    from configs import vits

    config = vits.get_config("smoke")
    config.unlock()
    config.update_from_flattened_dict({**TINY_RUN, **overrides})
    return config


def as_flags(overrides: dict) -> list[str]:
    """The command-line form of dotted overrides: ["--config.model.width=64", ...]."""
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def tiny_model_config(**fields) -> ml_collections.ConfigDict:
    """The `model` section alone: TINY_RUN's encoder on 112 px images unless `fields` say otherwise."""
    cfg = dict(variant="Ti", patch_size=16, image_size=112, posemb="sincos", dtype="float32", remat=False,
               width=64, depth=2, heads=2)
    cfg.update(fields)
    return ml_collections.ConfigDict(cfg)


# One block of width 64 on a 2x2 patch grid: the smallest encoder the exporter handles.
SMALLEST_EXPORT = tiny_model_config(image_size=32, depth=1)


def tiny_params(cfg) -> dict:
    """Freshly initialised params of the encoder `cfg` describes."""
    import jax
    import jax.numpy as jnp

    from mefem_jax.models.vit import encoder_from_config

    size = cfg.image_size
    return encoder_from_config(cfg).init(jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
