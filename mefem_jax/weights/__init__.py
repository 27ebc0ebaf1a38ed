"""Weights in and out: any release, export or run becomes an encoder; an encoder becomes a timm folder.

Read in this order:
  timm_keys.py    the one key table between our params and timm's ViT, both directions (no torch)
  timm_import.py  `import timm` beside the registry's torchvision build
  spec.py         model specs (`random:NAME@SIZE:opts`, `FILE:heads=H`), the model config, LoadedEncoder
  files.py        a weights file (safetensors, torch, I-JEPA checkpoint) -> a timm-layout state dict
  infer.py        a state dict (+ config.json) -> the architecture it describes
  runs.py         a training run or one of its checkpoint steps -> its encoder and saved config
  encoders.py     the front door: any weights source -> encoder, params, model config
  release.py      the way out: params -> model.safetensors, config.json, model card (+ model.pth.tar)
The commands are `python -m mefem_jax.export` (out) and, through `--model`, `evaluate` (in).
"""
