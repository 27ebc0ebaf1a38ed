"""Synthetic faces: the embedded default dataset, for a fresh machine with no data on it.

Each image is a cartoon face (an oval of some skin tone on a plain background, hair cap, two eyes,
nose, mouth) drawn with numpy from (seed, split, index) alone, so the dataset needs no files, is
identical on every host, and any element can be produced in any order (a Grain random-access
source). Every image comes with the geometric and colour attributes it was drawn from:

    face_width    face half-width, as a fraction of half the image side
    face_aspect   face height / face width
    skin_tone     0 (light) … 1 (dark), the skin colour is interpolated between two tones
    eye_distance  distance between the eye centres / face width
    eye_size      eye radius / face half-width
    nose_length   nose length / face height
    mouth_width   mouth width / face width
    hair_height   depth of the hair cap / face height (0 = no hair)

Each is drawn independently and uniformly from its range (`ATTRIBUTES`), and each changes the
pixels directly, so a linear probe on a pretrained encoder can be scored on them: that is how a
pretraining run on this data is checked to have learned something about faces. Nuisances that
are NOT labels (background colour and gradient, face position jitter, hair and iris colour,
lighting direction, pixel noise) vary too, so a probe cannot read an attribute off a constant.

Drawing is vectorised per feature over its bounding box with anti-aliased edges (coverage falls
linearly over one pixel), so features do not snap to the pixel grid as their size varies.
"""
from __future__ import annotations

import functools
import zlib

import numpy as np

# name → (low, high) of the uniform distribution it is drawn from.
ATTRIBUTES: dict[str, tuple[float, float]] = {
    "face_width": (0.40, 0.62),
    "face_aspect": (1.10, 1.45),
    "skin_tone": (0.0, 1.0),
    "eye_distance": (0.30, 0.50),
    "eye_size": (0.07, 0.13),
    "nose_length": (0.15, 0.30),
    "mouth_width": (0.25, 0.60),
    "hair_height": (0.0, 0.30),
}

_LIGHT_SKIN = np.array([240, 205, 178], np.float32)
_DARK_SKIN = np.array([92, 58, 40], np.float32)


def split_id(split: str) -> int:
    """A stable integer per split name, so "train" and "test" draw disjoint faces."""
    return {"train": 0, "test": 1}.get(split, zlib.crc32(split.encode()) | 2)


def face_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), split_id(split), int(index)])


def sample_attributes(rng: np.random.Generator) -> dict[str, float]:
    return {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in ATTRIBUTES.items()}


