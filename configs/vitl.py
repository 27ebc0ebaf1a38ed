"""MeFEm-L: ViT-L/16 at 224 px (no released weights; for users scaling up on TPU pods).

    python -m mefem_jax.train --config=configs/vitl.py --workdir=gs://bucket/mefem_l \
        --config.mesh.fsdp=8 --config.model.remat=True

The predictor is I-JEPA's large-model one (width 384, depth 12).
"""
from mefem_jax.config import base_config, finish


def get_config(arg=None):
    c = base_config()
    c.model.variant = "L"
    c.predictor.update(width=384, depth=12)
    c.data.batch_size = 2048
    c.total_steps = 150_000
    c.optim.warmup_steps = 20_000
    return finish(c, arg)
