"""Image bytes (or an already-rendered array) → an RGB PIL image, as cheaply as the crop allows.

Every source hands the pipeline either encoded bytes (JPEG, PNG, anything PIL reads) or a uint8
array (the synthetic faces). Grayscale, palette, RGBA, CMYK and 16-bit images are converted to
8-bit RGB here, so nothing downstream ever sees another mode. Alpha is dropped, not composited:
the writer stores RGBA PNGs untouched, and the reader must treat them the same way everywhere.

Speed: for JPEG, `open_image` + `reduce_for` use PIL's `draft`, which lets libjpeg decode at 1/2,
1/4 or 1/8 of the size by dropping DCT coefficients. That is both faster and a correct
anti-aliasing filter, and it is taken only when the region we will crop still has at least the
output's number of pixels after the reduction.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels, PIL's order

# PIL's own guard stays on: opening an image of more than 2 * Image.MAX_IMAGE_PIXELS (~179M)
# pixels raises DecompressionBombError, which the callers treat as "skip this record".


def open_image(data: bytes | np.ndarray) -> Image.Image:
    """Opens without decoding pixels (PIL is lazy): the size is known, `draft` still possible."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 3 or data.shape[-1] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] array, got {data.dtype} {data.shape}")
        return Image.fromarray(data)
    return Image.open(io.BytesIO(data))


def reduce_for(image: Image.Image, box: Box, out_size: int) -> tuple[Image.Image, Box]:
    """Asks a JPEG to decode at reduced scale when the crop `box` allows it.

    Returns the (possibly reduced) image and `box` rescaled to its new size.
    """
    if image.format != "JPEG":
        return image, box
    w, h = image.size
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    # draft() picks the largest reduction whose result is still >= the requested size.
    need = (math.ceil(w * out_size / crop_w), math.ceil(h * out_size / crop_h))
    if need[0] * 2 > w and need[1] * 2 > h:
        return image, box  # no reduction possible; skip the call
    image.draft("RGB", need)
    sx, sy = image.size[0] / w, image.size[1] / h
    return image, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def to_rgb(image: Image.Image) -> Image.Image:
    """Decodes the pixels and converts any mode to 8-bit RGB (raises on truncated/corrupt data)."""
    image.load()
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: convert("RGB") would clip at 255; scale the range down first.
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        gray = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    return image.convert("RGB")


def decode_rgb(data: bytes | np.ndarray) -> np.ndarray:
    """The whole image as uint8 [H, W, 3] (for tools and tests; the pipeline crops first)."""
    return np.asarray(to_rgb(open_image(data)))