@functools.lru_cache(maxsize=4)
def _pixel_centres(size: int) -> np.ndarray:
    # Pixel i covers [-1 + i*p, -1 + (i+1)*p] in canvas units, p = 2 / size; y grows downwards.
    return ((np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0)


class _Canvas:
    """A float32 [S, S, 3] image in canvas coordinates [-1, 1]², painted feature by feature."""

    def __init__(self, size: int, background: np.ndarray):
        self.size = size
        self.pixel = 2.0 / size
        self.coords = _pixel_centres(size)
        self.rgb = np.broadcast_to(background, (size, size, 3)).astype(np.float32)

    def _span(self, lo: float, hi: float) -> slice:
        start = int(np.floor((lo + 1.0) / self.pixel)) - 1
        stop = int(np.ceil((hi + 1.0) / self.pixel)) + 1
        return slice(max(start, 0), min(stop, self.size))

    def ellipse(self, cx, cy, rx, ry, color, *, y_max: float | None = None):
        """Paints a filled ellipse; `y_max` cuts it below that line (used for the hair cap)."""
        rows, cols = self._span(cy - ry, cy + ry), self._span(cx - rx, cx + rx)
        if rows.start >= rows.stop or cols.start >= cols.stop:
            return
        y = self.coords[rows][:, None]
        x = self.coords[cols][None, :]
        radius = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
        # (radius - 1) * min(rx, ry) approximates the distance to the rim in canvas units.
        cover = np.clip(0.5 - (radius - 1.0) * (min(rx, ry) / self.pixel), 0.0, 1.0)
        if y_max is not None:
            cover = cover * np.clip(0.5 + (y_max - y) / self.pixel, 0.0, 1.0)
        cover = cover[..., None]
        patch = self.rgb[rows, cols]
        self.rgb[rows, cols] = patch + cover * (np.asarray(color, np.float32) - patch)


def render_face(attrs: dict[str, float], rng: np.random.Generator, size: int) -> np.ndarray:
    """One face with attributes `attrs` as uint8 [S, S, 3]; `rng` supplies only the nuisances."""
    background = rng.uniform(25, 230, size=3).astype(np.float32)
    canvas = _Canvas(size, background)
    # A vertical background gradient, so the background is not one flat colour.
    canvas.rgb *= (1.0 + rng.uniform(-0.15, 0.15) * canvas.coords)[:, None, None]

    cx, cy = rng.uniform(-0.06, 0.06, size=2)
    a = attrs["face_width"]
    b = a * attrs["face_aspect"]
    skin = _LIGHT_SKIN + attrs["skin_tone"] * (_DARK_SKIN - _LIGHT_SKIN)

    canvas.ellipse(cx, cy, a, b, skin)
    if attrs["hair_height"] > 0.0:
        # Hair: a slightly larger oval than the head, kept only above a horizontal cut line.
        hair = rng.uniform(15, 150) * np.array([1.0, 0.75, 0.5], np.float32)
        canvas.ellipse(cx, cy - 0.02, a * 1.08, b * 1.06, hair,
                       y_max=cy - b + 2 * b * attrs["hair_height"])

    # Eyes: a white almond, coloured iris, black pupil.
    eye_y = cy - 0.12 * b
    eye_dx = a * attrs["eye_distance"]
    eye_r = a * attrs["eye_size"]
    iris = rng.uniform(30, 140) * np.array([0.6, 0.8, 1.0], np.float32)[rng.permutation(3)]
    for side in (-1.0, 1.0):
        ex = cx + side * eye_dx
        canvas.ellipse(ex, eye_y, 1.5 * eye_r, eye_r, (245, 245, 240))
        canvas.ellipse(ex, eye_y, 0.75 * eye_r, 0.75 * eye_r, iris)
        canvas.ellipse(ex, eye_y, 0.35 * eye_r, 0.35 * eye_r, (10, 10, 10))

    # Nose: a shaded ridge from the eye line down `nose_length` of the face height, nostrils.
    nose_len = 2 * b * attrs["nose_length"]
    canvas.ellipse(cx, eye_y + nose_len / 2, 0.08 * a, nose_len / 2, skin * 0.78)
    for side in (-1.0, 1.0):
        canvas.ellipse(cx + side * 0.06 * a, eye_y + nose_len, 0.04 * a, 0.025 * b, skin * 0.45)

    # Mouth, a fixed distance under the nose.
    lips = skin * np.array([0.75, 0.35, 0.35], np.float32)
    canvas.ellipse(cx, eye_y + nose_len + 0.14 * b, a * attrs["mouth_width"], 0.05 * b, lips)

    # Light from a random direction across the whole picture, then sensor-like noise.
    gx, gy = rng.uniform(-0.12, 0.12, size=2)
    light = 1.0 + gx * canvas.coords[None, :] + gy * canvas.coords[:, None]
    rgb = canvas.rgb * light[..., None] + rng.normal(0.0, 2.0, size=(size, size, 1))
    return np.clip(rgb, 0, 255).astype(np.uint8)


class SyntheticFaces:
    """A Grain random-access source of `num_records` synthetic faces of one split.

    Elements are raw examples `{"id", "labels", "image": uint8 [S, S, 3]}` like every other
    source's, so the same crop/flip/normalise code runs on them.
    """

    def __init__(self, num_records: int, resolution: int, seed: int = 0, split: str = "train"):
        if num_records <= 0 or resolution < 16:
            raise ValueError(f"synthetic faces need num_records > 0 and resolution >= 16, got "
                             f"{num_records} and {resolution}")
        self.num_records = int(num_records)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.split = split
        self.label_schema = {name: "float" for name in ATTRIBUTES}

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"synthetic face {index} out of range [0, {self.num_records})")
        rng = face_rng(self.seed, self.split, index)
        attrs = sample_attributes(rng)
        image = render_face(attrs, rng, self.resolution)
        return {"id": f"synthetic-{self.split}-{index:08d}", "labels": attrs, "image": image}

    def __repr__(self) -> str:
        return (f"SyntheticFaces(num_records={self.num_records}, resolution={self.resolution}, "
                f"seed={self.seed}, split={self.split!r})")
