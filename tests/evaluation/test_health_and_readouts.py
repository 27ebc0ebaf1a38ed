"""RankMe, the grid readout, clipped regression probes and bootstrap intervals, on data whose answer is known."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mefem_jax.evaluation import bootstrap, rankme
from mefem_jax.evaluation.embeddings import embed_batch, grid_pool, pooling_matrix
from mefem_jax.evaluation.probes import fit_regression_probe
from mefem_jax.weights.encoders import load_encoder


def planted(rng, n, d, singular_values):
    """An [n, d] matrix with mean 0 whose singular values are exactly `singular_values`."""
    k = len(singular_values)
    u, _ = np.linalg.qr(rng.standard_normal((n, k + 1)))
    u = u[:, :k] - u[:, :k].mean(0)  # centred columns ...
    u, _ = np.linalg.qr(u)           # ... re-orthonormalised (still centred: the span is)
    v, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return (u * np.asarray(singular_values)) @ v.T


@pytest.mark.parametrize("k", [1, 3, 10, 32])
def test_rankme_of_k_equal_directions_is_k(k):
    x = planted(np.random.default_rng(k), 200, 32, [5.0] * k)
    assert rankme.rankme(x) == pytest.approx(k, rel=1e-6)
    # The shared mean is not a direction: shifting every row changes nothing.
    assert rankme.rankme(x + 100.0) == pytest.approx(k, rel=1e-6)


def test_rankme_by_hand_and_degenerate_inputs():
    # singular values (2, 1, 1): p = (.5, .25, .25), entropy = 1.5 log 2, rank = 2^1.5
    x = planted(np.random.default_rng(0), 50, 8, [2.0, 1.0, 1.0])
    assert rankme.rankme(x) == pytest.approx(2 ** 1.5, rel=1e-6)
    assert rankme.rankme(np.ones((10, 4))) == 1.0
    with pytest.raises(ValueError):
        rankme.rankme(np.ones((1, 4)))


def test_token_stats_sum_over_batches_to_the_rank_of_all_tokens():
    rng = np.random.default_rng(1)
    x = planted(rng, 300, 16, [4.0, 3.0, 2.0, 1.0, 0.5]) + rng.standard_normal(16)
    parts = [rankme.TokenStats(len(p), p.sum(0), p.T @ p) for p in np.array_split(x, 7)]
    total = sum(parts[1:], parts[0])
    assert total.count == 300
    assert total.rankme() == pytest.approx(rankme.rankme(x), rel=1e-6)


def test_collapse_warnings_relative_to_the_peak_and_absolute_without_history():
    # The 3,000-step :cpu run's CLS ranks: up from init, then down to under half of the peak (never
    # under half of the first value, which is what the watch used to compare against).
    watch = rankme.CollapseWatch()
    assert watch.check({"rankme_cls": 9.2, "rankme_patch": 30.0}) == []  # the first probe: no reference
    assert watch.check({"rankme_cls": 11.7, "rankme_patch": 32.0}) == []  # the peak
    assert watch.check({"rankme_cls": 7.9, "rankme_patch": 32.9}) == []  # 7.9 > 5.85: not halved
    lines = watch.check({"rankme_cls": 5.5, "rankme_patch": 35.7})
    assert lines == ["rankme_cls = 5.5 fell below 50% of its peak 11.7 in this run: the representation is "
                     "losing dimensions (collapse?)"]
    assert rankme.low_rank_warnings({"rankme_cls": 1.5, "rankme_mean": 8.0}) == [
        "rankme_cls = 1.50 is below 2.0: the embeddings lie nearly on a line (collapsed)"]


def test_collapse_watch_keeps_a_resumed_runs_peak_from_its_logged_history():
    history = [{"step": 0, "loss": 0.4, "rankme_cls": 9.2}, {"step": 25, "loss": 0.3},
               {"step": 500, "rankme_cls": 11.7, "rankme_mean": None}]
    resumed = rankme.CollapseWatch(history)
    assert resumed.reference == {"rankme_cls": 11.7}
    assert len(resumed.check({"rankme_cls": 5.5, "rankme_mean": 9.4})) == 1  # cls only: mean has no peak yet
    assert rankme.CollapseWatch().check({"rankme_cls": 5.5}) == []  # without the history it cannot know


def test_pooling_matrix_bins():
    p = pooling_matrix(14, 3)  # uneven: 14/3 cells a bin
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_allclose(p.sum(0) * 14 / 3, 1.0)  # every cell weighs the same in total
    np.testing.assert_allclose(pooling_matrix(4, 2), [[.5, .5, 0, 0], [0, 0, .5, .5]])
    np.testing.assert_allclose(pooling_matrix(5, 1), np.full((1, 5), 0.2))


def test_grid_readout_shape_layout_and_mean_at_one():
    b, gh, gw, d = 3, 4, 4, 5
    x = jax.random.normal(jax.random.key(0), (b, gh * gw, d))
    g2 = np.asarray(grid_pool(x, (gh, gw), 2)).reshape(b, 2, 2, d)
    cells = np.asarray(x).reshape(b, gh, gw, d)
    np.testing.assert_allclose(g2[:, 0, 1], cells[:, :2, 2:].mean((1, 2)), rtol=1e-6)  # top-right quarter
    np.testing.assert_allclose(g2[:, 1, 0], cells[:, 2:, :2].mean((1, 2)), rtol=1e-6)  # bottom-left
    np.testing.assert_allclose(np.asarray(grid_pool(x, (gh, gw), 1)), np.asarray(jnp.mean(x, 1)), rtol=1e-6)


def test_embed_batch_grid_and_token_stats(utkface_dir):
    from mefem_jax.evaluation.data import open_eval_data

    model = load_encoder("random:vitti@64:width=64,depth=2,heads=2")
    images = np.concatenate([b["image"] for b in open_eval_data(f"{utkface_dir}:split=test,sample=6", 64, 6).batches()])
    out = embed_batch(model.params, images, encoder=model.encoder, pixel_size=16, grid_size=1)
    np.testing.assert_allclose(out["grid"], out["mean"], rtol=1e-5, atol=1e-6)
    out3 = embed_batch(model.params, images, 4, encoder=model.encoder, pixel_size=16, grid_size=3)
    assert out3["grid"].shape == (6, 9 * 64)
    tokens = np.asarray(model.encoder.apply({"params": model.params}, images))[:4, 1:].reshape(-1, 64)
    assert float(out3["token_count"]) == len(tokens)  # rows past n_valid (padding) are left out
    np.testing.assert_allclose(out3["token_gram"], tokens.T @ tokens, rtol=1e-4, atol=1e-3)
    stats = rankme.TokenStats(float(out3["token_count"]), np.asarray(out3["token_sum"], np.float64),
                              np.asarray(out3["token_gram"], np.float64))
    assert stats.rankme() == pytest.approx(rankme.rankme(tokens), rel=1e-3)


def test_regression_predictions_are_clipped_to_the_training_range():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    y = 40.0 + 10.0 * x[:, 0]
    x_test = rng.standard_normal((20, 8))
    x_test[:3, 0] = [-35.0, 35.0, 60.0]  # faces whose features sit tens of sigmas out
    res = fit_regression_probe(x, y, x_test, 40.0 + 10.0 * x_test[:, 0])
    assert res.y_pred.min() >= y.min() and res.y_pred.max() <= y.max()
    assert res.y_pred[0] == pytest.approx(y.min()) and res.y_pred[1] == pytest.approx(y.max())
    np.testing.assert_allclose(res.y_pred[3:], 40.0 + 10.0 * x_test[3:, 0], atol=0.5)


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 3200):
        y = rng.normal(40, 15, n)
        pred = y + rng.normal(0, 8, n)
        lo, hi = bootstrap.regression_intervals(y, pred)["mae"]
        assert lo < np.abs(pred - y).mean() < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(n): 4x narrower for 16x the rows
    labels = rng.integers(0, 2, 500)
    scores = np.stack([1 - labels * 0.8 - 0.1, labels * 0.8 + 0.1], 1)
    scores[:50] = scores[:50, ::-1]  # 10 % wrong
    ci = bootstrap.classification_intervals(labels, scores, n_boot=200)
    assert ci["accuracy"][0] < 0.9 < ci["accuracy"][1]
    assert 0.5 < ci["roc_auc"][0] <= ci["roc_auc"][1] <= 1.0


@pytest.mark.parametrize("n_classes", [2, 4])
def test_bootstrap_auc_equals_sklearn_on_every_resample(n_classes):
    """The vectorised rank-sum AUC against roc_auc_score resample by resample, with tied scores, a class
    missing from some resamples (4 classes, one rare) and resamples holding a single class (n = 3)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(n_classes)
    for n in (60, 3):
        y = rng.choice(n_classes, n, p=[0.5, 0.5] if n_classes == 2 else [0.45, 0.3, 0.22, 0.03])
        scores = np.round(rng.dirichlet(np.ones(n_classes), n) + 0.3 * np.eye(n_classes)[y], 1)  # ties
        idx = bootstrap._resamples(n, 50, seed=3)
        fast = bootstrap._resampled_aucs(y, scores, idx)
        for row, i in zip(fast, idx):
            present = np.unique(y[i])
            if len(present) < 2:
                assert np.isnan(row)
            elif n_classes == 2:
                assert row == pytest.approx(roc_auc_score(y[i], scores[i, 1]), abs=1e-12)
            else:
                assert row == pytest.approx(np.mean([roc_auc_score(y[i] == c, scores[i, c]) for c in present]),
                                            abs=1e-12)


