"""Facial proportions from 68 landmarks: scale-free labels for anthropometric probes.

Every label is a length divided by the inter-ocular distance (IOD, between the two eye centres,
each the mean of its six landmarks), measured in the eye frame of `face_align.to_eye_frame`
(origin at the eye midpoint, x along the eye line, y down the face), so it does not depend on the
photo's size, the face's position or its in-plane tilt. Landmark numbers are dlib's 68-point
layout, 0-based (face_landmarks.py). "width" is a straight distance; "height"/"length" and the
vertical distances are differences of y in the eye frame.

    eye_width       mean over both eyes of |corner 36 - corner 39| and |42 - 45|
    eye_height      mean over both eyes of the lid gaps (37-41, 38-40, 43-47, 44-46), vertical
    brow_eye        eye-centre y minus mean brow y (17-21 with the image-left eye, 22-26 with the other), mean of both
    nose_length     y of the nostril base (33) minus y of the bridge top (27)
    nose_width      |31 - 35|, the outer nostril points
    mouth_width     |48 - 54|, the mouth corners
    lip_height      y of the lower lip's bottom (57) minus y of the upper lip's top (51)
    eye_mouth       y of the mouth centre (mean of 48-59) minus the eye midpoint's y (0)
    face_width      |0 - 16|, the jaw line's upper ends (at about eye level)
    jaw_width       |4 - 12|, the jaw line at about mouth level
    face_height     y of the chin (8) minus mean brow y (17-26)

The landmark model behind these labels is for non-commercial use only (face_landmarks.LICENCE).
"""
from __future__ import annotations

import numpy as np

from mefem_jax.data.shards.face_align import to_eye_frame

NAMES = ("eye_width", "eye_height", "brow_eye", "nose_length", "nose_width", "mouth_width",
         "lip_height", "eye_mouth", "face_width", "jaw_width", "face_height")
DECIMALS = 5  # well below the landmark model's own noise; keeps CSVs and shards byte-stable


def proportions(points: np.ndarray) -> dict[str, float]:
    """The labels of NAMES for one face's [68, 2] landmarks (any pixel frame)."""
    q = to_eye_frame(np.asarray(points, np.float64))
    y = q[:, 1]

    def dist(a: int, b: int) -> float:
        return float(np.hypot(*(q[a] - q[b])))

    brow_a, brow_b = y[17:22].mean(), y[22:27].mean()
    eye_a, eye_b = y[36:42].mean(), y[42:48].mean()
    values = {
        "eye_width": (dist(36, 39) + dist(42, 45)) / 2,
        "eye_height": float(np.mean([y[41] - y[37], y[40] - y[38], y[47] - y[43], y[46] - y[44]])),
        "brow_eye": float(((eye_a - brow_a) + (eye_b - brow_b)) / 2),
        "nose_length": float(y[33] - y[27]),
        "nose_width": dist(31, 35),
        "mouth_width": dist(48, 54),
        "lip_height": float(y[57] - y[51]),
        "eye_mouth": float(y[48:60].mean()),
        "face_width": dist(0, 16),
        "jaw_width": dist(4, 12),
        "face_height": float(y[8] - y[17:27].mean()),
    }
    return {k: round(values[k], DECIMALS) for k in NAMES}
