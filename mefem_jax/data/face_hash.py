"""Fingerprints of a face image, and the pairs of images that are the same photo.

Used by the shard builder (`build_shards --dedup`: duplicates within a build) and by the leakage check
(`python -m mefem_jax.data.leakage`, `evaluate --exclude_leaked`: evaluation images that are also in the
pretraining data). Two fingerprints per image, both of the image as stored: a shard record's bytes, or an
image file turned upright by its EXIF orientation, as the builder stores it.

* exact: SHA-256 of the decoded RGB pixels and the size. Of the pixels rather than the file bytes: the
  builder decodes every image anyway (to validate it), the same photo saved again with other metadata
  (EXIF, a comment, as PNG) has other bytes but the same pixels, and a record's hash can be recomputed
  from the record alone, whatever the file it came from looked like.
* near: a 64-bit DCT perceptual hash (pHash) of the face. Grayscale; the face square (below) area-averaged
  to 32x32; 2D DCT-II; the top-left 8x8 block of the lowest frequencies without its DC term (the mean
  brightness): 63 AC coefficients, each one bit, 1 when above its threshold. The 64th bit (DC) is 0.

Two choices differ from the textbook pHash, because on aligned faces it fails (benchmarks/face_hash.py,
numbers in benchmarks/RESULTS.md). (1) The threshold of each coefficient is its median over faces
(`_MEDIANS`), not the median of the image's own 63: every aligned face has the same layout, so with the
image's median the large low-frequency terms are always 1 and the small ones always 0, and distinct faces
agree on most bits (median distance 24 of 63, and ~1 in 10,000 pairs of different people within 8 bits).
With per-coefficient medians each bit splits faces in half (median distance 29). (2) The face square is
found by registration, not taken at the image centre: a copy shifted by 4 px moves ~10 bits of a centred
hash, as many as separate two people. The centre square at 64 px, high-passed, is matched against the
mean face (`_MEAN_FACE`) over shifts of up to 4 px there (12 px of a 200 px face), to sub-pixel precision;
the square hashed is 0.9 of the side around the best match. Both tables were fitted on 2,000 UTKFace train
faces by `python benchmarks/face_hash.py --fit` (aligned faces in the UTKFace framing, which `--align`
produces too); `HASH_VERSION` is stored with every hash, and hashes of another version are recomputed.
`NEAR_DISTANCE` is the Hamming distance up to which two faces count as one photo, chosen from the same
measurements.

Mirrors are matched: training flips faces at random, so a mirrored copy of a test face is a face the
encoder has seen. Mirroring negates the DCT coefficients of odd horizontal frequency, so each image also
has the hash of its mirror image, from the same block: both tables are fitted on faces and their mirror
images, so the match and the thresholds are the same for a face and its mirror. The distance of a pair is
the smaller of direct and mirrored.

Matching is brute force over all pairs (XOR and popcount in numpy, in chunks): a few seconds for 23k x 23k
on one core; a build of millions would want an index (not built here).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np
from PIL import ExifTags, Image, ImageFilter, ImageOps

from mefem_jax.data import decode
from mefem_jax.data import manifest as manifest_lib
from mefem_jax.data import records

# Chosen from benchmarks/face_hash.py on UTKFace (benchmarks/RESULTS.md): 98.8 % of 500 re-encoded copies
# (0.8-1.25x, JPEG 60-95, shifted up to 4 px) and 98 % of 500 mirrored ones are within 6 bits of their
# original (median 1; the rest are registration misses, 9 to 28 bits away), and 7 of the 1,999,000 pairs
# of 2,000 random faces, true duplicates among them. At 7 and 8 bits distinct people begin to match.
NEAR_DISTANCE = 6
DEDUP_MODES = ("exact", "near", "off")
HASH_VERSION = 1
HASH_SIDE, BLOCK = 32, 8
REGISTER_SIDE, REGISTER_MARGIN, REGISTER_SEARCH, HIGH_PASS = 64, 8, 4, 2.0  # px at REGISTER_SIDE
FACE_CROP = 0.9  # the hashed square's side, of the image's shorter side
# What a file or record can fail with when decoded; the caller skips the image and says why.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

# Fitted by `python benchmarks/face_hash.py --fit` (module docstring): the mean UTKFace face, 32x32 uint8
# grayscale, base64; and each DCT coefficient's median over faces, 8x8 row-major (the DC term unused).
_MEAN_FACE = (
    "WlZWWmJrdX2Ei5GWmpyen5+dnJqWkYqEfXRrYlpWVlpZVldcZG95gIeOlJmcn6ChoaCfnJmUjYeAeG5kXFZWWVlWWF5oc3yEi5KY"
    "naCio6Sko6KgnZiRi4R7cmheWFdZWlhaYWt1foWMk5qeoqSmpqampKKemZOMhX10a2FaWFpbWl1kbHV8gYaMkpedoqWmpqWinZeR"
    "jIaBe3VsZF1aW1xcYGZtcnV2dnZ5gIuWn6KinpaLgHl2dnZ1cm1mX1xcX19jaW5wc3NxbGdpdIWUnJyThHRpZ2xxc3JwbmljX19h"
    "YmZrb3FxcG5qZmZseYyZmYp4bGZma25wcXFva2ZhYWNlam5xb2VaUk1RW2ZyiJubhnFmW1BNUlpmb3FuaWVjZmluc3ZuXVRSR1Rh"
    "ZnWJoKCHdGZhUkdSVF5wdnNtaGZpbHJ5f311cW9rcnd8hJGlpY+DfHdxa29xdn5/eXJsaWxudX6Gi4yKh4WGiY6PmKiol4+OiYWF"
    "h4qMi4Z+dG5sbXB2gIqSmJmXlpibmpadqamclpqbl5aXmZeSioB2cG1vcXd/ipWdoqOkpaOdmaGqqqCZnaOlpKOinJSKf3Zxb3By"
    "d3+JlJ6kqKqpo5mYo6ysoZiZo6mqqKSdk4l/dnFwcXF2fYeSnaSoqaOZlJiiqqqhmJSZpKmopJySh311cXFxcXV8hI+Zn6OgmI+P"
    "kJWenpSQj4+YoaOfmI6EfHRxcXFxc3mAiZGXmJWRjoN4fIWFe3mDjpGVmJeRiIB5c3FxcXFzd3yDio2OjZGSin15eXl5foqSkI2O"
    "jYmCfHdycXFwcXJ1en6EhoaJjpCOiYWCgoWJjpCNiYaGg356dXJxcHBwcXR4fYGDgoKFiYuMjY2NjYyLiYWCgoOBfHh0cXBwb29w"
    "c3d8gYOAeHBwc3N0eHh0c3NwcXmAg4B7d3Nwb29ubm9xdXp/hIN8cWptdHp6enp0bWpxfYOEf3l1cW9ubm5ubnBydnuBhIOBfHuC"
    "jI+Pi4F7fIGDhIF7dnJwbm5ubm1tbW5yd3yBhYeGgoKEhYWEgoKGh4SBfHZybm1tbW5tbGxra21xdnuCh4mHhIKBgYKFh4mHgXt2"
    "cW1ra2xsbW1sa2ppaW1wdn2EioyMi4mJi4yMioR8dnBsaWlqa2xtbWxraWhnaWxwd4CIjZCSkpKSkI2If3dwbGloaGlrbG1tbGtp"
    "aGdnaGtxeYKJjpGSkpGOiYJ4cGtoZ2doaWtsbW1sbGpoZmZmZ2pwd36Dh4iIh4N+d29qZ2ZmZ2hqbGxtbm1sa2lnZ2dmZ2ltcnZ4"
    "eXl4dXJtaGdmZ2dnaWtsbW5tbWxramloaGdmZmdoamxsbGxqaGdmZ2doaGlqa2xtbQ==")
_MEDIANS = np.array([
    4094.094, 2.020, -338.798, -0.136, -22.630, 1.063, -119.277, -1.498, 85.339, 1.339, -77.290, 0.500, 31.794,
    0.680, -80.440, -0.177, -195.776, -0.015, -145.677, -1.378, 107.036, 0.200, 52.262, 0.873, 53.322, 0.199,
    -16.681, 0.787, -128.571, -0.870, 22.502, -0.033, 232.182, 0.891, -97.406, 0.670, -119.421, -1.303, 40.372,
    0.231, 194.138, 0.498, -70.700, 0.404, -91.036, -0.838, 18.537, -0.066, -37.732, -0.046, 11.675, -0.270,
    35.788, 0.348, 1.976, 0.545, -59.980, -0.119, -4.527, -0.322, 24.713, -0.291, 40.406, 0.642
]).reshape(BLOCK, BLOCK)


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first k rows of the orthonormal n-point DCT-II matrix: block = D @ image @ D.T."""
    m = np.cos(np.pi * (2 * np.arange(n)[None] + 1) * np.arange(k)[:, None] / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT = _dct_rows(HASH_SIDE, BLOCK)
_MIRROR = (-1.0) ** np.arange(BLOCK)  # columns are horizontal frequencies: odd ones change sign


def _high_pass(image: Image.Image) -> np.ndarray:
    """The image less its blur: the features (eyes, mouth, outline) without the lighting, whose low
    frequencies would pull the match toward wherever the face is brightest. float64 [H, W] of integers
    (-255..255: both are 8-bit), cast and subtracted in one pass."""
    blurred = image.filter(ImageFilter.GaussianBlur(HIGH_PASS))
    return np.subtract(np.asarray(image), np.asarray(blurred), dtype=np.float64)


def _window_sums(n: int, k: int) -> np.ndarray:
    """[n, n + k - 1] float64, row i 1 over columns i..i+k-1: `sums @ x @ sums.T` sums each of the n x n
    windows (k x k) of x. For an integer x (every partial sum below 2^53) the sums are exact, so they are the
    same numbers whatever the order BLAS adds in: the same as summing each window on its own."""
    offset = np.arange(n + k - 1)[None] - np.arange(n)[:, None]
    return ((offset >= 0) & (offset < k)).astype(np.float64)


def registration_template(mean_face: np.ndarray) -> np.ndarray:
    """The standardised inner window of the high-passed mean face (uint8 [32, 32]) at REGISTER_SIDE."""
    face = Image.fromarray(np.asarray(mean_face, np.uint8)).resize((REGISTER_SIDE,) * 2, Image.BICUBIC)
    m = REGISTER_MARGIN
    inner = _high_pass(face)[m:-m, m:-m]
    return (inner - inner.mean()) / inner.std()


def _peak(scores: list[float], i: int) -> float:
    """The sub-sample position of the maximum at `i`: the vertex of the parabola through it and its neighbours."""
    if 0 < i < len(scores) - 1:
        curvature = scores[i - 1] - 2 * scores[i] + scores[i + 1]
        if curvature < 0:
            return i + 0.5 * (scores[i - 1] - scores[i + 1]) / curvature
    return float(i)


def face_box(gray: Image.Image, template: np.ndarray) -> tuple[float, float, float, float]:
    """The square to hash: FACE_CROP of the shorter side, centred where the face matches `template` best."""
    width, height = gray.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    high = _high_pass(gray.resize((REGISTER_SIDE,) * 2, Image.BOX, box=(left, top, left + side, top + side)))
    m, s, k = REGISTER_MARGIN, REGISTER_SEARCH, REGISTER_SIDE - 2 * REGISTER_MARGIN
    # Normalised cross-correlation without a centred copy of every window: the template sums to zero, so
    # a window's mean drops out of the numerator, and its variance is sum(w^2) - sum(w)^2 / n. `high` holds
    # integers, so its window sums are exact (_window_sums): bit for bit what summing each window (an einsum
    # over sliding windows, before) gives, at a tenth of the cost.
    searched = high[m - s:m + s + k, m - s:m + s + k]
    total = _WINDOW_SUMS @ searched @ _WINDOW_SUMS.T
    spread = _WINDOW_SUMS @ (searched * searched) @ _WINDOW_SUMS.T - total ** 2 / k ** 2
    # The numerator's products are not integers, so its rounding depends on the order of the sum: it stays
    # this einsum on this view (numpy's kernel and order, as when the tables were fitted and every stored
    # hash was made), so that no score moves by a rounding, which could move the box and so the hash.
    # windows[i, j] is the k x k window at (m - s + i, m - s + j): sliding_window_view's view, made
    # directly (its checks cost more than the view).
    windows = np.lib.stride_tricks.as_strided(high[m - s:, m - s:], (2 * s + 1, 2 * s + 1, k, k), high.strides * 2)
    scores = np.einsum("ijkl,kl->ij", windows, template) / np.sqrt(np.maximum(spread, 1e-9))
    iy, ix = divmod(int(np.argmax(scores)), 2 * s + 1)
    rows = scores.tolist()  # Python floats: the same double arithmetic in _peak, without numpy's per-scalar cost
    px = side / REGISTER_SIDE
    cx = left + side / 2 + (_peak(rows[iy], ix) - s) * px
    cy = top + side / 2 + (_peak([row[ix] for row in rows], iy) - s) * px
    crop = FACE_CROP * side
    x0, y0 = min(max(cx - crop / 2, 0.0), width - crop), min(max(cy - crop / 2, 0.0), height - crop)
    return (x0, y0, x0 + crop, y0 + crop)


def dct_block(gray: Image.Image, box: tuple[float, float, float, float]) -> np.ndarray:
    """The 8x8 lowest-frequency DCT coefficients of `box` area-averaged to 32x32: rows vertical, columns
    horizontal frequencies."""
    return _DCT @ np.asarray(gray.resize((HASH_SIDE,) * 2, Image.BOX, box=box), np.float64) @ _DCT.T


_WINDOW_SUMS = _window_sums(2 * REGISTER_SEARCH + 1, REGISTER_SIDE - 2 * REGISTER_MARGIN)
_TEMPLATE = registration_template(np.frombuffer(base64.b64decode(_MEAN_FACE), np.uint8).reshape(32, 32))


def _bits(block: np.ndarray, thresholds: np.ndarray) -> tuple[int, int]:
    """The hash of `block` and of its mirror image, each a 64-bit int: bit 63 - i is coefficient i (row-major)
    above its threshold, the DC bit 0."""
    bits = (np.stack([block, block * _MIRROR]) > thresholds).reshape(2, BLOCK * BLOCK)
    bits[:, 0] = False  # DC
    return tuple(int(v) for v in np.packbits(bits, axis=1).view(">u8").ravel())


@dataclasses.dataclass(frozen=True)
class FaceHash:
    pixels: str   # SHA-256 (hex) of the decoded RGB pixels and the size
    phash: int    # 64-bit DCT hash of the face
    mirror: int   # the same of the mirrored face

    def to_record(self) -> dict:
        """As a shard record's header stores it (records.py)."""
        return {"v": HASH_VERSION, "pixels": self.pixels, "phash": f"{self.phash:016x}",
                "mirror": f"{self.mirror:016x}"}

    @classmethod
    def from_record(cls, stored: dict) -> FaceHash | None:
        """None for hashes of another HASH_VERSION: the caller hashes the image again."""
        if stored.get("v") != HASH_VERSION:
            return None
        return cls(stored["pixels"], int(stored["phash"], 16), int(stored["mirror"], 16))


def hash_image(image: Image.Image) -> FaceHash:
    """The fingerprints of an upright image of any mode (decoded here if it is not yet)."""
    rgb = decode.to_rgb(image)
    pixels = hashlib.sha256(b"%dx%d:" % rgb.size)
    pixels.update(rgb.tobytes())  # the digest of the concatenation, without copying the pixels into it
    gray = rgb.convert("L")
    block = dct_block(gray, face_box(gray, _TEMPLATE))
    return FaceHash(pixels.hexdigest(), *_bits(block, _MEDIANS))


_TURNED = frozenset(range(2, 9))  # EXIF orientations that exif_transpose turns (1: upright)


def hash_bytes(data: bytes) -> FaceHash:
    """The fingerprints of an encoded image (a file's bytes, a record's image); UNREADABLE if it is not one.
    Always decoded by PIL, whatever decoder training uses, so a hash never depends on the install."""
    image = Image.open(io.BytesIO(data))
    try:  # upright, as the builder stores it
        # exif_transpose's own first two steps (decode, read the orientation), so that it is called only when
        # there is something to turn: otherwise it returns a copy of the image, the same pixels, and the
        # copy costs ~10 % of a hash. A step that raises leaves `image` as it is, as exif_transpose did.
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) in _TURNED:
            image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block: the builder stores such an image as it is
        pass
    return hash_image(image)


