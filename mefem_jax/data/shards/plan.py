"""What a shard build writes: its options, and the plan (which files, with which labels).

Planning reads the labels CSV (through `csv_text`, the reader and filter grammar `evaluate` uses
too) and stats files; it opens no image. Rows that cannot be used are skipped with the reason.
"""
from __future__ import annotations

import dataclasses
import errno
import os

from mefem_jax.data import csv_text
from mefem_jax.data import face_hash
from mefem_jax.data import records
from mefem_jax.data.shards import face_proportions, landmark_points
from mefem_jax.data.shards import quality

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    images: str
    out: str
    labels: str | None = None
    name: str = "faces"
    num_shards: int = 16
    image_size: int = 0            # downscale so the shorter side is at most this (0: keep)
    max_side: int = 1024           # downscale so the longer side is at most this
    min_side: int = 16             # skip images whose shorter side is below this
    jpeg_quality: int = 95
    workers: int = 1
    file_column: str = "file"
    filters: tuple[tuple[str, str], ...] = ()      # keep rows where column == value (csv_text grammar)
    label_columns: tuple[str, ...] | None = None   # None: every column but file and filters
    label_types: tuple[tuple[str, str], ...] = ()  # override inferred types: (column, type)
    overwrite: bool = False
    align: bool = False            # detect, level the eyes, crop to face_align.Framing
    align_size: int = 224          # side of the aligned crop
    faces: str = "largest"         # several faces in a photo: face_align.FACE_POLICIES
    poor_fit: str = "skip"         # implausible landmarks: face_align.FIT_POLICIES
    landmark_labels: bool = False  # add face_proportions.NAMES and landmark_points.COLUMNS as float labels
    dedup: str = "exact"           # duplicates within the build: face_hash.DEDUP_MODES
    dedup_distance: int = face_hash.NEAR_DISTANCE  # the Hamming distance of dedup="near"
    min_face_px: float = 0.0       # quality filters (quality.py), each 0 for off: the face's size,
    min_sharpness: float = 0.0     # the variance of its Laplacian,
    max_yaw: float = 0.0           # and, with landmarks, the head's turn and nod in degrees
    max_pitch: float = 0.0

    @property
    def uses_faces(self) -> bool:
        return self.align or self.landmark_labels

    def quality_limits(self) -> dict[str, float]:
        """{flag: threshold} of the quality filters that are on (quality.LIMITS' flags)."""
        return {flag: getattr(self, flag) for flag, _, _ in quality.LIMITS if getattr(self, flag) > 0}

    def content_options(self) -> dict:
        """The options that change what is written (not where, nor how fast). The face and dedup options
        only when used, so builds without them keep the fingerprints they always had: --dedup=off writes
        the images of such a build (its records add their hashes and quality measures, which training
        never reads); the quality limits likewise."""
        keys = ["name", "image_size", "max_side", "min_side", "jpeg_quality", "file_column",
                "filters", "label_columns", "label_types"]
        if self.uses_faces:
            keys += ["align", "align_size", "faces", "poor_fit", "landmark_labels"]
        options = {k: getattr(self, k) for k in keys}
        if self.landmark_labels:  # the 68 points joined the labels (landmark_points.py)
            options["landmark_points"] = landmark_points.VERSION
        if self.dedup != "off":  # another hash (face_hash.HASH_VERSION) may find other duplicates
            options.update(dedup=self.dedup, hash_version=face_hash.HASH_VERSION)
            if self.dedup == "near":
                options["dedup_distance"] = self.dedup_distance
        if self.quality_limits():  # another quality.VERSION may keep other faces
            options.update(quality=self.quality_limits(), quality_version=quality.VERSION)
        return options

    def clauses(self) -> tuple[csv_text.Clause, ...]:
        return tuple(csv_text.clause(c, v) for c, v in self.filters)


@dataclasses.dataclass(frozen=True)
class Row:
    file: str                 # as written in the CSV (or relative to the images folder)
    path: str
    labels: tuple[tuple[str, object], ...]
    stat: tuple[int, int]     # (size, mtime_ns): part of the fingerprint


