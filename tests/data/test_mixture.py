"""Mixtures of training data (data/mixture.py, pipeline.py): the grammar and its refusals, the shares two
real shard sets are delivered in, the per-source counts, an exact resume, and the run's data identity."""
from __future__ import annotations

import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers.shard_sets import PER_SET, build_shard_sets, mix_spec
from mefem_jax import config_checks
from mefem_jax.data import mixture, pipeline, sources
from mefem_jax.data.config import DATA_RULES, default_data_config
from mefem_jax.training import run_record


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> dict[str, tuple[str, set[str]]]:
    """Two shard folders of 30 different UTKFace faces each, stored at 32 px (built concurrently)."""
    return build_shard_sets(tmp_path_factory.mktemp("mixture"))


def _cfg(train: str, **overrides):
    cfg = default_data_config()
    cfg.update(train=train, return_ids=True, read_threads=2, **overrides)
    return cfg


def _iterator(cfg, batch: int = 100, seed: int = 0):
    return pipeline.make_train_iterator(cfg, image_size=32, global_batch_size=batch, seed=seed,
                                        process_index=0, process_count=1)


def test_a_mixture_delivers_its_shares_and_counts_them(two_sets):
    """0.7/0.3 over 5,000 examples, told apart by their ids: within 2% overall and in every window of
    500; the batches' per-source counts agree with the ids; each source runs through whole epochs."""
    ids_a, ids_b = two_sets["set_a"][1], two_sets["set_b"][1]
    it = _iterator(_cfg(mix_spec(two_sets)))
    batches = [next(it) for _ in range(50)]
    it.close()
    ids = [i for b in batches for i in b["id"]]
    assert len(ids) == 5000 and set(ids) == ids_a | ids_b
    from_a = np.array([i in ids_a for i in ids])
    assert abs(from_a.mean() - 0.7) < 0.02, from_a.mean()
    windows = from_a.reshape(10, 500).mean(axis=1)
    assert np.all(np.abs(windows - 0.7) < 0.02), windows
    counts = np.sum([b["decoded_per_source"] for b in batches], axis=0)
    assert counts.tolist() == [int(from_a.sum()), int((~from_a).sum())]
    # Shuffled on its own and repeated: each source's first 30 elements are one whole epoch of it.
    seen_a = [i for i in ids if i in ids_a]
    assert sorted(seen_a[:PER_SET]) == sorted(ids_a) and seen_a[:PER_SET] != seen_a[PER_SET:2 * PER_SET]
    print(f"shares over 5000: set_a {from_a.mean():.4f}, set_b {1 - from_a.mean():.4f}; "
          f"per window of 500: {windows.min():.3f}-{windows.max():.3f}")


def test_the_mixture_resumes_exactly_from_its_saved_state(two_sets, tmp_path):
    """The continuation after get_state/set_state, and after an Orbax round trip of the iterator (what a
    checkpoint saves), is the uninterrupted one: images, ids and per-source counts."""
    cfg = _cfg(mix_spec(two_sets), augment_on="host")  # host crops: the resumed crops must match too
    first = _iterator(cfg, batch=16)
    for _ in range(7):
        next(first)
    state = first.get_state()
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(first)))
    manager.wait_until_finished()
    expected = [next(first) for _ in range(5)]
    first.close()

    by_state = _iterator(cfg, batch=16)
    by_state.set_state(state)
    by_orbax = _iterator(cfg, batch=16)
    manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(by_orbax)))
    manager.close()
    for resumed in (by_state, by_orbax):
        for want in expected:
            got = next(resumed)
            for key in ("image", "id", "decoded_per_source"):
                np.testing.assert_array_equal(got[key], want[key])
        resumed.close()


def _first_ids(cfg, seed: int) -> list[str]:
    it = _iterator(cfg, batch=20, seed=seed)
    ids = [i for _ in range(3) for i in next(it)["id"]]
    it.close()
    return ids


def test_the_run_seed_decides_the_mixed_order(two_sets):
    cfg = _cfg(mix_spec(two_sets, 1, 1))
    assert _first_ids(cfg, 0) == _first_ids(cfg, 0) != _first_ids(cfg, 1)


