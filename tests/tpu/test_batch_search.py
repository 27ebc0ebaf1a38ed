"""The batch search on a synthetic compiler whose memory is exactly affine in the batch (as XLA:TPU's is
away from the limit, benchmarks/tpu_fit.jsonl): its arithmetic one function at a time, then the whole
search. No JAX compile; the search on real compiles is in test_compile_check.py."""
from __future__ import annotations

import pytest

from helpers.affine_compiler import HBM, AffineCompiler
from mefem_jax.tpu import batch_search as bs

def fit(peak: float) -> dict:
    return {"fits": True, "per_device_bytes": {"peak": peak}}


def refusal(temps: float | None = None, offered: float | None = None) -> dict:
    quoted = {"temp_required_bytes": temps, "hbm_available_bytes": offered} if temps is not None else {}
    return {"fits": False, **quoted}


def test_the_first_batch_is_whole_granules():
    assert bs.first_batch(1000, 64) == 960
    assert bs.first_batch(10, 64) == 64  # never below one example per device


def test_the_bracket_is_the_largest_fit_and_the_smallest_failure():
    assert bs.bracket({}) == (0, None)
    assert bs.bracket({4: fit(1), 8: fit(2), 32: refusal(), 16: refusal()}) == (8, 16)
    assert bs.bracket({64: refusal()}) == (0, 64)


def test_the_resolution_is_rel_tol_in_whole_granules():
    assert bs.granule_step(1000, 4, 0.05) == 48  # 50 rounded down to granules
    assert bs.granule_step(100, 8, 0.05) == 8  # 5 is less than a granule
    assert bs.granule_step(0, 4, 0.05) == 4


def test_when_the_bracket_is_closed():
    assert not bs.bracket_closed(512, None, 4, 0.05)  # nothing failed yet
    assert bs.bracket_closed(1000, 1048, 4, 0.05) and not bs.bracket_closed(1000, 1052, 4, 0.05)
    assert bs.bracket_closed(0, 4, 4, 0.05)  # one example per device does not fit: nothing will
    assert not bs.bracket_closed(0, 8, 4, 0.05)


def test_the_line_through_two_points_meets_the_limit():
    assert bs.line_crossing([(10, 100), (20, 200)], 150) == 15
    assert bs.line_crossing([(10, 100), (20, 200)], 300) == 30
    assert bs.line_crossing([(10, 100)], 150) is None
    assert bs.line_crossing([(10, 100), (20, 100)], 150) is None  # flat: no crossing
    assert bs.line_crossing([(10, 200), (20, 100)], 150) is None  # memory cannot fall as the batch grows


def test_the_fit_line_joins_the_two_largest_fits_against_97_percent_of_hbm():
    probes = {8: fit(100), 16: fit(160), 32: fit(320), 64: refusal(5000, 1000)}
    # Through (16, 160) and (32, 320), 10 bytes an example, to 400: 16 + 240 / 10.
    assert bs.fit_crossing(probes, 400 / bs.AIM) == pytest.approx(40)
    assert bs.fit_crossing({8: fit(100)}, 400) is None


def test_the_refusal_line_joins_the_two_smallest_refusals_against_the_smallest_offer():
    probes = {32: fit(100), 64: refusal(640, 500), 128: refusal(1280, 520), 256: refusal(9999, 500)}
    # Through (64, 640) and (128, 1280) to 97 % of the 500 bytes offered: 64 + (485 - 640) / 10.
    assert bs.refusal_crossing(probes, 10 ** 6) == pytest.approx(48.5)
    # A fit quotes no offer: it counts as 97 % of HBM, here the smaller.
    assert bs.refusal_crossing(probes, 400) == pytest.approx(64 + (bs.AIM * bs.AIM * 400 - 640) / 10)
    assert bs.refusal_crossing({64: refusal(640, 500), 128: refusal()}, 10 ** 6) is None


def test_next_batch_doubles_halves_and_bisects_without_a_line():
    nxt = bs.next_batch
    assert nxt({256: fit(1)}, 256, None, 4, HBM, 0.05, False) == (512, False)
    assert nxt({1024: refusal()}, 0, 1024, 4, HBM, 0.05, False) == (512, False)
    assert nxt({512: fit(1), 1024: refusal()}, 512, 1024, 4, HBM, 0.05, False) == (768, False)
    assert nxt({24: refusal()}, 0, 24, 8, HBM, 0.05, False) == (8, False)  # half of it, in whole granules


def test_next_batch_follows_the_line_inside_the_bracket():
    probes = {100: fit(1000), 200: fit(2000)}  # 10 bytes an example
    assert bs.next_batch(probes, 200, None, 4, 3000 / bs.AIM, 0.05, False) == (300, True)
    # A line far beyond what has been seen is held to 16 times the largest fit, and is no longer its own.
    assert bs.next_batch(probes, 200, None, 4, 10 ** 6, 0.05, False) == (3200, False)
    probes[260] = refusal()
    assert bs.next_batch(probes, 200, 260, 4, 3000 / bs.AIM, 0.05, False) == (256, False)  # below hi
    # After a fit the line predicted, look one resolution above it.
    assert bs.next_batch(probes, 200, 260, 4, HBM, 0.05, True) == (208, False)


@pytest.mark.parametrize("granule", [4, 32])
@pytest.mark.parametrize("start", [32, 2048, 1 << 20])
@pytest.mark.parametrize("per_example", [1.2e5, 7e6])
def test_the_search_brackets_the_true_maximum_within_its_budget(granule, start, per_example):
    """From far below, near, and far above the boundary, six compiles bracket it within 5 %."""
    compiler = AffineCompiler(per_example=per_example)
    s = bs.find_max_batch(compiler, start, granule, HBM, max_compiles=6, rel_tol=0.05)
    true_max = compiler.true_max(granule)
    assert s["exact"] and s["compiles"] == len(compiler.calls) <= 6
    assert s["max_batch"] <= true_max < s["smallest_failing"]
    assert s["smallest_failing"] - s["max_batch"] <= max(granule, 0.05 * s["max_batch"])
    assert len(set(compiler.calls)) == len(compiler.calls) and all(b % granule == 0 for b in compiler.calls)
    assert [int(b) for b in s["probes"]] == sorted(compiler.calls)


def test_a_start_that_does_not_fit_is_halved():
    compiler = AffineCompiler()
    bs.find_max_batch(compiler, 1 << 20, 4, HBM)
    assert compiler.calls[:2] == [1 << 20, 1 << 19]


def test_it_stops_at_one_example_per_device():
    """Nothing fits and XLA quotes no sizes: halve down to one example per device, then stop."""
    compiler = AffineCompiler(limit=1e8, quotes=False)
    s = bs.find_max_batch(compiler, 64, 4, HBM, max_compiles=10)
    assert compiler.calls == [64, 32, 16, 8, 4]
    assert s["max_batch"] is None and s["smallest_failing"] == 4 and s["exact"]


def test_the_budget_caps_the_compiles():
    compiler = AffineCompiler()
    s = bs.find_max_batch(compiler, 32, 4, HBM, max_compiles=2)
    assert compiler.calls == [32, 64] and s["compiles"] == 2
    assert not s["exact"] and s["max_batch"] == 64 and s["smallest_failing"] is None
