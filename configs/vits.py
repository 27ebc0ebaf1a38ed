"""MeFEm-S: ViT-S/16 at 224 px, the size of the released MeFEm-S weights.

    python -m mefem_jax.train --config=configs/vits.py --workdir=gs://bucket/mefem_s
    python -m mefem_jax.train --config=configs/vits.py:smoke --workdir=/tmp/mefem_smoke

The recipe is `mefem_jax.config.base_config`'s. Remat stays off: the step at batch 2048 fits a 16 GiB
chip without it (README "Scaling out").
"""
from mefem_jax.config import base_config, finish


def get_config(arg=None):
    return finish(base_config("S"), arg)
