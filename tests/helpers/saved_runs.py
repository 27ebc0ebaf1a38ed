"""Reading what a training run saved (a checkpoint's train state, its data-iterator position) and comparing
a run with the uninterrupted reference it must reproduce bit for bit (tests/end_to_end/test_resume*.py)."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from helpers.runs import TOTAL, complete_steps
from mefem_jax.training.checkpoint import load_params_for_eval


def saved_state(workdir: Path, step: int) -> dict:
    """The whole train state of one checkpoint (params, predictor, target, optimizer, step, rng)."""
    manager = ocp.CheckpointManager(workdir.resolve() / "checkpoints",
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    return jax.tree.map(np.asarray, restored.state)


def data_position(workdir: Path, step: int) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / "data" / "process_0-of-1.json").read_text())


def assert_same_tree(actual, expected, what: str) -> None:
    flat_a = dict(jax.tree_util.tree_flatten_with_path(actual)[0])
    flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    assert flat_a.keys() == flat_e.keys(), f"{what}: different leaves"
    differ = [jax.tree_util.keystr(k) for k in flat_e if not np.array_equal(flat_a[k], flat_e[k])]
    assert not differ, f"{what}: {len(differ)} of {len(flat_e)} leaves differ, e.g. {differ[:5]}"


def assert_matches_reference(workdir: Path, reference: Path) -> None:
    """Bit-identical final train state and data position, and a metrics log with every step once."""
    assert complete_steps(workdir)[-1] == TOTAL
    assert_same_tree(saved_state(workdir, TOTAL), saved_state(reference, TOTAL), "train state")
    for which in ("target", "context"):  # the evaluation path reads the same arrays
        ours, _, _ = load_params_for_eval(workdir, which)
        theirs, _, _ = load_params_for_eval(reference, which)
        assert_same_tree(ours, theirs, f"{which} encoder")
    assert data_position(workdir, TOTAL) == data_position(reference, TOTAL)
