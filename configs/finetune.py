"""Fine-tuning a pretrained MeFEm encoder with a linear head (mefem_jax/finetuning/config.py: the recipe
and where its numbers come from).

    python -m mefem_jax.finetune --config=configs/finetune.py --workdir=W --config.init=RUN_OR_EXPORT \
        --config.data.train=TRAIN --config.data.val=VAL --config.data.test=TEST \
        --config.target=age:regression,gender:classification
    python -m mefem_jax.finetune --config=configs/finetune.py:cpu ...   # the vits.py:cpu encoder, minutes on a CPU

The encoder's architecture comes from `init`; everything else can be overridden as --config.KEY=VALUE.
"""
from mefem_jax.finetuning.config import apply_cpu, default_finetune_config

VARIANTS = {"cpu": apply_cpu}


def get_config(arg=None):
    c = default_finetune_config()
    if arg in (None, ""):
        return c
    if arg not in VARIANTS:
        raise ValueError(f"unknown config argument {arg!r}; the variants are {sorted(VARIANTS)}")
    return VARIANTS[arg](c)
