"""A bad-input corpus for the shard builder and the reader, generated on demand (in tmp_path).

`make_corpus(root, faces)` writes an images folder and a labels CSV in which real faces are
interleaved with every kind of bad input the data package must survive, and returns what a
correct build must do with each file: keep it (possibly converted) or skip it with a reason.

Kept (and converted to RGB by the reader): PNG, RGBA PNG, CMYK JPEG, grayscale JPEG, and an
8000x8000 JPEG (downscaled to --max_side when written). Skipped and listed in the manifest: a
truncated JPEG, text bytes named .jpg, a 1x1 image (under --min_side), a CSV row whose file does
not exist, a row with a missing label value and a row with a non-numeric label value.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os

from PIL import Image, ImageDraw

@dataclasses.dataclass
class Corpus:
    images: str
    labels: str
    kept: dict[str, int]           # file → age label, for every row a build must write
    skipped: dict[str, str]        # file → a word the skip reason must contain
    originals: dict[str, Image.Image]  # file → the RGB picture a converted file was made from


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def make_corpus(root: str, faces: list[str], huge_side: int = 8000) -> Corpus:
    """`faces`: paths of at least 12 real face JPEGs (read, never modified)."""
    if len(faces) < 12:
        raise ValueError("make_corpus needs at least 12 real faces")
    images = os.path.join(root, "images")
    os.makedirs(images, exist_ok=True)
    face_bytes = [open(p, "rb").read() for p in faces[:12]]
    face = Image.open(io.BytesIO(face_bytes[0])).convert("RGB")

    huge = Image.new("RGB", (huge_side, huge_side), (120, 90, 60))
    ImageDraw.Draw(huge).ellipse((huge_side // 4, huge_side // 8, 3 * huge_side // 4,
                                  7 * huge_side // 8), fill=(220, 180, 150))
    files: dict[str, bytes] = {f"good_{i:03d}.jpg": b for i, b in enumerate(face_bytes)}
    files.update({
        "face.png": _encode(face, "PNG"),
        "rgba.png": _encode(face.convert("RGBA"), "PNG"),
        "cmyk.jpg": _encode(face.convert("CMYK"), "JPEG", quality=95),
        "gray.jpg": _encode(face.convert("L"), "JPEG", quality=95),
        "huge.jpg": _encode(huge, "JPEG", quality=80),
        "truncated.jpg": face_bytes[1][: len(face_bytes[1]) // 2],
        "not_an_image.jpg": b"this is a text file, not a JPEG\n" * 40,
        "tiny.png": _encode(Image.new("RGB", (1, 1), (200, 150, 120)), "PNG"),
    })
    for name, data in files.items():
        with open(os.path.join(images, name), "wb") as f:
            f.write(data)

    # CSV rows: (file, age); bad rows sit between good ones on purpose.
    rows = [("good_000.jpg", "30"), ("truncated.jpg", "31"), ("good_001.jpg", "32"),
            ("not_an_image.jpg", "33"), ("face.png", "34"), ("good_002.jpg", "35"),
            ("missing.jpg", "36"), ("rgba.png", "37"), ("good_003.jpg", "38"),
            ("good_010.jpg", ""), ("cmyk.jpg", "39"), ("good_004.jpg", "40"),
            ("good_011.jpg", "abc"), ("gray.jpg", "41"), ("good_005.jpg", "42"),
            ("tiny.png", "43"), ("huge.jpg", "44"), ("good_006.jpg", "45"),
            ("good_007.jpg", "46"), ("good_008.jpg", "47"), ("good_009.jpg", "48")]
    labels = os.path.join(root, "labels.csv")
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "age", "split"])
        writer.writerows((name, age, "train") for name, age in rows)

    skipped = {"truncated.jpg": "truncated", "not_an_image.jpg": "not an image",
               "tiny.png": "too small", "missing.jpg": "not found",
               "good_010.jpg": "missing value", "good_011.jpg": "not a number"}
    kept = {name: int(age) for name, age in rows if name not in skipped}
    originals = {"face.png": face, "rgba.png": face, "cmyk.jpg": face,
                 "gray.jpg": face.convert("L").convert("RGB")}
    return Corpus(images, labels, kept, skipped, originals)
