"""What the train step does to a uint8 batch: random-resized crop and flip (data.augment_on=device),
then ImageNet normalisation, all inside the jitted step.

The host sends uint8 [b, R, R, 3] (R = data.source_size, by default the model's image size): a
quarter of the bytes of float32, and no per-pixel arithmetic on the host. With augment_on=host
the batch is already cropped to the model's size and only normalised here.

The crop is `augment.sample_crop_box` vectorised: ten (area, log-aspect) candidates per image, the
first that fits is taken, else the same clamped centre fallback, then a uniform position. The
source is the square centre of the face (augment.SourcePreprocess), so boxes are drawn in the unit
square and scaled to R. Resampling is a triangle kernel widened when downscaling, as two weight
matrices per image: the filter PIL's BILINEAR resize with a box applies on the host, so a crop with
the same box matches it to within rounding (tests/test_device_augment.py). Shapes are
static (a crop is a scale and an offset, not a slice), so one compiled step serves every draw,
and the draws come from the step's own key: a resumed run crops exactly as an uninterrupted one.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mefem_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD

CROP_TRIES = 10  # as augment.sample_crop_box (and torchvision)


def input_size(data_cfg, image_size: int) -> int:
    """Pixels per side of the uint8 images a training batch carries: data.source_size with
    augment_on=device (0: the model's size), else the model's size."""
    if data_cfg.augment_on == "device" and data_cfg.source_size:
        return int(data_cfg.source_size)
    return int(image_size)


def normalize(images: jax.Array) -> jax.Array:
    """uint8 (or 0..255 float) [..., 3] → float32 (x/255 - mean) / std with ImageNet statistics."""
    mean = jnp.asarray(np.asarray(IMAGENET_MEAN, np.float32) * 255)
    inv_std = jnp.asarray(1.0 / (np.asarray(IMAGENET_STD, np.float32) * 255))
    return (images.astype(jnp.float32) - mean) * inv_std


def sample_boxes(rng: jax.Array, batch: int, scale: tuple[float, float] = (0.3, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
    """float32 [batch, 4] crop boxes (left, top, width, height) as fractions of a square image."""
    k_area, k_aspect, k_pos = jax.random.split(rng, 3)
    area = jax.random.uniform(k_area, (batch, CROP_TRIES), minval=scale[0], maxval=scale[1])
    log_aspect = jax.random.uniform(k_aspect, (batch, CROP_TRIES), minval=math.log(ratio[0]),
                                    maxval=math.log(ratio[1]))
    aspect = jnp.exp(log_aspect)
    w, h = jnp.sqrt(area * aspect), jnp.sqrt(area / aspect)
    fits = (w <= 1.0) & (h <= 1.0)
    first = jnp.argmax(fits, axis=1)[:, None]  # the first candidate that fits (0 if none does)
    w = jnp.take_along_axis(w, first, 1)[:, 0]
    h = jnp.take_along_axis(h, first, 1)[:, 0]
    # Fallback when no candidate fits: the largest centred box with an allowed aspect (on a square:
    # the whole image unless 1 lies outside `ratio`).
    fb_aspect = min(max(1.0, ratio[0]), ratio[1])
    fb_w, fb_h = (1.0, 1.0 / fb_aspect) if fb_aspect >= 1.0 else (fb_aspect, 1.0)
    any_fits = fits.any(axis=1)
    w = jnp.where(any_fits, w, fb_w)
    h = jnp.where(any_fits, h, fb_h)
    u = jax.random.uniform(k_pos, (batch, 2))
    left = jnp.where(any_fits, u[:, 0], 0.5) * (1.0 - w)
    top = jnp.where(any_fits, u[:, 1], 0.5) * (1.0 - h)
    return jnp.stack([left, top, w, h], axis=1)


def sample_flips(rng: jax.Array, batch: int) -> jax.Array:
    """bool [batch]: which images to mirror (probability 1/2)."""
    return jax.random.bernoulli(rng, 0.5, (batch,))


def _weights(out_size: int, in_size: int, start: jax.Array, length: jax.Array) -> jax.Array:
    """float32 [out_size, in_size]: PIL's BILINEAR resampling of the span [start, start + length)
    (input pixels, continuous) onto `out_size` pixels, as a matrix.

    Output pixel o is centred at input coordinate start + (o + 1/2) * length / out_size; input pixel
    i (centre i + 1/2) gets the triangle weight max(0, 1 - |distance| / support), support = 1 when
    upsampling and the input pixels per output pixel when downsampling (anti-aliasing); weights
    are normalised over the pixels inside the image, so edges are not darkened.
    """
    step = length / out_size
    centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step
    support = jnp.maximum(step, 1.0)
    pixel_centres = jnp.arange(in_size, dtype=jnp.float32) + 0.5
    w = jnp.maximum(0.0, 1.0 - jnp.abs(pixel_centres[None, :] - centres[:, None]) / support)
    return w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)


def crop_resize(images: jax.Array, boxes: jax.Array, flips: jax.Array, size: int) -> jax.Array:
    """float32 [b, size, size, 3]: each image's `boxes` row (unit-square fractions) resampled to
    `size` px, mirrored where `flips`. Values stay in the input's 0..255 range.

    Two small matmuls per image (rows, then columns) with the weight matrices of `_weights`; the
    flip reverses the column weights, so it costs nothing on the pixels.
    """
    _, src, src_w, _ = images.shape
    if src_w != src:
        raise ValueError(f"device crop needs square images, got {images.shape}")
    boxes = boxes * src
    rows = jax.vmap(lambda t, h: _weights(size, src, t, h))(boxes[:, 1], boxes[:, 3])
    cols = jax.vmap(lambda l, w: _weights(size, src, l, w))(boxes[:, 0], boxes[:, 2])
    cols = jnp.where(flips[:, None, None], cols[:, ::-1], cols)
    hi = jax.lax.Precision.HIGHEST  # pixel-exact: a bf16 pass would cost up to a grey level
    x = jnp.einsum("boh,bhwc->bowc", rows, images.astype(jnp.float32), precision=hi)
    return jnp.einsum("bpw,bowc->bopc", cols, x, precision=hi)


def prepare_from_config(data_cfg, image_size: int):
    """`prepare` with the crop settings of the `data` config block: (images, rng) -> images."""
    mode, scale, ratio = str(data_cfg.augment_on), tuple(data_cfg.crop_scale), tuple(data_cfg.crop_ratio)
    flip = bool(data_cfg.flip)
    return lambda images, rng: prepare(images, rng, mode=mode, image_size=image_size, scale=scale,
                                       ratio=ratio, flip=flip)


def prepare(images: jax.Array, rng: jax.Array, *, mode: str, image_size: int,
            scale: tuple[float, float], ratio: tuple[float, float], flip: bool) -> jax.Array:
    """A training batch as the encoder takes it: float32 [b, S, S, 3], ImageNet-normalised.

    uint8 input is a pipeline batch: cropped and flipped here when `mode` is "device", then
    normalised. Floating-point input is taken as already prepared and returned unchanged (the
    parity tests and benchmarks feed fixed, normalised images).
    """
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    if mode == "device":
        k_box, k_flip = jax.random.split(rng)
        b = images.shape[0]
        boxes = sample_boxes(k_box, b, scale, ratio)
        flips = sample_flips(k_flip, b) & flip
        return normalize(crop_resize(images, boxes, flips, image_size))
    if mode != "host":
        raise ValueError(f"data.augment_on={mode!r}; allowed: 'host', 'device'")
    if images.shape[1:3] != (image_size, image_size):
        raise ValueError(f"host-augmented batch of {images.shape[1:3]} px for a {image_size} px model")
    return normalize(images)
