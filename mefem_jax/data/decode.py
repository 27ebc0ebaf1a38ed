"""Image bytes (or an already-rendered array) → an RGB PIL image, as cheaply as the crop allows.

Every source hands the pipeline either encoded bytes (JPEG, PNG, anything PIL reads) or a uint8
array (the synthetic faces). Grayscale, palette, RGBA, CMYK and 16-bit images are converted to
8-bit RGB here, so nothing downstream ever sees another mode. Alpha is dropped, not composited:
the writer stores RGBA PNGs untouched, and the reader must treat them the same way everywhere.

Speed: JPEGs (YCbCr or grayscale) are decoded by simplejpeg when it is installed: it wraps the same
libjpeg-turbo as Pillow but skips Pillow's per-image plugin and buffer machinery, which on 200 px
faces is most of the cost (PIL ~660 us, simplejpeg ~160 us per UTKFace face, benchmarks/RESULTS.md).
Anything else, and any JPEG simplejpeg refuses, goes through PIL, so the two decoders never disagree
on which records are readable. Both decode at 1/2, 3/8, 1/4 or 1/8 of the size (dropping DCT
coefficients: faster, and a correct anti-aliasing filter) when the region we will crop still has at
least the output's number of pixels after the reduction (`decode_for_box`; PIL's `draft` in
`reduce_for`).
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

try:  # optional (setup.py's `fastjpeg` extra); PIL decodes everything without it
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the install
    simplejpeg = None

# Whether JPEGs go through simplejpeg (when installed). A module switch so that benchmarks can time
# both decoders in one process; nothing in training changes it.
USE_SIMPLEJPEG = simplejpeg is not None
_JPEG_MAGIC = b"\xff\xd8"
_SIMPLE_SPACES = ("YCbCr", "Gray")  # CMYK/YCCK JPEGs (Adobe inverted ink) stay with PIL

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


def _needed_size(width: int, height: int, box: Box, out_size: int) -> tuple[int, int] | None:
    """The smallest full-image size at which `box` still has `out_size` px each way, or None when
    no reduction by at least 2 is possible."""
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    need = (math.ceil(width * out_size / crop_w), math.ceil(height * out_size / crop_h))
    return None if need[0] * 2 > width and need[1] * 2 > height else need


def _rescale(box: Box, sx: float, sy: float) -> Box:
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def reduce_for(image: Image.Image, box: Box, out_size: int) -> tuple[Image.Image, Box]:
    """Asks a JPEG to decode at reduced scale when the crop `box` allows it.

    Returns the (possibly reduced) image and `box` rescaled to its new size.
    """
    if image.format != "JPEG":
        return image, box
    w, h = image.size
    need = _needed_size(w, h, box, out_size)
    if need is None:
        return image, box  # no reduction possible; skip the call
    image.draft("RGB", need)  # the largest reduction whose result is still >= `need`
    return image, _rescale(box, image.size[0] / w, image.size[1] / h)


def _simplejpeg_for_box(data, box_fn, out_size: int):
    """`decode_for_box` through simplejpeg: (image, box), or (None, box or None) when this record is
    not one for it (the box, once drawn, is kept: `box_fn` may consume random numbers)."""
    if not (USE_SIMPLEJPEG and isinstance(data, (bytes, bytearray, memoryview))
            and bytes(data[:2]) == _JPEG_MAGIC):
        return None, None
    try:
        height, width, space, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None, None
    if space not in _SIMPLE_SPACES:
        return None, None
    box = box_fn(width, height)
    need = _needed_size(width, height, box, out_size)
    try:
        # min_factor=2: reduce by 2, 8/3, 4 or 8 when `need` allows, else decode at full size.
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_width=need[0] if need else 0,
                                        min_height=need[1] if need else 0, min_factor=2)
    except ValueError:
        return None, box  # refused (corrupt, or a warning in strict mode): PIL decides, as without it
    return pixels, _rescale(box, pixels.shape[1] / width, pixels.shape[0] / height)


def decode_for_box(data: bytes | np.ndarray, box_fn,
                   out_size: int) -> tuple[Image.Image | np.ndarray, Box]:
    """Decodes `data` to RGB, reduced in the DCT domain as far as the crop allows.

    `box_fn(width, height)` gives the crop box in the full image's pixels (called once, with the
    stored size); returns the decoded image and that box in the decoded image's pixels. The image
    is a PIL RGB image, or (from simplejpeg) a uint8 [H, W, 3] array: a face that needs no
    resampling then reaches the batch without another copy (`as_pil` when one is needed).
    """
    image, box = _simplejpeg_for_box(data, box_fn, out_size)
    if image is not None:
        return image, box
    image = open_image(data)
    if box is None:
        box = box_fn(*image.size)
    image, box = reduce_for(image, box, out_size)
    return to_rgb(image), box


def image_size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """(width, height) of what `decode_for_box` returns."""
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    return Image.fromarray(image) if isinstance(image, np.ndarray) else image


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
    image, _ = decode_for_box(data, lambda w, h: (0, 0, w, h), out_size=1 << 30)
    return np.asarray(image)
