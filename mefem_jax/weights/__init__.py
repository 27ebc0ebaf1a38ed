"""Weights in and out: any release, export or run becomes an encoder; an encoder becomes a timm folder.

Read in this order:
  timm_keys.py    the one key table between our params and timm's ViT, both directions (no torch)
  timm_import.py  `import timm` beside the registry's torchvision build
  encoders.py     any weights source -> encoder, params, model config
The commands are `python -m mefem_jax.export` (out) and, through `--model`, `evaluate` (in).
"""
