"""How usable a face is: its size, its sharpness and, from landmarks, the turn of the head.

The shard builder measures every face it stores and keeps the measures in the record's header
(`quality`, records.py), so a later check reads them instead of decoding the image again; its filters
(`build_shards --min_face_px --min_sharpness --max_yaw --max_pitch`) drop the faces outside the limits and
list them in the manifest. The measures (`measure`), each rounded to DECIMALS:

    face_px     the face's size in pixels of the photo it was found in. With landmarks (--align,
                --landmark_labels): the larger side of their box, measured along and across the eye line
                (jaw side to jaw side, brows to chin), so a tilted head does not read larger; a 200 px
                UTKFace crop's face is ~170 px. Without: the shorter side of the stored image, which is then
                taken to be a face crop.
    sharpness   the variance of the 3x3 Laplacian (4-neighbour: up + down + left + right - 4 x centre) of the
                grey face region: the landmarks' box in the photo they were fitted on (not the aligned crop,
                whose black fill beyond the photo's edge reads as sharp edges), else the whole stored image,
                first resampled so that its longer side is SHARPNESS_SIDE. At one size the measure no longer
                depends on the stored resolution (the same UTKFace faces upscaled 2x read 0.96x as sharp
                instead of 0.13x) and reads the face at about the scale the encoder sees. On 1,977 UTKFace
                faces (landmarks' box, docs/RESULTS.md): median 54, 5th percentile 13, 2.4 % under 10
                (looked at: out of focus or upscaled, and one very dark face). On the whole crops: median
                80, 5th percentile 15; blurred by a Gaussian of sigma 1 px, median 47; of 2 px, 17.
                Limits: it grows with contrast (a dark or washed-out face reads blurred) and with texture
                (wrinkles, hair, a patterned background inside the box), and JPEG blocking at low quality
                reads as detail.
    yaw, pitch  the head's turn and nod in degrees, only with landmarks (`head_pose`). Yaw is positive
                when the face turns towards the image's right (the subject's left), pitch when the chin
                goes up.

The head pose is an estimate from three 2D points, not a measurement. In the eye frame of
`face_align.to_eye_frame` (origin at the eye midpoint, x along the eye line, in inter-ocular distances)
the face is taken as rigid, seen in orthographic projection, with the nose tip (point 30) NOSE_DEPTH in
front of the eye centres and the mouth (mean of the outer lip, 48-59) MOUTH_DEPTH in front of them.
Turning the head by `yaw` moves the nose tip sideways by NOSE_DEPTH sin(yaw) while the eye distance shrinks
by cos(yaw), so its x in the eye frame is NOSE_DEPTH tan(yaw). Nodding by `pitch` moves the nose tip and
the mouth up in proportion to their depth; the height of the nose tip over that of the mouth (FRONTAL_NOSE
when level) gives tan(pitch) (`head_pose`), free of the face's scale and of yaw. Both are exact for that
model, 0 for a level frontal face whose nose tip is midway between the eyes (yaw) and at the usual height
(pitch), and change sign with the turn. NOSE_DEPTH, FRONTAL_NOSE and EYE_MOUTH were fitted on 592 UTKFace
faces with this package's landmarks (HOG detector, 68 points): FRONTAL_NOSE is a median; NOSE_DEPTH and
EYE_MOUTH are from how the eye-to-mouth height, in eye distances, grows as the nose tip moves sideways
(as 1 / cos(yaw): a least-squares fit of height^2 = EYE_MOUTH^2 (1 + x^2 / NOSE_DEPTH^2)). MOUTH_DEPTH
is a rough adult average (the lips about 2 cm behind the nose tip); 0.05 either way moves pitch by ~7 %.
Limits: a person's own nose length and depth read as pitch and yaw (UTKFace's 5th-95th percentiles are -23
to +25 degrees of yaw and -19 to +20 of pitch, part of it people rather than poses; a baby's short nose
reads as the chin up: 8 of the 13 faces over +30 degrees in a 2,000-face sample are 3 or younger, against
7 % of the sample); a turn and a nod at once tilt the eye line and read a degree or two off; the landmark
model, trained on mostly frontal faces, pulls the points of a turned face towards frontal, so large angles
read smaller; the angles are not calibrated against a measured pose. Read them as a ranking good for
thresholds of 20 degrees and more, not as exact angles.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from mefem_jax.data.shards.face_align import eye_frame, to_eye_frame

VERSION = 1             # stored in the build's options: other measures may keep other faces
DECIMALS = 2
SHARPNESS_SIDE = 128    # px: the face region's longer side when its sharpness is measured
NOSE_TIP, MOUTH = 30, slice(48, 60)
NOSE_DEPTH = 0.53       # nose tip in front of the eye centres, in inter-ocular distances (fitted)
MOUTH_DEPTH = 0.20      # the mouth in front of the eye centres (an adult average)
FRONTAL_NOSE = 0.51     # the nose tip's height over the mouth's, below the eye line, when level (fitted)
EYE_MOUTH = 1.05        # the mouth below the eye line, in inter-ocular distances, when level (fitted)
# The filters, in the order a face is checked: (flag, measure, "min" or "max" of its absolute value).
LIMITS = (("min_face_px", "face_px", "min"), ("min_sharpness", "sharpness", "min"),
          ("max_yaw", "yaw", "max"), ("max_pitch", "pitch", "max"))
ANGLE_LIMITS = ("max_yaw", "max_pitch")  # measured from landmarks only


def face_px(points: np.ndarray) -> float:
    """The larger side of the landmarks' box along and across the eye line, in the points' pixels."""
    q = to_eye_frame(points)  # in inter-ocular distances
    return float((q.max(0) - q.min(0)).max() * eye_frame(points)[2])


def laplacian_variance(gray: np.ndarray) -> float:
    """The variance of the 4-neighbour 3x3 Laplacian over the pixels whose neighbours are all inside."""
    g = np.asarray(gray, np.float64)
    if min(g.shape) < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def face_region(gray: np.ndarray, points: np.ndarray | None = None, side: int = SHARPNESS_SIDE) -> np.ndarray:
    """The grey face (the landmarks' box, within the image; else all of it) resampled so that its longer
    side is `side` px. PIL resamples: bilinear, area-weighted when shrinking."""
    height, width = gray.shape
    box = (0.0, 0.0, float(width), float(height))
    if points is not None:
        (left, top), (right, bottom) = points.min(0), points.max(0)
        box = (max(0.0, left), max(0.0, top), min(float(width), right + 1), min(float(height), bottom + 1))
    w, h = box[2] - box[0], box[3] - box[1]
    if min(w, h) < 3:
        return np.zeros((0, 0), np.uint8)
    scale = side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(gray).resize(size, Image.BILINEAR, box=box, reducing_gap=2.0))


def sharpness(gray: np.ndarray, points: np.ndarray | None = None) -> float:
    """The variance of the Laplacian of `face_region(gray, points)`: higher is sharper."""
    return laplacian_variance(face_region(gray, points))


def head_pose(points: np.ndarray) -> tuple[float, float]:
    """(yaw, pitch) in degrees of one face's 68 landmarks (any pixel frame); see the module's text."""
    q = to_eye_frame(np.asarray(points, np.float64))
    nose_x, nose_y = q[NOSE_TIP]
    mouth_y = q[MOUTH, 1].mean()
    yaw = math.atan2(nose_x, NOSE_DEPTH)
    # tan(pitch) = EYE_MOUTH (FRONTAL_NOSE - t) / (NOSE_DEPTH - t MOUTH_DEPTH) with t = nose_y / mouth_y,
    # times mouth_y over mouth_y: no division, and finite for any points.
    pitch = math.atan2(EYE_MOUTH * (FRONTAL_NOSE * mouth_y - nose_y), NOSE_DEPTH * mouth_y - MOUTH_DEPTH * nose_y)
    return math.degrees(yaw), math.degrees(pitch)


def measure(gray: np.ndarray, points: np.ndarray | None = None) -> dict[str, float]:
    """The measures of one face. `gray`: [H, W] uint8, the photo the 68 landmarks `points` were fitted on,
    or without landmarks (None) the image stored, taken to be a face crop."""
    if points is None:
        values = {"face_px": min(gray.shape), "sharpness": sharpness(gray)}
    else:
        yaw, pitch = head_pose(points)
        values = {"face_px": face_px(points), "sharpness": sharpness(gray, points), "yaw": yaw, "pitch": pitch}
    # A degenerate landmark fit (kept with --poor_fit=keep) may give no number; a record stores none.
    return {k: round(float(v), DECIMALS) for k, v in values.items() if math.isfinite(v)}


def failure(measures: dict[str, float], limits: dict[str, float]) -> tuple[str, float, float] | None:
    """(measure, its value, the limit) of the first limit in LIMITS order the face fails, or None.
    `limits`: {flag: threshold} of the filters that are on."""
    for flag, name, kind in LIMITS:
        if flag not in limits or name not in measures:
            continue
        value = measures[name]
        if (value < limits[flag]) if kind == "min" else (abs(value) > limits[flag]):
            return name, value, limits[flag]
    return None
