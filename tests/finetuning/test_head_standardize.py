"""The head's input standardisation (finetuning/model.py LinearHead) against float64 numpy: batch statistics
in training with their gradient, the tracked values in evaluation, the step's running-average update, and
the export's fold into a plain Linear."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mefem_jax.finetuning.model import BATCH_EPS, LinearHead
from mefem_jax.finetuning.step import _track_batch_stats
from mefem_jax.weights.classifier import fold_standardisation

D, K = 6, 3


@pytest.fixture
def head_params():
    rng = np.random.default_rng(0)
    return {"kernel": rng.standard_normal((D, K)).astype(np.float32),
            "bias": rng.standard_normal(K).astype(np.float32),
            "input_mean": rng.standard_normal(D).astype(np.float32),
            "input_std": rng.uniform(0.05, 1.5, D).astype(np.float32)}


def _features(n=16):  # a large shared part and a small spread, as the :cpu encoder's CLS features
    rng = np.random.default_rng(1)
    return (0.65 + 0.04 * rng.standard_normal((n, D))).astype(np.float32)


def test_batch_statistics_in_training_tracked_values_in_evaluation(head_params):
    x = _features()
    head = LinearHead(K, "batch")
    logits, sown = head.apply({"params": head_params}, x, training=True, mutable=["batch_stats"])
    x64 = x.astype(np.float64)
    mu, sd = x64.mean(0), np.sqrt(x64.var(0) + BATCH_EPS)
    np.testing.assert_allclose(logits, ((x64 - mu) / sd) @ head_params["kernel"] + head_params["bias"], atol=2e-4)
    np.testing.assert_allclose(sown["batch_stats"]["input_mean"][0], mu, rtol=1e-5)
    np.testing.assert_allclose(sown["batch_stats"]["input_std"][0], sd, rtol=1e-4)
    # evaluation (and "fixed" in training): the held values, which the export folds into one Linear
    folded = fold_standardisation(head_params)
    for mode, training in (("batch", False), ("fixed", True), ("fixed", False)):
        out = LinearHead(K, mode).apply({"params": head_params}, x, training=training)
        np.testing.assert_allclose(out, x64 @ folded["kernel"] + folded["bias"], atol=2e-4, err_msg=mode)


def test_gradients_flow_through_the_batch_statistics_and_never_into_the_held_ones(head_params):
    x = jnp.asarray(_features())

    def loss(params, x, mode):
        return jnp.sum(LinearHead(K, mode).apply({"params": params}, x, training=True,
                                                 mutable=["batch_stats"])[0] ** 2)

    for mode in ("batch", "fixed"):
        grads = jax.grad(loss)(head_params, x, mode)
        assert not np.any(grads["input_mean"]) and not np.any(grads["input_std"]), mode
    # batch mode: shifting every face by one vector changes nothing (BatchNorm's invariance), so the
    # gradient into the features has no component along a shared shift of the encoder's output
    g = jax.grad(lambda x: loss(head_params, x, "batch"))(x)
    np.testing.assert_allclose(np.asarray(g).sum(0), 0.0, atol=1e-3)
    g_fixed = jax.grad(lambda x: loss(head_params, x, "fixed"))(x)
    assert np.abs(np.asarray(g_fixed).sum(0)).max() > 1.0


def test_the_step_moves_the_held_values_towards_the_batch(head_params):
    x = _features()
    _, sown = LinearHead(K, "batch").apply({"params": head_params}, x, training=True, mutable=["batch_stats"])
    params = {"encoder": {"w": np.ones(2)}, "head": head_params}
    moved = _track_batch_stats(params, {"head": sown["batch_stats"]}, 0.9)  # as Classifier sows them
    for key in ("input_mean", "input_std"):
        np.testing.assert_allclose(moved["head"][key], 0.9 * head_params[key] + 0.1 * sown["batch_stats"][key][0],
                                   rtol=1e-6)
    for key in ("kernel", "bias"):
        np.testing.assert_array_equal(moved["head"][key], head_params[key])
    assert _track_batch_stats(params, {}, 0.9) is params
