"""MeFEm-L: ViT-L/16 at 224 px (no released weights; for users scaling up on TPU pods).

    python -m mefem_jax.train --config=configs/vitl.py --workdir=gs://bucket/mefem_l

The predictor is I-JEPA's large-model one (width 384, depth 12). Remat is on: without it the step at
batch 2048 needs 47 GiB of temporaries per chip on a v5e-16 (largest batch 384); with it, 7.7 GiB, so
plain data parallelism fits and `mesh.fsdp` is only needed for larger batches or smaller slices
(README "Scaling out"; `python -m mefem_jax.compile_check --config=configs/vitl.py --topology=...`).
"""
from mefem_jax.config import base_config, finish


def get_config(arg=None):
    return finish(base_config("L", remat=True, predictor_depth=12), arg)