def list_images(folder: str) -> list[str]:
    """Image files under `folder`, recursively, as sorted paths relative to it."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, f), folder))
    return sorted(found)


def _row_stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns)


def plan_rows(opts: BuildOptions) -> tuple[list[Row], list[dict], dict[str, str], int]:
    """(rows to write, skipped [{file, reason}], label schema, images the CSV does not list)."""
    if not os.path.isdir(opts.images):
        raise FileNotFoundError(f"images folder {opts.images} does not exist")
    on_disk = list_images(opts.images)
    if not on_disk:
        raise ValueError(f"images folder {opts.images} holds no image files "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    if opts.labels is None:
        rows, skipped, schema, unlisted = (*_plan_unlabelled(opts, on_disk), {}, 0)
    else:
        rows, skipped, schema, unlisted = _plan_from_csv(opts, set(on_disk))
    if opts.landmark_labels:
        added = face_proportions.NAMES + landmark_points.COLUMNS
        clash = sorted(set(schema) & set(added))
        if clash:
            raise ValueError(f"label columns {clash} of {opts.labels} have the names of landmark "
                             "labels; drop them with --label_columns")
        schema = {**schema, **{n: "float" for n in added}}
    return rows, skipped, schema, unlisted


def _plan_unlabelled(opts: BuildOptions, on_disk: list[str]) -> tuple[list[Row], list[dict]]:
    """Every image file as a row; a name that cannot be stat'ed is skipped, not the whole build."""
    rows, skipped = [], []
    for f in on_disk:
        path = os.path.join(opts.images, f)
        try:
            rows.append(Row(f, path, (), _row_stat(path)))
        except OSError as err:  # dangling or looping symlink, vanished or unreachable file
            skipped.append({"file": f, "reason": _stat_problem(path, err)})
    return rows, skipped


def _stat_problem(path: str, err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "symbolic link loop"
    if os.path.islink(path) and not os.path.exists(path):
        return f"dangling symbolic link (to {os.readlink(path)})"
    return f"cannot read: {err.strerror or err}"


def _plan_from_csv(opts: BuildOptions, on_disk: set[str]):
    if not os.path.isfile(opts.labels):
        raise FileNotFoundError(f"labels file {opts.labels} does not exist")
    clauses = opts.clauses()
    table = csv_text.read_table(opts.labels, clauses)
    columns = table.header
    if opts.file_column not in columns:
        raise ValueError(f"{opts.labels} has no {opts.file_column!r} column (columns: {columns})")
    filtered = {c.column for c in clauses}
    if opts.label_columns is None:
        label_columns = [c for c in columns if c != opts.file_column and c not in filtered]
    else:
        label_columns = list(opts.label_columns)
        unknown = [c for c in label_columns if c not in columns]
        if unknown:
            raise ValueError(f"label columns {unknown} are not in {opts.labels} ({columns})")

    keep = table.rows
    overrides = dict(opts.label_types)
    schema = {c: overrides.get(c) or records.infer_label_type([r.get(c) or "" for _, r in keep])
              for c in label_columns}

    where = os.path.basename(opts.labels)
    rows, skipped, seen = [], [], {}
    for line, r in keep:
        name = (r.get(opts.file_column) or "").strip()
        at = f"{where} line {line}"
        problem, row = _check_row(opts, r, name, at, schema, label_columns, seen)
        if problem:
            skipped.append({"file": name or at, "reason": problem})
        else:
            rows.append(row)
        seen.setdefault(name, line)
    unlisted = len(on_disk - set(seen))
    return rows, skipped, schema, unlisted


def _check_row(opts: BuildOptions, r: dict, name: str, at: str, schema: dict[str, str],
               label_columns: list[str], seen: dict[str, int]) -> tuple[str | None, Row | None]:
    """(None, Row) for a usable CSV row, else (reason, None); `at` is "labels.csv line N"."""
    if None in r or any(v is None for v in r.values()):
        return f"{at}: wrong number of fields", None
    if not name:
        return f"{at}: empty {opts.file_column!r}", None
    if name in seen:
        return f"{at}: duplicate of line {seen[name]}", None
    root = os.path.abspath(opts.images)
    path = os.path.normpath(os.path.join(root, name))
    if not path.startswith(root + os.sep):
        return f"{at}: path leaves the images folder", None
    if not os.path.isfile(path):
        return f"listed in {at} but not found in {opts.images}", None
    labels, bad = [], []
    for c in label_columns:
        try:
            labels.append((c, records.cast_label(r[c], schema[c])))
        except ValueError as err:
            bad.append(f"label {c!r} ({schema[c]}): {err}")
    if bad:
        return f"{at}: " + "; ".join(bad), None
    return None, Row(name, path, tuple(labels), _row_stat(path))
