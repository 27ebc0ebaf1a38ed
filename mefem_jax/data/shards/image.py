"""One image for a shard: validated fully, its bytes kept when possible, or the reason to skip it.

JPEG and PNG files go in byte for byte; an image is re-encoded (JPEG, --jpeg_quality) only when it
must change: downscaled, turned by its EXIF orientation, in another format, or aligned
(`faces.py`). With --align or --landmark_labels the face step runs on the decoded photo. Every
prepared image carries the fingerprints of what the record stores (`face_hash`), for --dedup and the
leakage check: of the photo already decoded when the bytes are kept, else of the new bytes decoded;
and the face's quality measures (`quality.py`: size, sharpness, with landmarks the head's turn), for
the quality filters: of the photo the landmarks were fitted on, else of the pixels stored (before a JPEG
re-encode, which barely changes them).
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mefem_jax.data import decode, face_hash
from mefem_jax.data.shards import quality
from mefem_jax.data.shards.plan import BuildOptions

_KEPT_FORMATS = ("JPEG", "PNG")
_EXIF_ORIENTATION = 0x0112


class SkipImage(Exception):
    """This image cannot be used; the message is the reason written to the manifest."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    image: bytes                       # what the record stores
    hash: face_hash.FaceHash           # its fingerprints
    quality: dict                      # its face's measures (quality.measure)
    labels: dict = dataclasses.field(default_factory=dict)  # labels the face step adds
    faces_found: int = 0               # faces detected (face step only)


def _stored(image: bytes, measures: dict, decoded: Image.Image | None = None, face=None) -> Prepared:
    """`decoded`: the image decoded from exactly these bytes, which spares decoding them again for the
    fingerprints; `face`: the face step's faces.FoundFace."""
    fingerprints = face_hash.hash_bytes(image) if decoded is None else face_hash.hash_image(decoded)
    if face is None:
        return Prepared(image, fingerprints, measures)
    return Prepared(image, fingerprints, measures, face.labels, face.faces_found)


def _measures(photo: Image.Image, face=None) -> dict:
    """quality.measure of a decoded photo, with the landmarks of the face step's faces.FoundFace if any."""
    gray = np.asarray(decode.to_rgb(photo).convert("L"))
    return quality.measure(gray, None if face is None else face.points)


def _target_size(width: int, height: int, opts: BuildOptions) -> tuple[int, int] | None:
    scale = 1.0
    if opts.image_size and min(width, height) > opts.image_size:
        scale = opts.image_size / min(width, height)
    if max(width, height) * scale > opts.max_side:
        scale = opts.max_side / max(width, height)
    if scale >= 1.0:
        return None
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def _encode(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def prepare(path: str, opts: BuildOptions) -> Prepared:
    """What to store for one image file (bytes, and the face step's labels), or SkipImage(reason)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise SkipImage("empty file")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        fmt = image.format
    except Image.DecompressionBombError as err:
        raise SkipImage(f"too many pixels to decode safely: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SkipImage(f"not an image PIL can read ({type(err).__name__})") from None
    if min(width, height) < opts.min_side:
        raise SkipImage(f"too small: {width}x{height} px (--min_side={opts.min_side})")
    target = _target_size(width, height, opts)
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to drop the face
        orientation = 1
    if target and fmt == "JPEG":
        image.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale when that is still enough
    try:
        image.load()  # the full decode is what finds truncated and corrupt files
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError…
        raise SkipImage(f"truncated or corrupt {fmt or 'image'}: {err}") from None
    unchanged = target is None and orientation in (None, 1) and fmt in _KEPT_FORMATS
    if unchanged and not opts.uses_faces:
        return _stored(data, _measures(image), image)
    if orientation not in (None, 1):
        image = ImageOps.exif_transpose(image)
        if target and orientation in (5, 6, 7, 8):  # quarter turns swap width and height
            target = target[::-1]
    rgb = decode.to_rgb(image)
    if target:
        rgb = rgb.resize(target, Image.BICUBIC, reducing_gap=2.0)
    if opts.uses_faces:
        from mefem_jax.data.shards import faces  # dlib: only for builds that use faces

        try:
            face = faces.face_step(rgb, opts)
        except faces.NoUsableFace as err:
            raise SkipImage(str(err)) from None
        measures = _measures(rgb, face)
        if face.aligned is not None:
            return _stored(_encode(face.aligned, opts.jpeg_quality), measures, face=face)
        if unchanged:
            return _stored(data, measures, image, face)
        return _stored(_encode(rgb, opts.jpeg_quality), measures, face=face)
    return _stored(_encode(rgb, opts.jpeg_quality), _measures(rgb))