@pytest.mark.parametrize("text, words", [
    ("/a:0.7;/b:-0.3", ["'/b:-0.3'", "weight -0.3", "> 0"]),
    ("/a:0;/b:0", ["'/a:0'", "weight 0"]),
    ("/a:0.7;/b:lots", ["'lots'", "not a number"]),
    ("/a:0.7;/b", ["'/b' has no weight"]),
    ("/a:0.7;;/b:0.3", ["empty item"]),
    ("/a:0.7;/b:nan", ["weight nan"]),
    ("/a:0.5,/b:0.5", ["separate its items with ';'"]),
])
def test_bad_mixtures_are_one_line_at_start_up(text, words):
    cfg = default_data_config()
    cfg.train = text
    with pytest.raises(config_checks.ConfigError) as err:
        config_checks.check_section(cfg, "data", DATA_RULES)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.train: ")
    assert all(w in message for w in words), message


def test_grammar_keeps_specs_with_colons_whole():
    parts = mixture.parse("tfds:celeb_a:1.0.0:2; gs://bucket/faces:1 ;synthetic:test:1")
    assert [(p.spec, round(p.weight, 6), p.name) for p in parts] == [
        ("tfds:celeb_a:1.0.0", 0.5, "celeb_a"), ("gs://bucket/faces", 0.25, "faces"),
        ("synthetic:test", 0.25, "synthetic")]
    assert mixture.parse("tfds:celeb_a:1.0.0") is None and mixture.parse("/data/x") is None
    assert mixture.names(["/d/utk_train/", "/d/x/*.array_record", "/e/x/f-00000-of-00001.array_record",
                          "synthetic", "tfds:Celeb-A/align:train", "."]) == [
        "utk_train", "x", "x_2", "synthetic", "celeb_a", "data"]
    with pytest.raises(ValueError, match="only training data"):
        sources.open_source("/a:0.5;/b:0.5")


def test_data_identity_covers_every_source_and_weight(two_sets, tmp_path):
    a, b = two_sets["set_a"][0], two_sets["set_b"][0]
    identity = run_record.data_identity(f"{a}:0.7;{b}:0.3")
    parts = identity["mixture"]
    assert [p["spec"] for p in parts] == [a, b] and [p["weight"] for p in parts] == [0.7, 0.3]
    assert all(len(p["fingerprint"]) >= 12 for p in parts) and parts[0]["fingerprint"] != parts[1]["fingerprint"]
    moved = shutil.copytree(a, tmp_path / "moved_a")  # the same build elsewhere is the same data
    assert run_record.same_data(identity, run_record.data_identity(f"{moved}:7;{b}:3"))
    for other in (f"{a}:0.6;{b}:0.4", f"{b}:0.3;{a}:0.7", f"{a}:0.7;synthetic:0.3", a):
        assert not run_record.same_data(identity, run_record.data_identity(other)), other
    assert not run_record.same_data(run_record.data_identity(a), identity)
    line = run_record.ResumeCheck._describe("data.train", identity, run_record.data_identity(f"{a}:0.6;{b}:0.4"))
    assert "the mixture" in line and "x0.7" in line and "x0.6" in line and "fingerprint" in line


def test_per_source_counters_continue_across_a_resume():
    from mefem_jax.training.loop import DataStats  # the training loop's tally

    stats = DataStats(mixture.source_names("/d/utk:0.7;tfds:celeb_a:0.3"))
    for counts in ([6, 2], [5, 3]):
        stats.update({"image": np.zeros((8, 2, 2, 3)), "skipped": np.int32(1),
                      "decoded_per_source": np.array(counts, np.int32)})
    saved = stats.as_dict()
    assert saved == {"data_decoded": 16, "data_skipped": 2, "data_decoded_utk": 11, "data_decoded_celeb_a": 5}
    assert DataStats(["utk", "celeb_a"], saved).as_dict() == saved
    assert DataStats([], {"data_decoded": 3}).as_dict() == {"data_decoded": 3, "data_skipped": 0}
