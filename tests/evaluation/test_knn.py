"""Weighted kNN against a brute-force float64 reference written out plainly, on random data and on real faces."""
import numpy as np
import pytest

from helpers.faces import pixel_embeddings
from mefem_jax.evaluation import bootstrap
from mefem_jax.evaluation.embeddings import Embeddings
from mefem_jax.evaluation.knn import KnnError, knn_probe, knn_regress, knn_scores
from mefem_jax.evaluation.probes import classification_metrics, regression_metrics
from mefem_jax.evaluation.targets import Target, TargetError

T = 0.07


def brute_force(train_x, train_y, test_x, k, temperature=T, n_classes=None):
    """For every test row: cosine similarity to every train row, all of them sorted, the k best vote
    with exp(similarity / T). Returns class probabilities [n, C] or weighted means [n]."""
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_unit = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    out = []
    for row in test_x:
        sims = train_unit @ (row / np.linalg.norm(row))
        best = np.argsort(-sims)[:k]
        weights = np.exp(sims[best] / temperature)
        if n_classes is None:
            out.append(np.sum(weights * train_y[best]) / np.sum(weights))
        else:
            votes = np.zeros(n_classes)
            for j, w in zip(best, weights):
                votes[train_y[j]] += w
            out.append(votes / votes.sum())
    return np.array(out)


@pytest.mark.parametrize("k, chunk, dtype, temperature", [
    (1, 32, np.float64, T), (10, 32, np.float64, T), (10, 1, np.float64, T), (10, 1024, np.float64, 0.5),
    (200, 32, np.float64, T), (500, 32, np.float64, T), (10, 32, np.float32, T)])
def test_scores_and_regression_match_brute_force(k, chunk, dtype, temperature):
    rng = np.random.default_rng(k + chunk)
    # 130 test rows: not a multiple of 32, so the last chunk is short; k=500 > 200 train rows: all vote.
    train_x, test_x = rng.standard_normal((200, 16)) + 0.3, rng.standard_normal((130, 16)) + 0.3
    train_y = rng.integers(0, 3, 200)
    values = rng.normal(40.0, 15.0, 200)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-6)
    scores = knn_scores(train_x.astype(dtype), train_y, test_x.astype(dtype), 3, k, temperature, chunk=chunk)
    np.testing.assert_allclose(scores, brute_force(train_x, train_y, test_x, k, temperature, n_classes=3), **tol)
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-12)
    pred = knn_regress(train_x.astype(dtype), values, test_x.astype(dtype), k, temperature, chunk=chunk)
    np.testing.assert_allclose(pred, brute_force(train_x, values, test_x, k, temperature), **tol)


def test_bad_k_and_temperature():
    x = np.eye(3)
    with pytest.raises(KnnError, match="k >= 1, got k=0"):
        knn_scores(x, np.array([0, 1, 1]), x, 2, 0)
    with pytest.raises(KnnError, match="temperature > 0"):
        knn_regress(x, np.arange(3.0), x, 2, temperature=0.0)


@pytest.fixture(scope="module")
def utk():
    """(train, test) Embeddings of 360 UTKFace faces (labels.csv's split): their 16 px raw pixels as the one
    feature, the labels as CSV text."""
    return pixel_embeddings(360, 16)


@pytest.mark.parametrize("column", ["gender", "race"])
def test_classification_probe_scores_the_brute_force_votes(utk, column):
    train, test = utk
    row, result = knn_probe(Target("classification", (column,)), train, test, "pixels", 10)
    classes = sorted(set(train.labels[column]))
    assert result.classes == classes and row["classes"] == classes
    y_train = np.searchsorted(classes, train.labels[column])
    y_test = np.searchsorted(classes, test.labels[column])
    reference = brute_force(train.features["pixels"], y_train, test.features["pixels"], 10, n_classes=len(classes))
    np.testing.assert_allclose(result.scores, reference, rtol=1e-4, atol=1e-6)  # float32 features
    np.testing.assert_array_equal(result.y_true, y_test)
    expected = classification_metrics(y_test, reference, np.bincount(y_train, minlength=len(classes)))
    assert row["metrics"] == pytest.approx(expected, rel=1e-9)
    assert (row["protocol"], row["k"], row["k_used"], row["temperature"]) == ("knn", 10, 10, T)
    assert (row["n_train"], row["n_test"], row["features"], row["kind"]) == (len(train), len(test), "pixels",
                                                                             "classification")
    assert "note" not in row and "intervals" not in row


def test_regression_probe_skips_missing_labels_and_scores_the_brute_force_mean(utk):
    train, test = utk
    labels = dict(train.labels, age=train.labels["age"].copy())
    labels["age"][:2] = ["", "nan"]
    train = Embeddings(ids=train.ids, features=train.features, labels=labels)
    row, result = knn_probe(Target("regression", ("age",)), train, test, "pixels", 20, seed=3, intervals=True)
    assert (row["n_train"], row["n_missing_train"]) == (len(train) - 2, 2)
    reference = brute_force(train.features["pixels"][2:], labels["age"][2:].astype(float), test.features["pixels"], 20)
    np.testing.assert_allclose(result.y_pred, reference, rtol=1e-5)
    y_test = test.labels["age"].astype(float)
    assert row["metrics"] == pytest.approx(regression_metrics(y_test, reference), rel=1e-5)
    assert row["intervals"] == bootstrap.regression_intervals(y_test, result.y_pred, seed=3)


def test_k_above_the_train_rows_uses_them_all_and_says_so(utk):
    train, test = utk
    few = Embeddings(ids=train.ids[:12], features={"pixels": train.features["pixels"][:12]},
                     labels={"gender": train.labels["gender"][:12]})
    row, result = knn_probe(Target("classification", ("gender",)), few, test, "pixels", 20)
    assert (row["k"], row["k_used"]) == (20, 12)
    assert row["note"] == "k=20 > 12 labelled train rows: every train row votes (k=12)"
    y_train = np.searchsorted(result.classes, few.labels["gender"])
    reference = brute_force(few.features["pixels"], y_train, test.features["pixels"], 12, n_classes=2)
    np.testing.assert_allclose(result.scores, reference, rtol=1e-4, atol=1e-6)


def test_refusals(utk):
    train, test = utk
    with pytest.raises(TargetError, match="not survival"):
        knn_probe(Target("survival", ("age", "gender")), train, test, "pixels", 10)
    with pytest.raises(KnnError, match="k=0"):
        knn_probe(Target("regression", ("age",)), train, test, "pixels", 0)
    one_class = Embeddings(ids=train.ids, features=train.features, labels={"gender": np.full(len(train), "1")})
    with pytest.raises(TargetError, match="single class"):
        knn_probe(Target("classification", ("gender",)), one_class, test, "pixels", 10)
    unseen = Embeddings(ids=test.ids, features=test.features, labels={"gender": np.full(len(test), "7")})
    with pytest.raises(TargetError, match=r"test labels \['7'\] never occur"):
        knn_probe(Target("classification", ("gender",)), train, unseen, "pixels", 10)