# ---------------------------------------------------------------------------------------------
# Sets of images
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class HashTable:
    """The fingerprints of a set of images, in order, and the images that could not be hashed."""
    name: str                                    # the data's spec or folder, for messages
    ids: list[str] = dataclasses.field(default_factory=list)
    hashes: list[FaceHash] = dataclasses.field(default_factory=list)
    computed: int = 0                            # hashed from pixels here, not read from records
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # reason -> ids

    def add(self, image_id: str, fingerprints: FaceHash) -> None:
        self.ids.append(image_id)
        self.hashes.append(fingerprints)

    def skip(self, image_id: str, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(image_id)

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, key: str) -> np.ndarray:
        return np.fromiter((getattr(h, key) for h in self.hashes), np.uint64, len(self.hashes))


@dataclasses.dataclass(frozen=True)
class Match:
    query: int      # index into the query table
    found: int      # index into the searched table
    distance: int   # Hamming distance, the smaller of direct and mirrored
    kind: str       # "exact" (same pixels), "mirror" (closer mirrored) or "near"


def near_pairs(query: HashTable, index: HashTable, max_distance: int, chunk: int = 256) -> list[Match]:
    """Every (query image, index image) pair within `max_distance`, in query order, closest first."""
    if not len(query) or not len(index):
        return []
    found = index.column("phash")[None]
    direct, mirrored = query.column("phash"), query.column("mirror")
    matches = []
    for start in range(0, len(query), chunk):
        d = np.bitwise_count(direct[start:start + chunk, None] ^ found)
        dm = np.bitwise_count(mirrored[start:start + chunk, None] ^ found)
        rows, cols = np.nonzero(np.minimum(d, dm) <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist()):
            q = start + r
            kind = ("exact" if query.hashes[q].pixels == index.hashes[c].pixels
                    else "mirror" if dm[r, c] < d[r, c] else "near")
            matches.append(Match(q, c, int(min(d[r, c], dm[r, c])), kind))
    return sorted(matches, key=lambda m: (m.query, m.distance, m.found))


