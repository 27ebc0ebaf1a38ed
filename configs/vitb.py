"""MeFEm-B: ViT-B/16 at 224 px, the size of the released MeFEm-B weights.

    python -m mefem_jax.train --config=configs/vitb.py --workdir=gs://bucket/mefem_b
    python -m mefem_jax.train --config=configs/vitb.py:smoke --workdir=/tmp/mefem_smoke   # 2-core CPU, minutes

The recipe is `mefem_jax.config.base_config`'s: I-JEPA's optimisation (docs/METHOD.md 6) with MeFEm's
axial-stripe masking, circular loss weighting and CLS reassignment switched on.

Remat is on: without it the step at batch 2048 needs 19 GiB of temporaries per chip on a v5e-16 and
does not fit its 16 GiB (largest batch 1,568); with it the peak is a few GiB. On a v5p-64 the step fits
either way, and `--config.model.remat=False` saves the extra forward pass (README "Scaling out";
check any slice with `python -m mefem_jax.compile_check --config=configs/vitb.py --topology=...`).
"""
from mefem_jax.config import base_config, finish


def get_config(arg=None):
    return finish(base_config("B", remat=True), arg)
