"""MeFEm-S: ViT-S/16 at 224 px, the size of the released MeFEm-S weights.

    python -m mefem_jax.train --config=configs/vits.py --workdir=gs://bucket/mefem_s
    python -m mefem_jax.train --config=configs/vits.py:smoke --workdir=/tmp/mefem_smoke
"""
from mefem_jax.config import base_config, finish


def get_config(arg=None):
    c = base_config()
    c.model.variant = "S"
    c.predictor.update(width=384, depth=6)
    c.data.batch_size = 2048
    c.total_steps = 150_000
    c.optim.warmup_steps = 20_000
    return finish(c, arg)