def test_paired_difference_is_narrower_than_unpaired_and_centred_on_the_gap():
    rng = np.random.default_rng(1)
    hardness = rng.exponential(10.0, 2000)  # per-face difficulty both encoders share
    a = hardness + rng.normal(0.0, 1.0, 2000)
    b = hardness + 0.3 + rng.normal(0.0, 1.0, 2000)  # b is worse by 0.3 on every face
    d = bootstrap.paired_difference(a, b)
    assert d["low"] < -0.3 < d["high"] < 0 and d["difference"] == pytest.approx(np.mean(a - b))
    unpaired = bootstrap.regression_intervals(np.zeros(2000), a)["mae"]  # a's own interval
    assert d["high"] - d["low"] < (unpaired[1] - unpaired[0]) / 4
    with pytest.raises(ValueError):
        bootstrap.paired_difference(a, b[:10])


def test_a_resumed_pretraining_run_reads_its_logged_rows_once_for_the_watch(tmp_path):
    from mefem_jax.train import _history

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "rankme_cls": 9.2}\n{"step": 500, "rankme_cls": 11.7}\n')
    cache: dict = {}
    assert _history(tmp_path, cache) == [{"step": 0, "rankme_cls": 9.2}, {"step": 500, "rankme_cls": 11.7}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "rankme_cls": 1.0}\n')  # rows logged by this process
    assert _history(tmp_path, cache)[-1]["step"] == 500  # ... do not replace what it started with
    assert _history(tmp_path / "fresh", {}) == [] and _history(None, {}) == []
