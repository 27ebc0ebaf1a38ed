"""simplejpeg (when installed) and PIL decode the same pixels, refuse the same records, and reduce in
the DCT domain only when the crop allows: the fast decoder changes speed, not data."""
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mefem_jax.data import augment, decode

pytest.importorskip("simplejpeg")  # the `test` extra installs it


def _both(monkeypatch, data, box_fn, size):
    out = {}
    for fast in (True, False):
        monkeypatch.setattr(decode, "USE_SIMPLEJPEG", fast)
        image, box = decode.decode_for_box(data, box_fn, size)
        out[fast] = (np.asarray(image), box)
    return out[True], out[False]


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **kwargs)
    return out.getvalue()


def test_a_face_decodes_to_the_pixels_pil_gives(monkeypatch, utkface_dir: Path):
    data = sorted((utkface_dir / "images").iterdir())[3].read_bytes()
    (fast, fast_box), (slow, slow_box) = _both(monkeypatch, data, augment.center_box, 224)
    assert fast.shape == slow.shape == (200, 200, 3) and fast_box == slow_box
    assert np.abs(fast.astype(int) - slow).max() <= 1


@pytest.mark.parametrize("box, size, shape", [
    ((0, 0, 1600, 1200), 224, (300, 400)),   # 1/4: the 1200 px side still gives >= 224 px
    ((200, 100, 500, 400), 224, (1200, 1600)),  # a 300 px crop for 224: no reduction by 2
    ((0, 0, 1600, 1200), 100, (150, 200)),   # 1/8
])
def test_large_photos_reduce_in_the_dct_domain_like_pil(monkeypatch, box, size, shape):
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        (1600, 1200), Image.BICUBIC)
    (fast, fast_box), (slow, slow_box) = _both(monkeypatch, _jpeg(smooth, quality=90),
                                               lambda w, h: box, size)
    assert fast.shape[:2] == shape and slow.shape[:2] == shape
    assert fast_box == pytest.approx(slow_box)
    assert np.abs(fast.astype(int) - slow).mean() < 0.5


def test_grayscale_and_cmyk_decode_to_rgb_like_pil(monkeypatch):
    gray = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1)), "L")
    cmyk = Image.new("CMYK", (40, 30), (10, 200, 30, 5))
    for image in (gray, cmyk):
        (fast, _), (slow, _) = _both(monkeypatch, _jpeg(image), augment.center_box, 8)
        assert fast.shape == slow.shape and fast.shape[-1] == 3  # both decode at 1/4
        assert np.abs(fast.astype(int) - slow).max() <= 1


def test_a_truncated_jpeg_is_refused_by_both(monkeypatch, utkface_dir: Path):
    data = sorted((utkface_dir / "images").iterdir())[3].read_bytes()
    for fast in (True, False):
        monkeypatch.setattr(decode, "USE_SIMPLEJPEG", fast)
        with pytest.raises(OSError):
            decode.decode_for_box(data[: len(data) // 2], augment.center_box, 64)