def find_duplicates(table: HashTable, mode: str, max_distance: int = NEAR_DISTANCE) -> dict[int, Match]:
    """The images of `table` that repeat an earlier one: {index: Match(index, kept index, ...)}.

    The first image in table order is kept and its later copies go. `exact`: the same pixels. `near`:
    within `max_distance` of an image that is kept (the closest, then the earliest), so a chain of
    small differences (A ~ B ~ C, A far from C) keeps A and C; exact copies are near ones at distance 0."""
    if mode not in DEDUP_MODES:
        raise ValueError(f"dedup mode {mode!r}: choose one of {DEDUP_MODES}")
    removed: dict[int, Match] = {}
    if mode == "exact":
        first: dict[str, int] = {}
        for k, h in enumerate(table.hashes):
            kept = first.setdefault(h.pixels, k)
            if kept != k:
                removed[k] = Match(k, kept, 0, "exact")
    elif mode == "near":
        for m in near_pairs(table, table, max_distance):  # closest first within each query
            if m.found < m.query and m.query not in removed and m.found not in removed:
                removed[m.query] = m
    return removed


@dataclasses.dataclass(frozen=True)
class Leak:
    eval_id: str
    pretrain: str       # the pretraining data's name (its spec)
    pretrain_id: str
    distance: int
    kind: str           # as Match.kind


