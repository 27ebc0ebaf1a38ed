"""Per-image preprocessing on the host: random-resized crop, flip, centre square, as Grain maps.

`TrainPreprocess` (data.augment_on=host; a Grain RandomMap: its numpy Generator comes from (seed,
element index), so a crop is a pure function of the seed and the position in the stream),
`SourcePreprocess` (data.augment_on=device: centre square at the fixed size the step crops from,
no randomness; the crop and flip happen in the step, see `device_augment.py`) and `EvalPreprocess`
(centre square, resize, no randomness) turn a raw example from `sources.py`,

    {"id": str, "labels": {name: value}, "image": bytes | uint8 [H, W, 3]}

into `{"image": uint8 [S, S, 3], ...}`. Training batches stay uint8 (the step normalises on the
device); evaluation batches are normalised to float32 by `normalize_into`. A record that cannot
be decoded becomes
`{"id": ..., "error": reason}` instead of raising: the pipeline drops and counts those (see
`pipeline.py`), so one broken JPEG never stops a run.

The crop follows torchvision's RandomResizedCrop (area fraction ~ U(scale), log aspect ~
U(log ratio), ten tries, then a centre crop with the ratio clamped), but with continuous
sub-pixel boxes: PIL's `resize(box=...)` accepts floats, so there is no rounding bias toward the
top-left. Crop and resize are one PIL call, and JPEG decoding runs at reduced scale when the crop
is large enough (`decode.reduce_for`).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import grain
import numpy as np
from PIL import Image

from mefem_jax.data import decode
from mefem_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD


def sample_crop_box(width: int, height: int, rng: np.random.Generator,
                    scale: tuple[float, float] = (0.3, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> decode.Box:
    """A random (left, top, right, bottom) box covering a U(scale) fraction of the image area."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = math.sqrt(target_area * aspect)
        h = math.sqrt(target_area / aspect)
        if 0 < w <= width and 0 < h <= height:
            left = rng.uniform(0, width - w)
            top = rng.uniform(0, height - h)
            return (left, top, left + w, top + h)
    # Fallback (very elongated images): the largest centred box with an allowed aspect ratio.
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, width / aspect) if width / height <= aspect else (height * aspect, height)
    left, top = (width - w) / 2, (height - h) / 2
    return (left, top, left + w, top + h)


def center_box(width: int, height: int) -> decode.Box:
    """The centred square with the shorter side: faces are centred by the crop that made them."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


@functools.lru_cache(maxsize=8)
def _normalisation_constants(num_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    # Broadcasting a length-3 vector over [H, W, 3] runs numpy's inner loop three elements at a
    # time (about 10x slower than a flat multiply here), so the constants are tiled to the flat
    # image once per size and reused.
    mean = np.asarray(IMAGENET_MEAN, np.float32) * 255
    std = np.asarray(IMAGENET_STD, np.float32) * 255
    scale = np.tile(1.0 / std, num_pixels).astype(np.float32)
    bias = np.tile(-mean / std, num_pixels).astype(np.float32)
    return scale, bias


def normalize_into(images: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """Writes uint8 [H, W, 3] images into the float32 batch `out` [rows, H, W, 3] as
    (x/255 - mean) / std with ImageNet statistics (what timm expects); rows beyond the images
    are set to zero (padding). Returns `out`.

    Straight into the batch buffer: one allocation per batch (possibly in shared memory, see
    pipeline.py) instead of a float32 image per element plus a stack copy; at 224 px this
    halves the cost of the step.
    """
    h, w, _ = images[0].shape
    scale, bias = _normalisation_constants(h * w)
    flat = out.reshape(len(out), -1)  # a view: `out` is C-contiguous
    for row, pixels in zip(flat, images):
        np.multiply(pixels.reshape(-1), scale, out=row)
        row += bias
    flat[len(images):] = 0.0
    return out


def normalize(pixels: np.ndarray) -> np.ndarray:
    """One uint8 [H, W, 3] image → float32 [H, W, 3], as `normalize_into`."""
    return normalize_into([pixels], np.empty((1,) + pixels.shape, np.float32))[0]


def crop_resize(data: bytes | np.ndarray, box_fn, size: int, flip: bool = False) -> np.ndarray:
    """Decodes `data`, crops `box_fn(width, height)` and resizes it: uint8 [size, size, 3].

    A box that is the whole decoded image at exactly `size` px (a 224 px face read for a 224 px
    model) is passed through without resampling.
    """
    image, box = decode.decode_for_box(data, box_fn, size)
    if box != (0, 0, size, size) or decode.image_size(image) != (size, size):
        image = decode.as_pil(image).resize((size, size), Image.BILINEAR, box=box)
    if flip:
        image = decode.as_pil(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image)


def _cropped(example: dict, box_fn, size: int, flip: bool = False, keep_id: bool = False,
             keep_labels: bool = False) -> dict:
    """{"image": uint8 [size, size, 3]} (+ "id", + the labels) of a raw example, or its failure record
    {"id", "error"}: a broken record is skipped and counted downstream, never raised."""
    if "error" in example:
        return example
    try:
        pixels = crop_resize(example["image"], box_fn, size, flip)
    except Exception as err:  # noqa: BLE001 - any broken record is skipped and counted
        return {"id": example.get("id", "?"), "error": f"{type(err).__name__}: {err}"}
    out = {"image": pixels}
    if keep_id or keep_labels:
        out["id"] = example["id"]
    if keep_labels:
        out.update(example["labels"])
    return out


class TrainPreprocess(grain.transforms.RandomMap):
    """Raw example → {"image": uint8 [S, S, 3]} (+ "id" when `keep_id`), randomly cropped."""

    def __init__(self, image_size: int, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
                 keep_id: bool = False):
        self.image_size = int(image_size)
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.flip = bool(flip)
        self.keep_id = keep_id

    def random_map(self, example: dict, rng: np.random.Generator) -> dict:
        if "error" in example:
            return example
        flip = self.flip and rng.random() < 0.5
        return _cropped(example, lambda w, h: sample_crop_box(w, h, rng, self.scale, self.ratio),
                        self.image_size, flip, keep_id=self.keep_id)


class SourcePreprocess(grain.transforms.Map):
    """Raw example → {"image": uint8 [S, S, 3]} (+ "id" when `keep_id`): the centre square at the
    size the device crops from (data.augment_on=device).

    Faces are centred by the crop that made them, and every face set here is square, so for them
    the centre square is the whole image and the device crop sees what the host crop would. A
    non-square source loses its sides (use data.augment_on=host to crop from the full frame).
    """

    def __init__(self, image_size: int, keep_id: bool = False):
        self.image_size = int(image_size)
        self.keep_id = keep_id

    def map(self, example: dict) -> dict:
        return _cropped(example, center_box, self.image_size, keep_id=self.keep_id)


class EvalPreprocess(grain.transforms.Map):
    """Raw example → {"image", "id", **labels}: centre square resized to S, no randomness."""

    def __init__(self, image_size: int):
        self.image_size = int(image_size)

    def map(self, example: dict) -> dict:
        return _cropped(example, center_box, self.image_size, keep_labels=True)
