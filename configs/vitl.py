"""MeFEm-L: ViT-L/16 at 224 px (no released weights; for users scaling up on TPU pods).

    python -m mefem_jax.train --config=configs/vitl.py --workdir=gs://bucket/mefem_l

The predictor is I-JEPA's large-model one (width 384, depth 12). Remat is on: without it the step at
batch 2048 needs 47 GiB of temporaries per chip on a v5e-16 (largest batch 384); with it, 7.7 GiB, so
plain data parallelism fits and `mesh.fsdp` is only needed for larger batches or smaller slices
(README "Scaling out"; `python -m mefem_jax.compile_check --config=configs/vitl.py --topology=...`).
"""
from mefem_jax.config import base_config, finish


def get_config(arg=None):
    c = base_config()
    c.model.update(variant="L", remat=True)
    c.predictor.update(width=384, depth=12)
    c.data.batch_size = 2048
    c.total_steps = 150_000
    c.optim.warmup_steps = 20_000
    return finish(c, arg)
