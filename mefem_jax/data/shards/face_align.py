"""Aligning a face: turn the photo so the eyes are level, then crop and resize to a fixed framing.

The framing (`Framing`) is that of the UTKFace crops MeFEm's weights were trained on, measured with
this module's own landmarks on 196 of them (200 px crops): the eye centres' midpoint sits
horizontally centred at 0.30 of the height from the top, and the inter-ocular distance (between the
two eye centres, each the mean of its six landmarks) is 0.39 of the side. A 224 px crop therefore
has its eyes at y = 67 px, 87 px apart. Areas of the crop beyond the photo's edge are black.

Which face, and when to trust it (the policies `build_shards --align` documents):

* several faces: `largest` (default) keeps the largest detection; `skip` drops the photo, for
  folders where a second face means the photo is not a patient portrait.
* a poor landmark fit (`fit_problem`): landmarks that do not make a face (an eye line tilted more
  than 45 degrees, a nose or mouth that is not below the eyes, an eye distance under 0.2 or over
  0.8 of the detection box's width, points far outside the box) are skipped by default
  (`--poor_fit=skip`) or kept (`keep`).
* a face too small for the framing (more than 4x upscaling) is skipped: its crop would be blur.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

RIGHT_EYE = slice(36, 42)   # the subject's right eye: on the image's left
LEFT_EYE = slice(42, 48)
MAX_UPSCALE = 4.0
FACE_POLICIES = ("largest", "skip")
FIT_POLICIES = ("skip", "keep")


@dataclasses.dataclass(frozen=True)
class Framing:
    size: int = 224             # output side in pixels
    eye_y: float = 0.30         # height of the eye midpoint, as a fraction of the side
    eye_distance: float = 0.39  # inter-ocular distance, as a fraction of the side

    @property
    def eye_distance_px(self) -> float:
        return self.eye_distance * self.size

    def describe(self) -> dict:
        return {"size": self.size, "eye_y": self.eye_y, "eye_distance": self.eye_distance,
                "eye_midpoint_px": [self.size / 2, self.eye_y * self.size],
                "eye_distance_px": self.eye_distance_px}


def eye_centres(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image-left eye, image-right eye) centres of 68 points."""
    return points[RIGHT_EYE].mean(0), points[LEFT_EYE].mean(0)


def eye_frame(points: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(eye midpoint, eye line angle in radians (0 = level, positive = clockwise on screen),
    inter-ocular distance in pixels)."""
    left, right = eye_centres(points)
    d = right - left
    return (left + right) / 2, math.atan2(d[1], d[0]), float(np.hypot(*d))


def to_eye_frame(points: np.ndarray) -> np.ndarray:
    """Points in units of the inter-ocular distance, origin at the eye midpoint, x along the eye
    line (towards the image-right eye), y perpendicular to it, down the face: free of the photo's
    scale, position and in-plane tilt."""
    mid, angle, iod = eye_frame(points)
    c, s = math.cos(angle), math.sin(angle)
    d = points - mid
    return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], -1) / iod


def fit_problem(face, max_tilt_deg: float = 45.0) -> str | None:
    """Why a face's landmarks do not look like a face (the reason for the manifest), or None."""
    _, angle, iod = eye_frame(face.points)
    left, top, right, bottom = face.box
    width = max(right - left, 1e-6)
    if abs(math.degrees(angle)) > max_tilt_deg:
        return f"poor landmark fit: eye line tilted {math.degrees(angle):.0f} degrees"
    if not 0.2 <= iod / width <= 0.8:
        return f"poor landmark fit: eye distance {iod / width:.2f} of the face box width"
    q = to_eye_frame(face.points)
    nose_tip, mouth = q[33, 1], q[48:60, 1].mean()
    if not 0.2 <= nose_tip < mouth <= 2.5:
        return "poor landmark fit: nose and mouth not below the eyes"
    margin = 0.5 * width
    if (face.points[:, 0].min() < left - margin or face.points[:, 0].max() > right + margin
            or face.points[:, 1].min() < top - margin or face.points[:, 1].max() > bottom + margin):
        return "poor landmark fit: landmarks far outside the face box"
    return None


def choose_face(faces: list, policy: str = "largest") -> tuple[object | None, str | None]:
    """(face, None) or (None, reason to skip). `faces` largest first, as FaceFinder returns them."""
    if not faces:
        return None, "no face found"
    if len(faces) > 1 and policy == "skip":
        return None, f"{len(faces)} faces found (--faces=skip)"
    return faces[0], None


def _transform(points: np.ndarray, framing: Framing) -> tuple[float, float, tuple[float, ...]]:
    """(scale, angle, PIL affine coefficients mapping output pixels to photo pixels)."""
    mid, angle, iod = eye_frame(points)
    scale = framing.eye_distance_px / iod
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    cx, cy = framing.size / 2, framing.eye_y * framing.size
    # photo = mid + R(angle) (out - centre) / scale in pixel-centre coordinates (dlib's); PIL maps
    # pixel edges (a pixel's centre is at +0.5), hence the half pixels.
    ox, oy = cx + 0.5, cy + 0.5
    return scale, angle, (c, -s, mid[0] + 0.5 - c * ox + s * oy,
                          s, c, mid[1] + 0.5 - s * ox - c * oy)


def align(photo: Image.Image, points: np.ndarray, framing: Framing = Framing()) -> Image.Image:
    """The aligned RGB crop of the face whose 68 `points` (photo pixels) are given; ValueError when
    the face is too small for the framing."""
    scale, _, coeffs = _transform(points, framing)
    if scale > MAX_UPSCALE:
        iod = framing.eye_distance_px / scale
        raise ValueError(f"face too small: eyes {iod:.0f} px apart, the {framing.size} px framing "
                         f"needs at least {framing.eye_distance_px / MAX_UPSCALE:.0f}")
    photo = photo.convert("RGB")
    # Shrinking by more than 2x in one bicubic pass aliases; box-reduce first, then transform.
    factor = max(1, int(0.5 / scale))
    if factor > 1:
        photo = photo.reduce(factor)
        points = (points + 0.5) / factor - 0.5
        scale, _, coeffs = _transform(points, framing)
    return photo.transform((framing.size, framing.size), Image.AFFINE, coeffs,
                           resample=Image.BICUBIC, fillcolor=(0, 0, 0))


def aligned_points(points: np.ndarray, framing: Framing = Framing()) -> np.ndarray:
    """Where `points` land in the aligned crop (the inverse of `align`'s pixel mapping)."""
    q = to_eye_frame(points)
    return q * framing.eye_distance_px + np.array([framing.size / 2, framing.eye_y * framing.size])
