"""Where on the face a linear probe's prediction comes from: occlusion and gradient x input maps.

UTKFace-style crops are aligned (eyes, nose and mouth sit at about the same pixels in every face), so
a map averaged over N faces and drawn over their mean face says which part of *the* face a probe
reads, not only of one image. Two methods:

* occlusion (any encoder, ours or timm's): every cell of the encoder's patch grid in turn is painted
  with the fill colour, and the map holds |score(occluded) - score(clean)| averaged over the faces.
  The fill is 0 in ImageNet-normalised space, i.e. ImageNet's mean colour: the grey every encoder
  here was trained to receive as "average input", close to the face data's own mean, and one fixed
  colour, so maps of different encoders and face samples compare (a fill from the sample's own mean
  would move with the sample). Patch-aligned cells replace whole tokens, the encoder's own unit.
* gradient x input (our JAX encoders): |sum over channels of d score / d pixel * pixel|, averaged
  over the faces; one jitted forward+backward per fixed-size batch.

The score is read through the probe as a linear map of the raw features, (w, b) from
`linear_readout`, so numpy (occlusion) and jnp (gradient) compute the same function:

* regression: the probe's predicted value, unclipped (the report clips predictions to the train
  range; a clipped face would have zero gradient and no occlusion change);
* classification: the log-odds, log p_k - log(1 - p_k), of the class k the probe predicts for the
  clean face. The predicted class, not the true one: the map explains what the probe did (also
  where it was wrong) and needs no labels. Log-odds rather than a raw logit or log p_k: a
  multinomial logit has a free per-face shift, and log p_k saturates (a face at p = 0.999 hardly
  moves it, so confident faces would vanish from the average); for two classes the log-odds is
  the binary logit itself, up to sign.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mefem_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from mefem_jax.evaluation.embeddings import embed_batch
from mefem_jax.evaluation.probes import ProbeResult
from mefem_jax.models.vit import encoder_dims

# features(images [B, S, S, 3] ImageNet-normalised float32, grid_size) -> {"cls", "mean", "grid": [B, d]}
FeaturesFn = Callable[[np.ndarray, int], dict[str, np.ndarray]]
FILL = 0.0  # ImageNet's mean colour in normalised space (module docstring)
# embed_batch always computes its pixel baseline too; saliency never reads it, so it is the cheapest one.
_UNUSED_PIXEL_SIZE = 1


class SaliencyError(ValueError):
    """Inputs that do not make a saliency map (a feature the encoder does not return, a grid that does
    not tile the image, a readout of the wrong width)."""


def linear_readout(result: ProbeResult) -> tuple[np.ndarray, np.ndarray]:
    """The fitted probe as float64 (w [d, c], b [c]) on raw (unstandardised) features.

    Regression: c = 1, x @ w + b is the pipeline's unclipped `predict`. Classification: c = the number
    of classes, logits whose softmax is `predict_proba`; for two classes the columns are [0, z] with z
    the binary `decision_function`, so every classifier has one logit per class."""
    if result.model is None:
        raise SaliencyError("the probe result carries no fitted estimator (ProbeResult.model)")
    scaler, head = result.model[0], result.model[-1]
    coef = np.atleast_2d(np.asarray(head.coef_, np.float64))          # [c or 1, d] on standardised features
    intercept = np.atleast_1d(np.asarray(head.intercept_, np.float64))
    if result.scores is not None and coef.shape[0] == 1:                 # binary logistic: class 0's logit is 0
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    # (x - mean) / scale @ coef.T + intercept, folded into one affine map of x.
    w = coef.T / np.asarray(scaler.scale_, np.float64)[:, None]
    b = intercept - np.asarray(scaler.mean_, np.float64) @ w
    return w, b


def readout_score(logits, predicted, xp=np):
    """[n, c] readout outputs -> [n] scores: the value (c = 1), or the log-odds of class `predicted`
    [n] (module docstring). `xp` is numpy or jax.numpy, so both maps score with the same code."""
    if logits.shape[1] == 1:
        return logits[:, 0]
    own = xp.take_along_axis(logits, predicted[:, None], axis=1)[:, 0]
    others = xp.where(xp.arange(logits.shape[1])[None] == predicted[:, None], -xp.inf, logits)
    top = others.max(axis=1, keepdims=True)  # log-sum-exp of the other classes, stabilised
    return own - (top[:, 0] + xp.log(xp.exp(others - top).sum(axis=1)))


def _check_width(feature: str, width: int, w: np.ndarray) -> None:
    if width != w.shape[0]:
        raise SaliencyError(f"the probe reads {w.shape[0]} {feature!r} features, the encoder returns "
                            f"{width} (another grid_size?)")


def _check_readout(features: dict[str, np.ndarray], feature: str, w: np.ndarray) -> np.ndarray:
    if feature not in features:
        raise SaliencyError(f"saliency of {feature!r} features: the encoder returns only {sorted(features)}")
    _check_width(feature, features[feature].shape[1], w)
    return features[feature]


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or not len(images):
        raise SaliencyError(f"saliency needs one or more images [n, S, S, 3], got shape {images.shape}")
    return images


def _batches(n_rows: int, batch_size: int):
    for start in range(0, n_rows, batch_size):
        yield np.arange(start, min(start + batch_size, n_rows))


def _padded(x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((batch_size - len(x),) + x.shape[1:], x.dtype)]) if len(x) < batch_size else x


def occlusion_map(features_fn: FeaturesFn, images: np.ndarray, feature: str, readout,
                  grid: tuple[int, int], grid_size: int, batch_size: int = 64) -> np.ndarray:
    """[gh, gw] float64: mean over `images` of |score change| when one patch-grid cell is filled."""
    return occlusion_maps(features_fn, images, {"map": (feature, readout)}, grid, grid_size, batch_size)["map"]


def occlusion_maps(features_fn: FeaturesFn, images: np.ndarray, readouts: dict, grid: tuple[int, int],
                   grid_size: int, batch_size: int = 64) -> dict[str, np.ndarray]:
    """occlusion_map for several probes at once, `readouts`: name -> (feature, linear_readout(...)).
    The occluded copies are embedded once for all of them: the forward passes are the cost (196 cells x
    64 faces is 12,544 images), the readouts are a matrix product each.

    The gh * gw occluded copies of every face are built batch by batch (never all at once: 196 copies
    of 64 faces at 224 px are 7.5 GB) and every batch reaches `features_fn` at `batch_size` rows."""
    images = _check_images(images)
    n, height, width = images.shape[:3]
    gh, gw = grid
    if height % gh or width % gw:
        raise SaliencyError(f"a {gh}x{gw} patch grid does not tile {height}x{width} images")
    ph, pw = height // gh, width // gw

    def logits(rows: np.ndarray) -> dict[str, np.ndarray]:  # name -> [len(rows), c]; padding rows dropped
        features = features_fn(_padded(rows, batch_size), grid_size)
        return {name: _check_readout(features, feature, w)[:len(rows)].astype(np.float64) @ w + b
                for name, (feature, (w, b)) in readouts.items()}

    clean_parts = [logits(images[idx]) for idx in _batches(n, batch_size)]
    clean = {name: np.concatenate([part[name] for part in clean_parts]) for name in readouts}
    predicted = {name: np.argmax(v, axis=1) for name, v in clean.items()}
    base = {name: readout_score(v, predicted[name]) for name, v in clean.items()}
    cells = np.zeros((gh * gw, height, width, 1), bool)  # cell k's pixels, row-major over the grid
    for k in range(gh * gw):
        r, c = divmod(k, gw)
        cells[k, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = True
    change = {name: np.empty(n * gh * gw) for name in readouts}  # face-major: copy j is face j // (gh*gw)
    for idx in _batches(n * gh * gw, batch_size):
        face, cell = np.divmod(idx, gh * gw)
        occluded = logits(np.where(cells[cell], np.float32(FILL), images[face]))
        for name, out in occluded.items():
            change[name][idx] = np.abs(readout_score(out, predicted[name][face]) - base[name][face])
    return {name: v.reshape(n, gh, gw).mean(0) for name, v in change.items()}


def jax_features(loaded, batch_size: int = 64) -> FeaturesFn:
    """A features callable for one of our encoders (a `weights.spec.LoadedEncoder`): the embeddings.py
    forward that evaluate probes on, so the readouts are the probed features exactly. Every call is
    cut into zero-padded `batch_size` batches: one compile per (encoder, batch size, grid size)."""
    params = jax.device_put(loaded.params)

    def features(images: np.ndarray, grid_size: int) -> dict[str, np.ndarray]:
        images = np.asarray(images, np.float32)
        out: dict[str, list[np.ndarray]] = {"cls": [], "mean": [], "grid": []}
        for idx in _batches(len(images), batch_size):
            f = embed_batch(params, _padded(images[idx], batch_size), len(idx), encoder=loaded.encoder,
                            pixel_size=_UNUSED_PIXEL_SIZE, grid_size=grid_size)
            for key, parts in out.items():
                parts.append(np.asarray(f[key])[:len(idx)])
        return {key: np.concatenate(parts) for key, parts in out.items()}
    return features


@functools.partial(jax.jit, static_argnames=("encoder", "feature", "grid_size", "cells"))
def _gradient_x_input(params, images, n_valid, w, b, *, encoder, feature: str, grid_size: int, cells=None):
    """Sum over the first `n_valid` faces of |sum_channels d score / d image * image|, [S, S]; with `cells`
    (gh, gw) the signed values are first summed over each cell, [gh, gw]."""
    valid = (jnp.arange(images.shape[0]) < n_valid).astype(jnp.float32)

    def total_score(x):
        feats = embed_batch(params, x, encoder=encoder, pixel_size=_UNUSED_PIXEL_SIZE, grid_size=grid_size)
        logits = jnp.dot(feats[feature], w, precision="highest") + b
        scores = readout_score(logits, jnp.argmax(logits, axis=1), jnp)
        # Faces do not interact in the forward, so the gradient of the sum is every face's own gradient.
        return jnp.sum(scores * valid)

    grads = jax.grad(total_score)(images)
    signed = jnp.sum(grads * images, axis=-1)
    if cells is not None:
        gh, gw = cells
        signed = signed.reshape(signed.shape[0], gh, signed.shape[1] // gh, gw, signed.shape[2] // gw).sum((2, 4))
    return jnp.einsum("b,bhw->hw", valid, jnp.abs(signed))


def gradient_x_input(loaded, images: np.ndarray, feature: str, readout, grid_size: int,
                     batch_size: int = 32, cells: tuple[int, int] | None = None) -> np.ndarray:
    """[S, S] float64: gradient x input of the probe score, |.| per pixel, mean over `images`.

    With `cells` (the patch grid) it is [gh, gw]: the signed gradient x input summed over each cell
    before |.|, which is the first-order change of the score when that cell is set to 0, the FILL of
    occlusion_map. Per pixel, a ViT's map is dominated by a pattern repeating in every patch (the
    patch embedding's own weights); per cell it is the linear estimate of the occlusion map beside it."""
    images = _check_images(images)
    w, b = readout
    if feature not in ("cls", "mean", "grid"):
        raise SaliencyError(f"gradient x input of {feature!r} features: choose cls, mean or grid")
    if cells is not None and (images.shape[1] % cells[0] or images.shape[2] % cells[1]):
        raise SaliencyError(f"a {cells[0]}x{cells[1]} grid does not tile {images.shape[1]}x{images.shape[2]} images")
    width = encoder_dims(loaded.model_cfg)[0]
    _check_width(feature, width * grid_size ** 2 if feature == "grid" else width, w)
    params = jax.device_put(loaded.params)
    total = 0.0
    for idx in _batches(len(images), batch_size):
        total = total + np.asarray(_gradient_x_input(
            params, _padded(images[idx], batch_size), len(idx), jnp.asarray(w, jnp.float32),
            jnp.asarray(b, jnp.float32), encoder=loaded.encoder, feature=feature, grid_size=grid_size,
            cells=None if cells is None else tuple(cells)), np.float64)
    return total / len(images)


def mean_face(images: np.ndarray) -> np.ndarray:
    """uint8 [S, S, 3]: the pixel-wise mean of ImageNet-normalised faces, back in RGB."""
    mean = np.asarray(images, np.float64).mean(0) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return np.clip(np.round(mean * 255.0), 0, 255).astype(np.uint8)


def plot_saliency(path: str | Path, title: str, face: np.ndarray, maps: dict[str, np.ndarray]) -> None:
    """One panel per map (label -> [h, w] map of any resolution) blended over `face`, each with its
    own colour bar in the map's units. Cells are drawn as blocks (nearest), true to the map's grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(maps), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    height, width = face.shape[:2]
    for i, (label, values) in enumerate(maps.items()):
        ax = fig.add_subplot(1, len(maps), i + 1)
        ax.imshow(face, extent=(0, width, height, 0))
        shown = ax.imshow(values, cmap="inferno", alpha=0.55, interpolation="nearest", vmin=0.0,
                          extent=(0, width, height, 0))  # from 0: every map here is a magnitude
        fig.colorbar(shown, ax=ax, shrink=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