def leaks(evaluated: HashTable, pretrain: Iterable[HashTable], max_distance: int = NEAR_DISTANCE) -> list[Leak]:
    """Every pair of an evaluation image and a pretraining image within `max_distance`: in evaluation
    order, closest first. An evaluation image may match several (a photo kept twice in the pretraining data)."""
    found = [(m, table) for table in pretrain for m in near_pairs(evaluated, table, max_distance)]
    found.sort(key=lambda item: (item[0].query, item[0].distance))
    return [Leak(evaluated.ids[m.query], table.name, table.ids[m.found], m.distance, m.kind) for m, table in found]


def read_shard_folder(folder: str, keep: Callable[[dict], bool] = lambda labels: True,
                      limit: int | None = None) -> HashTable:
    """The fingerprints of a shard folder's records whose labels `keep` accepts (the first `limit`):
    read from the records of builds that store them (of this HASH_VERSION), computed from the image
    bytes otherwise."""
    manifest = manifest_lib.read_manifest(folder)
    table = HashTable(folder)
    for shard in manifest["shards"]:
        for k, data in enumerate(records.read_shard(os.path.join(folder, shard["file"]))):
            if limit is not None and len(table) >= limit:
                return table
            try:
                header = records.decode_header(data)
            except records.RecordError as err:
                table.skip(f"{shard['file']}[{k}]", f"unreadable record: {err}")
                continue
            if not keep(header["labels"]):
                continue
            stored = FaceHash.from_record(header["hash"]) if "hash" in header else None
            if stored is not None:
                table.add(header["id"], stored)
                continue
            try:
                table.add(header["id"], hash_bytes(records.decode_record(data)[2]))
                table.computed += 1
            except UNREADABLE:
                table.skip(header["id"], "unreadable image")
    return table


def hash_files(name: str, root: str, files: Iterable[str], threads: int | None = None) -> HashTable:
    """The fingerprints of image files (paths relative to `root`, which name them), hashed on `threads`
    threads (default: one per core; PIL decodes and resizes without holding the GIL)."""
    files = list(files)

    def one(file: str) -> FaceHash | Exception:
        try:
            with open(os.path.join(root, file), "rb") as f:
                return hash_bytes(f.read())
        except UNREADABLE as err:
            return err

    table = HashTable(name)
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for file, result in zip(files, pool.map(one, files)):
            if isinstance(result, Exception):
                table.skip(file, "missing file" if isinstance(result, FileNotFoundError) else "unreadable image")
            else:
                table.add(file, result)
    table.computed = len(table)
    return table
