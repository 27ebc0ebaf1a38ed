"""Probes, survival and verification on constructed data whose answer is known."""
import numpy as np
import pytest

from mefem_jax.evaluation.probes import (ProbeError, blas_threads, classification_metrics, fit_classification_probe,
                              fit_regression_probe, regression_metrics)
from mefem_jax.evaluation.survival import SurvivalError, fit_survival_probe
from mefem_jax.evaluation.verification import (PairsError, best_accuracy, cosine_scores, read_pairs, tar_at_far,
                                    verification_metrics)


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    with blas_threads(1):  # as the CLI runs them; multi-threaded BLAS crawls on a shared 2-core box
        yield


def linear_data(rng, n, d=32, signal=True, classes=None):
    """Features with a planted linear direction (or none) and a target read off it."""
    x = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    score = x @ w / np.sqrt(d) if signal else rng.standard_normal(n)
    if classes is None:
        return x, 3.0 * score + 0.1 * rng.standard_normal(n) + 40.0
    edges = np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1])
    return x, np.array(["abcdefgh"[i] for i in np.digitize(score, edges)])


# ---------------------------------------------------------------------------------------------
# Regression / classification probes
# ---------------------------------------------------------------------------------------------
def test_regression_metrics_by_hand():
    m = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 3.0, 2.0]))
    assert m["mae"] == pytest.approx(0.75)
    assert m["rmse"] == pytest.approx(np.sqrt(5 / 4))
    assert m["r2"] == pytest.approx(1 - 5 / 5)
    assert m["pearson_r"] == pytest.approx(np.corrcoef([1, 2, 3, 4], [1, 3, 3, 2])[0, 1])


def test_ridge_recovers_a_linear_signal():
    rng = np.random.default_rng(0)
    x, y = linear_data(rng, 600)
    res = fit_regression_probe(x[:400], y[:400], x[400:], y[400:])
    assert res.metrics["r2"] > 0.99
    assert res.metrics["pearson_r"] > 0.99
    assert res.metrics["mae"] < 0.2


def test_ridge_without_signal_is_at_chance():
    rng = np.random.default_rng(1)
    x, y = linear_data(rng, 600, signal=False)
    res = fit_regression_probe(x[:400], y[:400], x[400:], y[400:])
    # Cross-validation picks a strong penalty, so the probe predicts ~the train mean.
    assert abs(res.metrics["r2"]) < 0.05
    assert res.penalty["alpha"] >= 1e3


@pytest.mark.parametrize("classes", [2, 4])
def test_logistic_recovers_a_linear_signal(classes):
    rng = np.random.default_rng(classes)
    x, y = linear_data(rng, 800, classes=classes)
    res = fit_classification_probe(x[:500], y[:500], x[500:], y[500:])
    assert res.classes == list("abcd"[:classes])
    assert res.metrics["accuracy"] > (0.93 if classes == 2 else 0.8)
    assert res.metrics["roc_auc"] > 0.97
    assert res.scores.shape == (300, classes)
    np.testing.assert_allclose(res.scores.sum(1), 1.0, rtol=1e-6)


def test_logistic_without_signal_is_at_chance():
    rng = np.random.default_rng(5)
    x, y = linear_data(rng, 800, signal=False, classes=2)
    res = fit_classification_probe(x[:500], y[:500], x[500:], y[500:])
    assert abs(res.metrics["accuracy"] - 0.5) < 0.08
    assert abs(res.metrics["roc_auc"] - 0.5) < 0.08
    assert abs(res.metrics["majority_accuracy"] - 0.5) < 0.08


def test_classification_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 2])
    scores = np.array([[.8, .1, .1], [.3, .6, .1], [.2, .7, .1], [.1, .2, .7], [.1, .1, .8]])
    m = classification_metrics(y, scores, train_counts=np.array([5, 1, 1]))
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["majority_accuracy"] == pytest.approx(2 / 5)  # class 0 is the train majority
    # One-vs-rest AUCs: class 0: positives .8,.3 vs negatives .2,.1,.1 -> 1; class 1: .7,.2 vs
    # .1,.6,.1 -> 5 of 6 pairs ordered (.2 < .6 is not); class 2: .8 vs .1,.1,.1,.7 -> 1.
    assert m["roc_auc"] == pytest.approx((1.0 + 5 / 6 + 1.0) / 3)


def test_classification_probe_refuses_bad_labels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 4))
    y = np.array(["a"] * 10 + ["b"] * 9 + ["c"])
    with pytest.raises(ProbeError, match=r"\['c'\] have a single training example"):
        fit_classification_probe(x, y, x, y)
    with pytest.raises(ProbeError, match="single class"):
        fit_classification_probe(x, np.array(["a"] * 20), x, y)
    with pytest.raises(ProbeError, match=r"test labels \['z'\] never occur"):
        fit_classification_probe(x[:19], y[:19], x[:2], np.array(["a", "z"]))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ProbeError, match="NaN"):
        fit_regression_probe(bad, np.arange(20.0), x, np.arange(20.0))


