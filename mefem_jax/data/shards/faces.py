"""The shard builder's face step: find the face in a photo, align it (--align) and measure its
proportions and keep its 68 points in the stored image's frame (--landmark_labels: face_proportions.py,
landmark_points.py), following the policies of `face_align`.

The landmarks come from dlib's 68-point model, trained on iBUG 300-W: non-commercial research use
only (face_landmarks.LICENCE); the manifest of every build that used it says so.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from mefem_jax.data.shards import face_align, face_landmarks, face_proportions, landmark_points
from mefem_jax.data.shards.plan import BuildOptions


class NoUsableFace(Exception):
    """No face to keep in this photo; the message is the reason for the manifest."""


@dataclasses.dataclass(frozen=True)
class FoundFace:
    aligned: Image.Image | None   # the aligned crop (--align), else None: the photo is stored
    labels: dict                  # proportions and points (--landmark_labels), else {}
    faces_found: int              # faces detected in the photo
    points: np.ndarray            # [68, 2] landmarks in the photo's pixels


def _refit(finder: face_landmarks.FaceFinder, aligned: Image.Image, face, framing) -> np.ndarray:
    """The landmarks fitted again on the levelled crop, in photo pixels. The model fits upright
    faces best: on a photo tilted by 20-35 degrees the first fit can leave the eyes several degrees
    off level, and a second fit on the levelled face removes most of that. The first fit's points
    are kept when the crop shows no face."""
    found = finder.find(np.asarray(aligned))
    if not found:
        return face.points
    centre = np.array([framing.size / 2, framing.eye_y * framing.size])
    best = min(found, key=lambda f: np.abs(f.points - face_align.aligned_points(face.points, framing)).mean())
    # aligned = centre + R(-angle) (photo - mid) * scale  =>  photo = mid + R(angle) (aligned - centre) / scale
    mid, angle, iod = face_align.eye_frame(face.points)
    scale = framing.eye_distance_px / iod
    c, s = np.cos(angle), np.sin(angle)
    d = (best.points - centre) / scale
    return np.stack([c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]], -1) + mid


def face_step(photo: Image.Image, opts: BuildOptions) -> FoundFace:
    """The face to store from `photo`, or NoUsableFace when the photo is to be skipped."""
    finder = face_landmarks.finder()
    faces = finder.find(np.asarray(photo))
    face, reason = face_align.choose_face(faces, opts.faces)
    if face is None:
        raise NoUsableFace(reason)
    problem = face_align.fit_problem(face)
    if problem and opts.poor_fit == "skip":
        raise NoUsableFace(problem + " (--poor_fit=skip)")
    points, aligned = face.points, None
    framing = face_align.Framing(size=opts.align_size)
    if opts.align:
        try:
            aligned = face_align.align(photo, points, framing)
            points = _refit(finder, aligned, face, framing)
            aligned = face_align.align(photo, points, framing)
        except ValueError as err:  # too small for the framing
            raise NoUsableFace(str(err)) from None
    labels = {}
    if opts.landmark_labels:
        # The points go in the frame of the image stored (and so seen by the encoder): the crop when aligned.
        stored, image = (points, photo) if aligned is None else (face_align.aligned_points(points, framing),
                                                                 aligned)
        labels = {**face_proportions.proportions(points), **landmark_points.point_labels(stored, *image.size)}
    return FoundFace(aligned, labels, len(faces), points)
