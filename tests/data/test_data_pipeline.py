"""The Grain pipelines on synthetic faces: batches, determinism, state, process slices, eval."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from mefem_jax import config_checks
from mefem_jax.data import augment, decode, pipeline
from mefem_jax.data.config import DATA_RULES, default_data_config


def _cfg(**overrides):
    cfg = default_data_config()
    cfg.synthetic_size = 48
    cfg.read_threads = 2
    cfg.update(overrides)
    return cfg


def _train(cfg, *, batch=8, seed=0, process_index=0, process_count=1, size=32):
    return pipeline.make_train_iterator(cfg, image_size=size, global_batch_size=batch, seed=seed,
                                        process_index=process_index, process_count=process_count)


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("augment_on", ["device", "host"])
def test_train_batches_are_uint8_nhwc_with_counters(augment_on):
    it = _train(_cfg(augment_on=augment_on, return_ids=True))
    batch = next(it)
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert int(batch["decoded"]) == 8 and int(batch["skipped"]) == 0
    assert batch["image"].reshape(-1, 3).std(axis=0).min() > 20  # real images, not constants
    source = pipeline.sources.open_source("synthetic", synthetic_size=48, synthetic_resolution=32)
    by_id = {source[i]["id"]: source[i]["image"] for i in range(48)}
    same = [np.array_equal(img, by_id[i]) for img, i in zip(batch["image"], batch["id"])]
    # device: the faces as drawn (square, already 32 px: no resampling); host: random crops of them.
    assert all(same) if augment_on == "device" else not any(same)
    it.close()


def test_device_batches_carry_the_source_size():
    it = _train(_cfg(source_size=48))
    assert next(it)["image"].shape == (8, 48, 48, 3)
    it.close()
    it = _train(_cfg(source_size=48, augment_on="host"))  # host crops to the model's size
    assert next(it)["image"].shape == (8, 32, 32, 3)
    it.close()


def test_same_seed_same_batches_other_seed_other_batches():
    a, b, c = _train(_cfg()), _train(_cfg()), _train(_cfg(), seed=1)
    first_a, first_b, first_c = (_take(x, 2) for x in (a, b, c))
    for x, y in zip(first_a, first_b):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.array_equal(first_a[0]["image"], first_c[0]["image"])
    for it in (a, b, c):
        it.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_restoring_the_state_mid_epoch_replays_the_same_batches(workers):
    cfg = _cfg(workers=workers)
    it = _train(cfg)
    _take(it, 3)  # 24 of 48 records: mid-epoch
    # Orbax's grain.checkpoint handler stores the state as JSON: go through JSON too.
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)  # runs into the second epoch
    it.close()

    restored = _train(cfg)
    restored.set_state(state)
    for want, got in zip(expected, _take(restored, 4)):
        np.testing.assert_array_equal(want["image"], got["image"])
    restored.close()


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_cover_every_epoch_exactly_once(process_count):
    """Each process reads its own part of the global stream: over one epoch of 48 records the
    processes see every id exactly once, and epochs are reshuffled."""
    cfg = _cfg(return_ids=True)
    per_process_epoch = 48 // process_count
    batch = 4
    seen = []
    second_epoch = []
    for p in range(process_count):
        it = _train(cfg, batch=batch * process_count, process_index=p,
                    process_count=process_count)
        ids = [i for b in _take(it, 2 * per_process_epoch // batch) for i in b["id"]]
        seen += ids[:per_process_epoch]
        second_epoch += ids[per_process_epoch:]
        it.close()
    assert sorted(seen) == [f"synthetic-train-{i:08d}" for i in range(48)]
    assert sorted(second_epoch) == sorted(seen)
    assert second_epoch != seen


def test_global_batch_must_split_over_processes():
    with pytest.raises(ValueError, match="does not split"):
        _train(_cfg(), batch=6, process_index=0, process_count=4)


def test_eval_reads_everything_once_in_order_and_pads_the_last_batch():
    it = pipeline.make_eval_iterator("synthetic", image_size=32, batch_size=8, data_cfg=_cfg(),
                                     limit=21)
    assert len(it) == 21
    batches = list(it)
    assert [int(b["valid"].sum()) for b in batches] == [8, 8, 5]
    last = batches[-1]
    assert last["image"].shape == (8, 32, 32, 3) and list(last["id"][5:]) == [""] * 3
    assert np.isnan(last["skin_tone"][5:]).all()
    ids = [i for b in batches for i, v in zip(b["id"], b["valid"]) if v]
    assert ids == [f"synthetic-test-{i:08d}" for i in range(21)]
    assert it.num_decoded == 21 and it.num_skipped == 0

    source = it.source
    np.testing.assert_allclose(batches[1]["eye_size"][3], source[11]["labels"]["eye_size"],
                               rtol=1e-6)
    # No randomness: a second pass is identical.
    again = list(it)
    np.testing.assert_array_equal(batches[2]["image"], again[2]["image"])


def test_sample_crop_box_respects_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, right, bottom = augment.sample_crop_box(200, 160, rng, (0.3, 1.0), (0.75, 4 / 3))
        w, h = right - left, bottom - top
        assert 0 <= left and 0 <= top and right <= 200 + 1e-9 and bottom <= 160 + 1e-9
        assert 0.3 - 1e-9 <= w * h / (200 * 160) <= 1 + 1e-9
        assert 0.75 - 1e-9 <= w / h <= 4 / 3 + 1e-9
    # A 1000x10 strip has no room for a 3/4..4/3 box of 30% area: centred fallback.
    box = augment.sample_crop_box(1000, 10, rng, (0.3, 1.0), (0.75, 4 / 3))
    assert box == pytest.approx((500 - 20 / 3, 0, 500 + 20 / 3, 10))


def test_normalize_is_imagenet_standardisation():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    want = (pixels / 255.0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
    np.testing.assert_allclose(augment.normalize(pixels), want, rtol=1e-5, atol=1e-5)


def _jpeg(image, **kwargs):
    out = io.BytesIO()
    image.save(out, format="JPEG", **kwargs)
    return out.getvalue()


def test_every_mode_decodes_to_8bit_rgb():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    cases = {"L": rgb.convert("L"), "RGBA": rgb.convert("RGBA"), "P": rgb.convert("P"),
             "CMYK": rgb.convert("CMYK"), "I;16": Image.fromarray(
                 np.full((20, 30), 40000, np.uint16))}
    for mode, image in cases.items():
        out = io.BytesIO()
        image.save(out, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
        pixels = decode.decode_rgb(out.getvalue())
        assert pixels.shape == (20, 30, 3) and pixels.dtype == np.uint8, mode
    sixteen = io.BytesIO()
    cases["I;16"].save(sixteen, format="PNG")
    assert decode.decode_rgb(sixteen.getvalue()).mean() == pytest.approx(40000 / 65535 * 255, abs=1)


def test_jpeg_draft_decodes_small_when_the_crop_allows_and_matches_full_decode():
    yy, xx = np.mgrid[0:800, 0:800]
    smooth = np.stack([xx * 255 // 800, yy * 255 // 800, (xx + yy) * 255 // 1600], -1)
    data = _jpeg(Image.fromarray(smooth.astype(np.uint8)), quality=95)
    image, box = decode.reduce_for(decode.open_image(data), (0, 0, 800, 800), 96)
    assert image.size == (100, 100) and box == (0, 0, 100, 100)  # 1/8 scale DCT decode
    # A crop of 300 px for 224 output cannot be reduced: left alone.
    image, box = decode.reduce_for(decode.open_image(data), (100, 100, 400, 400), 224)
    assert image.size == (800, 800) and box == (100, 100, 400, 400)
    fast = augment.crop_resize(data, lambda w, h: (0, 0, w, h), 96).astype(np.float32)
    slow = np.asarray(Image.fromarray(smooth.astype(np.uint8)).resize((96, 96), Image.BILINEAR))
    assert np.abs(fast - slow).mean() < 2.0


@pytest.mark.parametrize("key, value, allowed", [("augment_on", "gpu", "one of"),
                                                 ("source_size", -1, "a number >= 0")])
def test_bad_augmentation_settings_are_one_line_config_errors(key, value, allowed):
    cfg = _cfg(**{key: value})
    with pytest.raises(ValueError, match=f"data.{key}=.*allowed: {allowed}"):
        config_checks.check_section(cfg, "data", DATA_RULES)
