"""Face fingerprints do not move (issue 24): every shard record stores its image's fingerprints
(face_hash.FaceHash, HASH_VERSION 1), and `leakage` / `evaluate --exclude_leaked` compare new images against
them, so a change to face_hash.py (a faster one, say) must give every image the same pixel SHA-256, hash
and mirror hash, bit for bit, or bump HASH_VERSION.

Pinned two ways: the stored fingerprints of 12 synthetic faces (built here from the mean face and a
seeded legacy RandomState, saved as PNG, so the pixels do not depend on any JPEG codec) and of 8 UTKFace
faces (read in place; skipped without them), computed by face_hash.py as first written; and the
registration (face_box) against that first version's plain code, kept here, to the last bit of the box.
"""
from __future__ import annotations

import base64
import functools
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from helpers.faces import IMAGES, require_utkface
from mefem_jax.data import face_hash

# face -> (pixel SHA-256, hash, mirror hash), as FaceHash.to_record writes them
SYNTHETIC = {
    0: ("6094c3f98f38d62de50bd165be522c796f84d031b2649dc40a6350b4399e48aa", "6a2e147ce4b4d683", "3b3b5029b5e182d6"),
    1: ("dcb025ad3fc2298fc458af66602596a422a1f1e13111eff923cc64effff0e64f", "3e2f702d692cd6b4", "2b2a30782c3d93f5"),
    2: ("24ce65d6d1b3d6015e13e28d9bf211921d1fcb096f8403aa536622800b194f36", "6e2e2d2c693cd2f0", "3b3b78793c6d87b4"),
    3: ("f2ade2e99b25ac9db3d49aadc6285511fe20c8adbbbe5b7c3c58a59d368b7c9f", "6f6e317c39bc9285", "3b3b64292ca9c6d0"),
    4: ("a9a2fedf678ee75f90ac61b7ba0e451cb01b4f1259cebedaa0a5e60b6e33f969", "6f6f417df0f5d3d2", "3b2a142ca5a08686"),
    5: ("7e9c5e3fab89de3ab57a6b68d84f75c117621ac2996b38bf7b68f3a123ee97c4", "2b236469343c76f4", "7e76313c616d23a0"),
    6: ("68e7227392101978bb31df9957dbee854536ee0816a84441bfbb24857d76ae89", "280f70c0ec6e978c", "3d0a3485bd2bc2d8"),
    7: ("d93c76c76a9a90edec31b3aff81e177b0728ffd22fc398968c165c161d06d099", "3b3a547de4edc6a4", "2b2f102cb5ad93f5"),
    8: ("6ddcddcba944b281b6bb8a6b0a7bc72c57974917211207ce4c5ed093f79c73e1", "2b2b142da0f59781", "3e7f517cf5a0c2d4"),
    9: ("999d7fed52b4a8937bbcf7cea90b74b685c99c38ec9db1b250484de662f3b3ee", "7f3f30786c7c8380", "2b2b742d3d2dd6d4"),
    10: ("865a01cc5942d2f087933dccf2107a07c9b08b2695e382d983551d6fe82a248d", "6c0e24c0f87b82dc", "391b7085ad2ed789"),
    11: ("21d0f179bdc6a48f2924c0016aa9afcfae874ace515a63df89e9cc29d64e6c37", "2bab6449343d76b7", "7efe311c616823e2"),
}
UTKFACE = {
    "100_0_0_20170112213500903.jpg.chip.jpg": (
        "d692c4ce98eccfa1b1637d0f1b1f1387ddcfbaa8714e4f6107c9f239217c63e1", "7fa9f4269e19c0c5", "2afca173cb4c9590"),
    "20_1_4_20170103233649970.jpg.chip.jpg": (
        "8b015a7db331fddfcd87f526b0740b98bdee16a32c787c458dbe3b7a78d8ef80", "15b54a90697a4c4f", "40e01fc53c2f191a"),
    "26_0_0_20170117172820860.jpg.chip.jpg": (
        "7a5496a0375fb0f63729e7353791bdc9601b72ee5ccbce0a683adb216683c914", "34e4e1eec9f2b2c4", "61b1b4bb9ca7e791"),
    "28_0_3_20170116024927038.jpg.chip.jpg": (
        "33ff6ca8db614cbca214b149712010a7097bb6080a9fb84742815d0146d712ce", "578058cf879eca13", "02d50d9ad2cb9f46"),
    "32_0_3_20170109141302293.jpg.chip.jpg": (
        "cc19f81b22f9e90dd87d82d66d170eb977e5b11debe87ce09f61be8edafba75c", "7f054057859293f2", "2a501502d0c7c6a7"),
    "39_0_0_20170104210549580.jpg.chip.jpg": (
        "8ae548ca27d360171b893bcaab73395d9d5087a8a34fb29d70d1e00f1546bd14", "21e0a7c39c8592fc", "74b5f296c9d0c7a9"),
    "4_1_2_20161219160314709.jpg.chip.jpg": (
        "13e335fc56a29487bf956bef8e15f571ae52557e7c9d3f6945df12b514e15424", "7d7d697e0b7d498e", "28283c2b5e281cdf"),
    "61_0_3_20170109131758363.jpg.chip.jpg": (
        "0444b8d8bc06edff9263aed1bce300eff325f8cf37d780b5cf24c4d87c2a8fd5", "7a1ff00ff6089890", "2f4aa55aa35dcdc5"),
}


