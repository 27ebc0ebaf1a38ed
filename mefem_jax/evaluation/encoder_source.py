"""Every encoder `evaluate` measures, behind one face: ours (weights/encoders.py) or any timm model.

    --model=runs/mefem_s0                      ours: a run, an export, a weights file, random:...
    --model=timm:vit_small_patch14_reg4_dinov2:weights=dinov2_s.safetensors     any timm image model

`evaluate` embeds every encoder's images at the encoder's own size, so the comparison is each model
with its own preprocessing on the same faces. What differs between the two kinds is kept here:

- embedding (`embed`): both go through `embeddings.cached_embeddings`, which runs our jitted forward or
  the timm model's torch forward;
- the features of a batch of images (`features`), which occlusion saliency perturbs;
- the gradient of a readout with respect to the image, which only our JAX encoders give
  (`loaded` is set for them), so gradient x input maps are drawn for ours alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mefem_jax.evaluation.embeddings import cached_embeddings
from mefem_jax.evaluation.saliency import jax_features
from mefem_jax.evaluation.timm_encoder import TimmEncoder, is_timm_spec, load_timm_encoder
from mefem_jax.models.vit import encoder_dims
from mefem_jax.weights.spec import LoadedEncoder


@dataclass
class EvalEncoder:
    spec: str
    label: str                          # the encoder's name in tables and plot legends
    model: LoadedEncoder | TimmEncoder
    info: dict                          # report.json's description of the encoder
    features: Callable[[np.ndarray, int], dict[str, np.ndarray]]  # (images, grid_size) -> cls/mean/grid

    @property
    def image_size(self) -> int:
        return int(self.model.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.encoder.grid) if self.loaded else tuple(self.model.grid)

    @property
    def loaded(self) -> LoadedEncoder | None:
        """Our JAX encoder, for gradient saliency; None for a timm model."""
        return self.model if isinstance(self.model, LoadedEncoder) else None

    def embed(self, data, cache_dir, pixel_size: int, grid_size: int):
        return cached_embeddings(self.model, data, cache_dir, pixel_size, grid_size)

    def seen(self, images: np.ndarray):
        """(the part of `images` the model sees, its features callable): what saliency perturbs, so the
        patch grid tiles it. A timm model with crop_pct < 1 sees the centre crop of the loader's image;
        its callable puts a perturbed crop back in the frame (the border is cropped away unseen)."""
        if self.loaded is not None or self.model.input_size == self.model.image_size:
            return images, self.features
        size, side = self.model.image_size, self.model.input_size
        top = int(round((size - side) / 2.0))  # torchvision's centre crop, as TimmEncoder crops

        def features(crops: np.ndarray, grid_size: int) -> dict[str, np.ndarray]:
            framed = np.zeros((len(crops), size, size, crops.shape[-1]), np.float32)
            framed[:, top:top + side, top:top + side] = crops
            return self.features(framed, grid_size)
        return images[:, top:top + side, top:top + side], features


def open_encoders(specs: list[str], load_ours: Callable[[str], LoadedEncoder], batch_size: int) -> list[EvalEncoder]:
    """Loads every `--model`; a bad spec fails here, before anything is embedded. `load_ours` reads our
    encoders (weights/encoders.load_encoder with the run's `which` and dtype): the entry point passes it
    in, because the weights wing reaches training's checkpoints, which evaluation must not import."""
    labels = unique_labels(specs)
    return [_open(spec, label, load_ours, batch_size) for spec, label in zip(specs, labels)]


def _open(spec: str, label: str, load_ours: Callable[[str], LoadedEncoder], batch_size: int) -> EvalEncoder:
    if is_timm_spec(spec):
        timm_model = load_timm_encoder(spec)
        info: dict[str, Any] = {"spec": spec, "label": label, "kind": "timm", "identity": timm_model.identity,
                                "width": timm_model.width, "depth": timm_model.depth, "heads": timm_model.heads,
                                "image_size": timm_model.image_size, "input_size": timm_model.input_size,
                                "grid": list(timm_model.grid)}
        return EvalEncoder(spec, label, timm_model, info, timm_model.features)
    loaded = load_ours(spec)
    width, depth, heads = encoder_dims(loaded.model_cfg)
    info = {"spec": spec, "label": label, "kind": "mefem_jax", "identity": loaded.identity,
            "config": loaded.model_cfg.to_dict(), "width": width, "depth": depth, "heads": heads,
            "image_size": loaded.image_size, "grid": list(loaded.encoder.grid)}
    return EvalEncoder(spec, label, loaded, info, jax_features(loaded, batch_size))


def unique_labels(specs: list[str]) -> list[str]:
    """Short names for tables: a path's last part (a checkpoint step keeps its run's name), a
    random: or timm: spec without its options; repeats get #2, #3."""
    labels = []
    for spec in specs:
        if spec.startswith(("timm:", "random:")):
            head = spec.split(":")[:2]
            label = ":".join(head)
        else:
            path = Path(spec.split(":")[0])
            parts = path.parts[-3:]
            label = (f"{parts[0]}@{parts[2]}" if len(parts) == 3 and parts[1] == "checkpoints"
                     else path.name or str(path))
        label = re.sub(r"\s+", "_", label)
        n = sum(1 for seen in labels if seen == label or seen.startswith(label + "#"))
        labels.append(label if n == 0 else f"{label}#{n + 1}")
    return labels
