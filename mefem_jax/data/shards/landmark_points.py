"""The 68 landmark points as float labels, in the frame of the image the encoder sees, for
`evaluate --targets=landmarks` (face alignment probed from frozen features, as FaRL reports it on 300-W).

Columns `lm00_x, lm00_y, ..., lm67_x, lm67_y` (COLUMNS): the points of dlib's 68-point layout, 0-based
(face_landmarks.py: eyes 36-47, outer eye corners 36 and 45). Both coordinates are in units of the side
of the stored image's centred square, origin at its top-left corner, measured from pixel edges (dlib
gives pixel centres, hence the half pixel): that square is exactly what evaluation crops and resizes to
the model's input (`augment.center_box`), so (0, 0) and (1, 1) are the corners of what the encoder sees
at any input size. On a square image (every aligned crop, every UTKFace photo) x is a fraction of the
width and y of the height; on a wider or taller one a point outside the centred square falls outside
[0, 1], since the encoder does not see it. One unit on both axes keeps distances (the NME) undistorted.

"The stored image" is the aligned crop with --align (the points are then where the fitted landmarks land
in it, `face_align.aligned_points`), else the photo as stored (after any downscale). Points of an
aligned build describe the crops inside its shards, not the photos its labels CSV names: evaluate such a
build from its shard folder. The landmark model is for non-commercial use only (face_landmarks.LICENCE).
"""
from __future__ import annotations

import numpy as np

NUM_POINTS = 68
COLUMNS = tuple(f"lm{k:02d}_{axis}" for k in range(NUM_POINTS) for axis in "xy")
DECIMALS = 5  # 1e-5 of the side: 0.002 px of a 224 px crop, far below the landmark model's noise
# Bump when what the columns hold changes: a build's fingerprint carries it (plan.BuildOptions), so an
# older --landmark_labels folder is rebuilt, not silently mixed with new shards.
VERSION = 1


def centred_square(width: int, height: int) -> tuple[float, float, float]:
    """(left, top, side) of the centred square that evaluation crops (`augment.center_box`'s box)."""
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, side


def point_labels(points: np.ndarray, width: int, height: int) -> dict[str, float]:
    """The COLUMNS labels of one face's [68, 2] landmarks, given in the pixels (dlib's pixel centres) of
    the stored `width` x `height` image."""
    points = np.asarray(points, np.float64)
    if points.shape != (NUM_POINTS, 2):
        raise ValueError(f"expected [{NUM_POINTS}, 2] landmarks, got {list(points.shape)}")
    left, top, side = centred_square(width, height)
    unit = (points + 0.5 - [left, top]) / side
    return {c: round(float(v), DECIMALS) for c, v in zip(COLUMNS, unit.reshape(-1))}