@functools.lru_cache(maxsize=None)
def synthetic_face(k: int) -> bytes:
    """PNG bytes of face k: the mean face blown up to 224 px and smoothed (numpy only), a 200 px crop at a
    seeded offset, tinted, with seeded noise; every third mirrored, every fourth 180x220, every fifth
    grayscale, every sixth stored sideways with EXIF orientation 6 (so hash_bytes turns it)."""
    mean = np.frombuffer(base64.b64decode(face_hash._MEAN_FACE), np.uint8).reshape(32, 32).astype(np.float64)
    rng = np.random.RandomState(k)  # the legacy generator: its stream is frozen across numpy versions
    face = np.repeat(np.repeat(mean, 7, 0), 7, 1)
    for axis in (0, 1):  # a 7-px moving average each way
        c = np.cumsum(np.pad(face, [(4, 3) if a == axis else (0, 0) for a in (0, 1)], mode="edge"), axis)
        face = (np.take(c, range(7, c.shape[axis]), axis) - np.take(c, range(0, c.shape[axis] - 7), axis)) / 7
    dx, dy = rng.randint(0, 25, 2)
    face = face[dy:dy + 200, dx:dx + 200]
    rgb = np.clip(face[..., None] * rng.uniform(0.7, 1.2, 3) + rng.normal(0, 12, (200, 200, 3)), 0, 255)
    rgb = rgb.astype(np.uint8)
    if k % 3 == 1:
        rgb = rgb[:, ::-1]
    if k % 4 == 2:
        rgb = rgb[np.arange(220) * 200 // 220][:, np.arange(180) * 200 // 180]
    image = Image.fromarray(np.ascontiguousarray(rgb[..., 1] if k % 5 == 3 else rgb))
    out = io.BytesIO()
    if k % 6 == 5:
        exif = Image.Exif()
        exif[0x0112] = 6
        image.save(out, "PNG", exif=exif.tobytes())
    else:
        image.save(out, "PNG")
    return out.getvalue()


def reference_face_box(gray: Image.Image, template: np.ndarray) -> tuple[float, float, float, float]:
    """face_hash.face_box as first written (sliding windows, each sum an einsum): what every stored hash
    was registered with."""
    width, height = gray.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    small = gray.resize((64, 64), Image.BOX, box=(left, top, left + side, top + side))
    blurred = small.filter(ImageFilter.GaussianBlur(2.0))
    small = np.asarray(small, np.float64) - np.asarray(blurred, np.float64)
    m, s, k = 8, 4, 48
    windows = np.lib.stride_tricks.sliding_window_view(small, (k, k))[m - s:m + s + 1, m - s:m + s + 1]
    spread = np.einsum("ijkl,ijkl->ij", windows, windows) - windows.sum((-2, -1)) ** 2 / k ** 2
    scores = np.einsum("ijkl,kl->ij", windows, template) / np.sqrt(np.maximum(spread, 1e-9))
    iy, ix = np.unravel_index(int(np.argmax(scores)), scores.shape)

    def peak(row, i):
        if 0 < i < len(row) - 1:
            curvature = row[i - 1] - 2 * row[i] + row[i + 1]
            if curvature < 0:
                return i + 0.5 * (row[i - 1] - row[i + 1]) / curvature
        return float(i)

    px = side / 64
    cx = left + side / 2 + (peak(scores[iy], ix) - s) * px
    cy = top + side / 2 + (peak(scores[:, ix], iy) - s) * px
    crop = 0.9 * side
    x0, y0 = min(max(cx - crop / 2, 0.0), width - crop), min(max(cy - crop / 2, 0.0), height - crop)
    return (x0, y0, x0 + crop, y0 + crop)


def _record(data: bytes) -> tuple[str, str, str]:
    stored = face_hash.hash_bytes(data).to_record()
    return stored["pixels"], stored["phash"], stored["mirror"]


def _same_box(gray: Image.Image) -> None:
    box, reference = face_hash.face_box(gray, face_hash._TEMPLATE), reference_face_box(gray, face_hash._TEMPLATE)
    assert [float(v).hex() for v in box] == [float(v).hex() for v in reference]


def test_synthetic_faces_keep_their_stored_fingerprints():
    assert face_hash.HASH_VERSION == 1  # a new version may change them (and must say so here)
    got = {k: _record(synthetic_face(k)) for k in SYNTHETIC}
    assert got == SYNTHETIC


def test_utkface_faces_keep_their_stored_fingerprints():
    require_utkface()
    got = {name: _record((IMAGES / name).read_bytes()) for name in UTKFACE}
    assert got == UTKFACE


@pytest.mark.parametrize("source", ["synthetic", "utkface"])
def test_registration_is_the_first_versions_to_the_last_bit(source):
    if source == "utkface":
        require_utkface()
        images = [Image.open(IMAGES / name) for name in UTKFACE]
    else:
        images = [Image.open(io.BytesIO(synthetic_face(k))) for k in SYNTHETIC]
    for image in images:
        _same_box(image.convert("RGB").convert("L"))
