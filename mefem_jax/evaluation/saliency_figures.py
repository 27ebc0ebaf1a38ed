"""`evaluate --saliency=N`: where on the face each linear probe looks, one figure per target and readout.

The first N test faces (in the test data's order, leaked images left out as for the probes) are
embedded again under perturbation. Occlusion sensitivity works for every encoder, timm models
included; gradient x input needs the gradient of the forward and is drawn for our JAX encoders
only (saliency.py says how each is computed). UTKFace and `build_shards --align` faces are aligned
crops, so the maps average over faces into one picture, drawn over the mean of those faces.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mefem_jax.evaluation import saliency
from mefem_jax.evaluation.data import open_eval_data
from mefem_jax.evaluation.report import safe_name

logger = logging.getLogger(__name__)


def first_faces(spec: str, image_size: int, batch_size: int, n: int, exclude=frozenset()) -> np.ndarray:
    """float32 [<= n, S, S, 3]: the first n readable test images, as the encoder's loader makes them."""
    data = open_eval_data(spec, image_size, batch_size, default_split="test", exclude=exclude)
    images, have = [], 0
    for batch in data.batches():
        images.append(np.asarray(batch["image"], np.float32)[:n - have])
        have += len(images[-1])
        if have >= n:
            break
    if not have:
        raise ValueError(f"--saliency: no readable test image in {spec}")
    return np.concatenate(images)


def saliency_figures(encoder, images: np.ndarray, targets, linear: dict, features, grid_size: int,
                     batch_size: int, out: Path, prefix: str) -> list[dict]:
    """One PNG per (target, readout) of `encoder` (an encoder_source.EvalEncoder); `linear` holds the
    fitted linear probes, (target name, feature) -> ProbeResult. Returns the report rows."""
    images, features_fn = encoder.seen(images)
    face = saliency.mean_face(images)
    wanted = {}  # (target, feature) -> (feature, readout): every probe a map is drawn for
    for target in targets:
        if target.kind not in ("regression", "classification"):
            continue  # survival's Cox model and the 136 landmark outputs have no single value to explain
        for feature in features:
            if feature != "pixels" and (target.name, feature) in linear:
                wanted[(target, feature)] = (feature, saliency.linear_readout(linear[(target.name, feature)]))
    if not wanted:
        return []
    occlusion = saliency.occlusion_maps(features_fn, images, wanted, encoder.grid, grid_size, batch_size)
    rows = []
    for (target, feature), (_, readout) in wanted.items():
        maps = {"occlusion": occlusion[(target, feature)]}
        if encoder.loaded is not None:
            maps["gradient x input, per patch"] = saliency.gradient_x_input(
                encoder.loaded, images, feature, readout, grid_size, batch_size, cells=encoder.grid)
        png = f"{prefix}{safe_name(target.name)}_{feature}_saliency.png"
        unit = (f"|change in predicted {target.name}|" if target.kind == "regression"
                else "|change in the predicted class's log-odds|")
        title = f"{encoder.label}: {target.name} from {feature}, {unit}, mean over {len(images)} test faces"
        saliency.plot_saliency(out / png, title, face, maps)
        logger.info("saliency: wrote %s", png)
        rows.append({"model": encoder.label, "target": target.name, "features": feature, "png": png,
                     "n_faces": int(len(images)), "methods": list(maps)})
    return rows
