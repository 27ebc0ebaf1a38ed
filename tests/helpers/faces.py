"""The real faces the tests read: UTKFace crops beside the repository (../shared/data/utkface), read in
place and never copied here. A test that needs them skips, saying why, when the folder is absent."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from mefem_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD

UTKFACE = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "utkface").resolve()
IMAGES = UTKFACE / "images"


def require_utkface() -> Path:
    if not (UTKFACE / "labels.csv").is_file():
        pytest.skip(f"UTKFace faces not found at {UTKFACE} (expected ../shared/data/utkface)")
    return UTKFACE


def utkface_rows(n: int) -> list[dict]:
    """`n` rows of UTKFace's labels.csv spread over the whole file (all ages and groups)."""
    with open(require_utkface() / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    step = max(1, len(rows) // n)
    return rows[::step][:n]


def write_labels(path: str | os.PathLike, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8-range RGB -> the ImageNet-normalised float32 every encoder here reads."""
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return ((np.asarray(pixels, np.float32) / 255.0 - mean) / std).astype(np.float32)


def load_faces(files, size: int, resample=None) -> np.ndarray:
    """float32 [n, size, size, 3]: the given image files resized (bicubic unless said) and normalised."""
    from PIL import Image

    resample = Image.BICUBIC if resample is None else resample
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(normalize(np.asarray(im.convert("RGB").resize((size, size), resample))))
    return np.stack(out)


def pixel_embeddings(n: int, size: int):
    """(train, test) `Embeddings` of `n` UTKFace faces (utkface_rows, split by labels.csv's split column):
    their `size` px raw pixels as the one feature, "pixels", and age, gender and race as CSV text. A cheap,
    real feature set for the protocol tests."""
    from mefem_jax.evaluation.embeddings import Embeddings

    rows = utkface_rows(n)
    x = load_faces([IMAGES / r["file"] for r in rows], size).reshape(len(rows), -1)
    split = np.array([r["split"] for r in rows])

    def part(name: str) -> Embeddings:
        mask = split == name
        return Embeddings(ids=np.array([r["file"] for r in rows])[mask], features={"pixels": x[mask]},
                          labels={c: np.array([r[c] for r in rows])[mask] for c in ("age", "gender", "race")})
    return part("train"), part("test")