# ---------------------------------------------------------------------------------------------
# Survival
# ---------------------------------------------------------------------------------------------
# How 4 latent factors show in 48 feature dimensions; shared by train and test.
MIXING = np.random.default_rng(123).standard_normal((4, 48))


def survival_data(rng, n, shuffle=False):
    """Embedding-like features (a few strong factors + noise) and Cox-model times whose log-hazard
    is linear in the first factor; `shuffle` breaks the link between features and hazard."""
    factors = rng.standard_normal((n, 4))
    x = factors @ MIXING + 0.3 * rng.standard_normal((n, 48))
    risk = 1.5 * factors[:, 0]
    if shuffle:
        risk = rng.permutation(risk)
    t = rng.exponential(np.exp(-risk))
    censor = rng.exponential(2.0, n)
    return x, np.minimum(t, censor), (t <= censor).astype(int)


def test_survival_recovers_a_hazard_and_not_a_shuffled_one():
    rng = np.random.default_rng(0)
    small_grid = dict(components=(4, 8), penalizers=(0.1,))
    res = fit_survival_probe(*survival_data(rng, 300), *survival_data(rng, 200), **small_grid)
    assert res.c_index > 0.75
    assert res.n_events_train > 100
    null = fit_survival_probe(*survival_data(rng, 300, True), *survival_data(rng, 200, True), **small_grid)
    assert abs(null.c_index - 0.5) < 0.07


def test_survival_refuses_bad_columns():
    rng = np.random.default_rng(0)
    x, t, e = survival_data(rng, 30)
    with pytest.raises(SurvivalError, match="event must be 0"):
        fit_survival_probe(x, t, np.where(e == 1, 2, 0), x, t, e)
    with pytest.raises(SurvivalError, match="no events"):
        fit_survival_probe(x, t, np.zeros_like(e), x, t, e)
    with pytest.raises(SurvivalError, match="time value"):
        fit_survival_probe(x, -t, e, x, t, e)


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------
def test_tar_at_far_by_hand():
    impostor = np.arange(100) / 100.0            # 0.00 ... 0.99
    genuine = np.array([0.995, 0.985, 0.975, 0.5, 0.2])
    scores = np.concatenate([genuine, impostor])
    same = np.arange(len(scores)) < len(genuine)
    # FAR 1e-2 of 100 impostors: one may pass, so t = the 2nd highest impostor = 0.98, and
    # genuines strictly above it are 0.995 and 0.985.
    tar, t = tar_at_far(scores, same, 1e-2)
    assert t == pytest.approx(0.98) and tar == pytest.approx(2 / 5)
    # FAR 1e-3 cannot be resolved with 100 impostors: t = the highest impostor score, 0.99.
    tar, t = tar_at_far(scores, same, 1e-3)
    assert t == pytest.approx(0.99) and tar == pytest.approx(1 / 5)
    # FAR 5e-2: 5 may pass, t = 6th highest = 0.94 -> three genuines above it.
    assert tar_at_far(scores, same, 5e-2) == (pytest.approx(3 / 5), pytest.approx(0.94))

    m = verification_metrics(scores, same)
    assert m["tar@far=0.01"] == pytest.approx(2 / 5)
    assert m["far_resolvable@far=0.01"] and not m["far_resolvable@far=0.001"]
    assert (m["n_genuine"], m["n_impostor"]) == (5, 100)


def test_best_accuracy_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.6, 0.1])
    same = np.array([True, True, False, True, False, False])
    # Accepting the top two gives 2 + 3 = 5 correct of 6; ties at 0.6 must move together.
    acc, t = best_accuracy(scores, same)
    assert acc == pytest.approx(5 / 6) and t == pytest.approx(0.7)
    assert best_accuracy(np.array([0.5, 0.5]), np.array([True, False]))[0] == pytest.approx(0.5)


def test_cosine_scores_and_missing_ids():
    feats = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    ids = ["a", "b", "c"]
    s = cosine_scores(feats, ids, ["a", "a", "b"], ["b", "c", "c"])
    np.testing.assert_allclose(s, [0.0, np.sqrt(0.5), np.sqrt(0.5)], atol=1e-12)
    with pytest.raises(PairsError, match="2 id.*not in the embedded data: x, y"):
        cosine_scores(feats, ids, ["a", "x"], ["y", "c"])


def test_read_pairs(tmp_path):
    f = tmp_path / "pairs.txt"
    f.write_text("id_a,id_b,same\n# a comment\na.jpg,b.jpg,1\n\nc.jpg, d.jpg ,0  # trailing\n")
    ids_a, ids_b, same = read_pairs(f)
    assert (ids_a, ids_b, same.tolist()) == (["a.jpg", "c.jpg"], ["b.jpg", "d.jpg"], [True, False])
    f.write_text("a b TRUE\nc\td\tfalse\n")
    ids_a, _, same = read_pairs(f)
    assert ids_a == ["a", "c"] and same.tolist() == [True, False]
    f.write_text("a b 1\nc d maybe\n")
    with pytest.raises(PairsError, match=r"pairs.txt:2"):
        read_pairs(f)
    with pytest.raises(PairsError, match="does not exist"):
        read_pairs(tmp_path / "nope.txt")
