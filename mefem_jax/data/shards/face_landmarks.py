"""Finding faces and their 68 landmarks in a photo: dlib's HOG frontal-face detector, then dlib's
68-point shape model on each face found.

LICENCE NOTE: the 68-point model (shape_predictor_68_face_landmarks.dat, shipped by the
`face-recognition-models` package) was trained on the iBUG 300-W dataset, whose images are
licensed for non-commercial research only. Landmarks, aligned crops and proportion labels made
with it inherit that restriction; check it before any commercial use.

Both packages are the `landmarks` extra (`pip install -e ".[landmarks]"`); nothing here imports
them until a detector is made, so the rest of the data package works without them.

Points are dlib's 68-point layout in image pixels (x right, y down), 0-based: jaw 0-16, brows
17-21 and 22-26, nose bridge 27-30, nostrils 31-35, eyes 36-41 (the eye on the image's left) and
42-47, outer lips 48-59, inner lips 60-67.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import numpy as np

INSTALL_HINT = 'pip install -e ".[landmarks]"'
MODEL_FILE = "shape_predictor_68_face_landmarks.dat"
LICENCE = ("68-point landmark model (dlib, via face-recognition-models) trained on iBUG 300-W: "
           "non-commercial research use only")
# HOG finds faces down to ~80 px at upsample 0 and ~40 px at 1; past this side a photo is searched
# on a downscaled copy (the landmarks are then fitted at full resolution), which keeps one photo
# near 20-50 ms instead of seconds for a 4000 px camera frame.
DETECT_SIDE = 640
# When HOG (trained on upright faces) finds nothing, the photo is searched again turned by these
# angles: a head tilted by 20-30 degrees is common in clinical photos and missed otherwise.
RETRY_ANGLES = (25.0, -25.0)


class LandmarksUnavailable(RuntimeError):
    """The `landmarks` extra is not installed; the message says how to install it."""


@dataclasses.dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]   # left, top, right, bottom in photo pixels
    score: float                             # HOG detector confidence (higher is surer)
    points: np.ndarray                       # [68, 2] float64, photo pixels

    @property
    def area(self) -> float:
        left, top, right, bottom = self.box
        return (right - left) * (bottom - top)


def model_path() -> str:
    """Where the 68-point model file is, or LandmarksUnavailable. Found without importing
    face_recognition_models, whose __init__ needs pkg_resources (gone from recent setuptools)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise LandmarksUnavailable(f"face alignment and landmark labels need dlib's landmark model: "
                                   f"{INSTALL_HINT} (the model is for non-commercial use only)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", MODEL_FILE)
    if not os.path.isfile(path):
        raise LandmarksUnavailable(f"{path} is missing; reinstall with {INSTALL_HINT}")
    return path


def check_available() -> None:
    """LandmarksUnavailable (one line naming the install command) unless both packages are there."""
    try:
        import dlib  # noqa: F401 - a broken or partial install fails here, not in a worker
    except ImportError as err:
        raise LandmarksUnavailable(f"face alignment and landmark labels need dlib ({err}): "
                                   f"{INSTALL_HINT}") from None
    model_path()


class FaceFinder:
    """Faces and landmarks of RGB photos. Holds dlib objects, which cannot be pickled: make one per
    process (`finder()` keeps one per worker)."""

    def __init__(self, upsample: int = 1, retry_angles: tuple[float, ...] = RETRY_ANGLES):
        check_available()
        import dlib

        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(model_path())
        self._rectangle = dlib.rectangle
        self.upsample = upsample
        self.retry_angles = tuple(retry_angles)

    def find(self, rgb: np.ndarray) -> list[Face]:
        """Every face in an [H, W, 3] uint8 photo, largest first; [] when none."""
        faces = self._find_upright(rgb)
        for angle in self.retry_angles if not faces else ():
            faces = self._find_turned(rgb, angle)
            if faces:
                break
        return sorted(faces, key=lambda f: (-f.area, f.box))

    def _find_upright(self, rgb: np.ndarray) -> list[Face]:
        height, width = rgb.shape[:2]
        scale = min(1.0, DETECT_SIDE / max(height, width))
        small = rgb
        if scale < 1.0:
            from PIL import Image

            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR, reducing_gap=2.0))
        boxes, scores, _ = self._detector.run(np.ascontiguousarray(small), self.upsample, 0.0)
        faces = []
        for box, score in zip(boxes, scores):
            left, top, right, bottom = (v / scale for v in (box.left(), box.top(), box.right(), box.bottom()))
            rect = self._rectangle(round(left), round(top), round(right), round(bottom))
            shape = self._predictor(np.ascontiguousarray(rgb), rect)
            points = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
            faces.append(Face((left, top, right, bottom), float(score), points))
        return faces

    def _find_turned(self, rgb: np.ndarray, angle: float) -> list[Face]:
        """Searches the photo turned by `angle` degrees (counter-clockwise, about its centre, on a
        canvas that holds all of it); points and boxes come back in the unturned photo's pixels."""
        from PIL import Image

        height, width = rgb.shape[:2]
        turned = np.asarray(Image.fromarray(rgb).rotate(angle, Image.BILINEAR, expand=True))
        faces = self._find_upright(turned)
        # PIL turns counter-clockwise on screen (y down); map turned pixels back to the photo.
        th, tw = turned.shape[:2]
        a = math.radians(angle)
        cos, sin = math.cos(a), math.sin(a)

        def back(xy: np.ndarray) -> np.ndarray:
            x, y = xy[..., 0] - tw / 2, xy[..., 1] - th / 2
            return np.stack([cos * x - sin * y + width / 2, sin * x + cos * y + height / 2], -1)

        out = []
        for f in faces:
            corners = back(np.array([[f.box[0], f.box[1]], [f.box[2], f.box[1]],
                                     [f.box[0], f.box[3]], [f.box[2], f.box[3]]]))
            box = (*corners.min(0), *corners.max(0))
            out.append(Face(tuple(float(v) for v in box), f.score, back(f.points)))
        return out


_FINDER: FaceFinder | None = None


def finder() -> FaceFinder:
    """This process's FaceFinder (the model takes ~1 s to load: once per worker, not per photo)."""
    global _FINDER
    if _FINDER is None:
        _FINDER = FaceFinder()
    return _FINDER
