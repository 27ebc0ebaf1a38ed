"""kill -9 and resume of a run whose data is a weighted mixture (`data.train='A:0.7;B:0.3'`), through the
real entry point on two real UTKFace shard sets (issue 24).

test_resume.py's yardstick, for a mixture: a run killed while its step-8 save is in flight and re-run with
the same command must end bit for bit on the uninterrupted reference's train state and data-iterator
position (the mixture's one index), with every step logged once, and its per-source counters
(`data_decoded_<name>`, training/loop.py's DataStats, saved with each checkpoint) carried across the resume:
every step's counts equal the reference's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.runs import (TOTAL, Run, complete_steps, in_flight, logged_steps, reference_run, resumed_from,
                          saves_in_flight)
from helpers.saved_runs import assert_matches_reference
from helpers.shard_sets import build_shard_sets, mix_spec
from helpers.tiny_configs import TINY_RUN
from mefem_jax.data import mixture

BATCH = TINY_RUN["data.batch_size"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> str:
    """`data.train` for every run here: 0.7 of one shard set of 30 faces, 0.3 of another."""
    return mix_spec(build_shard_sets(tmp_path_factory.mktemp("mixture_sets")))


def data_counts(workdir: Path) -> list[dict]:
    """Per logged step: the step and its cumulative data counters (total, skipped, per source)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k == "step" or k.startswith("data_")} for row in rows]


def test_sigkill_mid_save_then_rerun_of_a_mixture_is_bit_exact(train_env, mixed, tmp_path_factory, tmp_path):
    reference = reference_run(train_env, tmp_path_factory, "mixture_reference", data__train=mixed)
    columns = [f"data_decoded_{name}" for name in mixture.source_names(mixed)]
    assert columns == ["data_decoded_set_a", "data_decoded_set_b"]
    expected = data_counts(reference)
    last = expected[-1]
    assert last["data_decoded"] == TOTAL * BATCH and last["data_skipped"] == 0
    assert sum(last[c] for c in columns) == last["data_decoded"]
    assert last["data_decoded_set_a"] > last["data_decoded_set_b"] > 0, last  # 0.7/0.3 of 160: ~112/48

    workdir = tmp_path / "run"
    workdir.mkdir()
    r = Run(train_env, workdir, tmp_path / "killed.log", data__train=mixed)
    r.wait_until(lambda: in_flight(8, workdir), "the step-8 save in flight")
    r.kill()
    r.wait()
    assert resumed_from(r.text()) is None, r.tail()
    assert in_flight(8, workdir), "the kill missed the save: its temporary folder is gone"
    assert 8 not in complete_steps(workdir)
    newest = complete_steps(workdir)[-1]  # 4: a real restore, of the model and of the mixture's position
    assert 0 < newest < 8

    r = Run(train_env, workdir, tmp_path / "finished.log", data__train=mixed)
    assert r.wait() == 0, r.tail()
    assert resumed_from(r.text()) == newest, r.tail()
    assert not saves_in_flight(workdir), "the interrupted save's temporary folder is left over"
    assert logged_steps(workdir) == list(range(1, TOTAL + 1))
    assert_matches_reference(workdir, reference)
    # Steps up to `newest` were logged by the killed run, the rest by the rerun, which starts its counters
    # from those saved with step `newest`: had it restarted them (or replayed other data), they would differ.
    got = data_counts(workdir)
    assert all(set(columns) <= set(row) for row in got), got[0]
    assert got == expected, next((g, e) for g, e in zip(got, expected) if g != e)
