"""The step's crop (data/device_augment.py) against the host's (data/augment.py): the same
distribution of boxes and flips, and, for one fixed box, the same pixels to within rounding."""
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mefem_jax.data import augment, decode, device_augment

SCALE, RATIO = (0.3, 1.0), (3 / 4, 4 / 3)


def _host_boxes(n: int, side: int = 200, scale=SCALE, ratio=RATIO) -> np.ndarray:
    """n host boxes on a side x side image as unit-square (left, top, width, height)."""
    rng = np.random.default_rng(0)
    boxes = [augment.sample_crop_box(side, side, rng, scale, ratio) for _ in range(n)]
    b = np.asarray(boxes) / side
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def _features(boxes: np.ndarray) -> dict[str, np.ndarray]:
    left, top, w, h = boxes.T
    return {"area": w * h, "log aspect": np.log(w / h), "centre x": left + w / 2,
            "centre y": top + h / 2, "left": left}


def test_device_boxes_follow_the_host_distribution():
    n = 20000
    host = _host_boxes(n)
    device = np.asarray(jax.jit(device_augment.sample_boxes, static_argnums=(1, 2, 3))(
        jax.random.PRNGKey(1), n, SCALE, RATIO))
    left, top, w, h = device.T
    assert np.all(left >= 0) and np.all(top >= 0)
    assert np.all(left + w <= 1 + 1e-6) and np.all(top + h <= 1 + 1e-6)
    assert np.all((w * h >= SCALE[0] - 1e-6) & (w * h <= SCALE[1] + 1e-6))
    assert np.all((w / h >= RATIO[0] - 1e-5) & (w / h <= RATIO[1] + 1e-5))
    # Two-sample Kolmogorov-Smirnov per feature: with 20,000 draws a side, a 3% shift in any of
    # these distributions gives p < 1e-6; the same distribution gives p > 1e-3 with odds 999:1.
    for name, want in _features(host).items():
        got = _features(device)[name]
        p = stats.ks_2samp(want, got).pvalue
        assert p > 1e-3, f"{name}: host and device distributions differ (KS p={p:.2g})"
    # The rejection step matters: large, elongated boxes that do not fit are redrawn, which
    # lowers the mean area below the U(0.3, 1) mean of 0.65.
    assert abs(float(np.mean(w * h)) - float(np.mean(_features(host)["area"]))) < 0.01
    assert np.mean(w * h) < 0.64


def test_a_box_distribution_the_ks_test_rejects():
    """The same check notices a wrong sampler (here: no rejection, boxes clipped to the image)."""
    host = _host_boxes(20000)
    rng = np.random.default_rng(2)
    area = rng.uniform(*SCALE, 20000)
    aspect = np.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1]), 20000))
    w, h = np.minimum(np.sqrt(area * aspect), 1), np.minimum(np.sqrt(area / aspect), 1)
    wrong = np.stack([rng.uniform(0, 1 - w), rng.uniform(0, 1 - h), w, h], axis=1)
    assert stats.ks_2samp(_features(host)["area"], _features(wrong)["area"]).pvalue < 1e-6


def test_fallback_is_the_host_fallback():
    """No candidate fits (aspect 2-3 at 95-100% of a square): both take the centred 2:1 box."""
    host = _host_boxes(5, scale=(0.95, 1.0), ratio=(2.0, 3.0))
    device = np.asarray(device_augment.sample_boxes(jax.random.PRNGKey(0), 5, (0.95, 1.0),
                                                    (2.0, 3.0)))
    np.testing.assert_allclose(device, host, atol=1e-6)
    np.testing.assert_allclose(host[0], [0.0, 0.25, 1.0, 0.5], atol=1e-9)


def test_flip_rate_is_one_half():
    flips = np.asarray(device_augment.sample_flips(jax.random.PRNGKey(3), 20000))
    assert abs(flips.mean() - 0.5) < 0.015  # 4.2 standard deviations


def _face(utkface_dir: Path) -> np.ndarray:
    name = min((utkface_dir / "images").iterdir())
    pixels = decode.decode_rgb(name.read_bytes())
    assert pixels.shape == (200, 200, 3)
    return pixels


@pytest.mark.parametrize("size", [112, 224])  # a downscale (antialiased) and an upscale
@pytest.mark.parametrize("flip", [False, True])
def test_a_fixed_crop_matches_the_host_resize(utkface_dir, size, flip):
    """Tolerance: PIL rounds to uint8 (<= 0.5) and computes its kernel in fixed point; the device
    keeps floats. Stated bound: mean |diff| <= 0.35 and max |diff| <= 1.25 grey levels (measured on
    this face: 0.29 and 0.99 at both sizes)."""
    pixels = _face(utkface_dir)
    box = (23.5, 11.25, 171.0, 170.5)  # left, top, right, bottom in pixels: 147.5 x 159.25
    host = augment.crop_resize(pixels, lambda w, h: box, size, flip).astype(np.float32)
    unit = jnp.asarray([[box[0] / 200, box[1] / 200, (box[2] - box[0]) / 200,
                         (box[3] - box[1]) / 200]], jnp.float32)
    device = np.asarray(device_augment.crop_resize(jnp.asarray(pixels)[None], unit,
                                                   jnp.asarray([flip]), size))[0]
    diff = np.abs(device - host)
    assert diff.mean() <= 0.35 and diff.max() <= 1.25, (diff.mean(), diff.max())


def test_prepare_normalises_and_crops_only_on_device():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    key = jax.random.PRNGKey(0)
    kw = {"image_size": 32, "scale": SCALE, "ratio": RATIO, "flip": True}
    host = np.asarray(device_augment.prepare(jnp.asarray(pixels), key, mode="host", **kw))
    want = np.stack([augment.normalize(p) for p in pixels])
    np.testing.assert_allclose(host, want, rtol=1e-5, atol=1e-5)
    dev = np.asarray(device_augment.prepare(jnp.asarray(pixels), key, mode="device", **kw))
    assert dev.shape == (2, 32, 32, 3) and not np.allclose(dev, want)
    again = np.asarray(device_augment.prepare(jnp.asarray(pixels), key, mode="device", **kw))
    np.testing.assert_array_equal(dev, again)  # a pure function of the key
    other = np.asarray(device_augment.prepare(jnp.asarray(pixels), jax.random.PRNGKey(1),
                                              mode="device", **kw))
    assert not np.allclose(dev, other)
    floats = jnp.asarray(want)  # already normalised: passed through untouched
    np.testing.assert_array_equal(np.asarray(device_augment.prepare(floats, key, mode="device",
                                                                    **kw)), want)
    with pytest.raises(ValueError, match="48"):
        device_augment.prepare(jnp.zeros((1, 48, 48, 3), jnp.uint8), key, mode="host", **kw)


def test_the_whole_image_at_its_own_size_is_unchanged():
    pixels = np.random.default_rng(1).integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    whole = jnp.asarray([[0.0, 0.0, 1.0, 1.0]] * 2)
    out = np.asarray(device_augment.crop_resize(jnp.asarray(pixels), whole,
                                                jnp.asarray([False, True]), 24))
    np.testing.assert_allclose(out[0], pixels[0], atol=1e-4)
    np.testing.assert_allclose(out[1], pixels[1][:, ::-1], atol=1e-4)
