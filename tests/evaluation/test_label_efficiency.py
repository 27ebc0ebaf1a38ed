"""Label-efficiency curves on the raw pixels of real faces: reproducible nested stratified draws, capping,
refusals, each point equal to the probe fitted directly on its draw, and the plot."""
import json

import numpy as np
import pytest

from helpers.faces import pixel_embeddings
from mefem_jax.evaluation.embeddings import Embeddings
from mefem_jax.evaluation.knn import knn_probe
from mefem_jax.evaluation.label_efficiency import (ShotsError, draw_rows, label_efficiency, parse_shots,
                                                   plot_label_efficiency)
from mefem_jax.evaluation.probes import blas_threads
from mefem_jax.evaluation.targets import Target, TargetError, probe_target

RACE = Target("classification", ("race",))
AGE = Target("regression", ("age",))


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    with blas_threads(1):  # as the CLI runs the probes
        yield


@pytest.fixture(scope="module")
def utk():
    """(train, test) Embeddings of 360 UTKFace faces (labels.csv's split: 281 / 79; train race counts
    117, 55, 52, 38, 19): their 8 px raw pixels, the labels as CSV text."""
    return pixel_embeddings(360, 8)


@pytest.fixture(scope="module")
def race_rows(utk):
    return label_efficiency(RACE, *utk, "pixels", [2, 20, None], seeds=2, seed=5)


def test_parse_shots():
    assert parse_shots("10,100, 1000,ALL") == [10, 100, 1000, None]
    for bad, message in (("", "''"), ("10,x", "'x'"), ("0", "'0'"), ("-5", "'-5'"), ("10,10", "twice")):
        with pytest.raises(ShotsError, match=message):
            parse_shots(bad)


def test_draws_are_stratified_nested_and_reproducible():
    y = np.array(list("a" * 30 + "b" * 7 + "c" * 12))
    for n in (1, 5, 10):
        drawn = draw_rows(y, "classification", n, 0, 2)
        assert {c: int(np.sum(y[drawn] == c)) for c in "abc"} == {"a": n, "b": min(n, 7), "c": min(n, 12)}
        assert set(draw_rows(y, "classification", 1, 0, 2)) <= set(drawn)  # nested
        np.testing.assert_array_equal(drawn, draw_rows(y, "classification", n, 0, 2))
    assert not np.array_equal(draw_rows(y, "classification", 5, 0, 0), draw_rows(y, "classification", 5, 0, 1))
    assert not np.array_equal(draw_rows(y, "classification", 5, 0, 0), draw_rows(y, "classification", 5, 1, 0))
    assert len(draw_rows(y, "regression", 9, 0, 0)) == 9
    np.testing.assert_array_equal(draw_rows(y, "regression", None, 0, 0), np.arange(len(y)))


def test_race_curve_rows(utk, race_rows):
    train, test = utk
    assert [(r["n"], r["protocol"]) for r in race_rows] == [
        (n, p) for n in (2, 20, "all") for p in ("linear", "knn")]
    sizes = {"0": 117, "1": 55, "2": 38, "3": 52, "4": 19}
    for r in race_rows:
        n = len(train) if r["n"] == "all" else r["n"]
        assert r["n_per_class"] == {c: min(n, m) for c, m in sizes.items()}
        assert r["n_train"] == sum(r["n_per_class"].values()) and r["n_test"] == len(test)
        assert r["capped"] == (r["n"] == 20)
        assert r["seeds"] == (1 if r["n"] == "all" else 2)
        assert r["headline"] == "accuracy" and set(r["metrics"]) == {"accuracy", "roc_auc", "majority_accuracy"}
        acc = r["metrics"]["accuracy"]
        assert acc["mean"] == pytest.approx(np.mean(acc["per_seed"]))
        if r["seeds"] > 1:
            assert acc["sd"] == pytest.approx(np.std(acc["per_seed"], ddof=1))
        else:
            assert np.isnan(acc["sd"])
    assert race_rows[2]["note"] == "n=20 per class: {'4': 19} have fewer train rows (all of theirs used)"
    assert (race_rows[1]["k"], race_rows[1]["k_used"]) == (10, 10)
    assert len(race_rows[0]["penalty"]) == 2


def test_each_point_is_the_probe_fitted_on_its_draw(utk, race_rows):
    train, test = utk
    drawn = draw_rows(train.labels["race"], "classification", 20, 5, 1)  # every train row has a race
    subset = Embeddings(ids=train.ids[drawn], features={"pixels": train.features["pixels"][drawn]},
                        labels={"race": train.labels["race"][drawn]})
    linear, _ = probe_target(RACE, subset, test, "pixels", seed=6)  # repeat 1 folds with seed + 1
    nearest, _ = knn_probe(RACE, subset, test, "pixels", 10)
    assert race_rows[2]["metrics"]["accuracy"]["per_seed"][1] == linear["metrics"]["accuracy"]
    assert race_rows[2]["penalty"][1] == linear["penalty"]
    assert race_rows[3]["metrics"]["roc_auc"]["per_seed"][1] == nearest["metrics"]["roc_auc"]
    full, _ = knn_probe(RACE, train, test, "pixels", 10)  # "all" is one fit on every train row
    assert race_rows[5]["metrics"]["accuracy"]["per_seed"] == [full["metrics"]["accuracy"]]


def test_same_seed_same_rows_other_seed_other_draws(utk, race_rows):
    # kNN only: the linear points were refitted above; this is about the draws (and costs no logistic fits).
    again = label_efficiency(RACE, *utk, "pixels", [2, 20, None], seeds=2, protocols=("knn",), seed=5)
    assert json.dumps(again) == json.dumps(race_rows[1::2])
    other = label_efficiency(RACE, *utk, "pixels", [2, 20], seeds=2, protocols=("knn",), seed=6)
    for mine, theirs in zip(other, race_rows[1::2]):
        assert mine["metrics"]["accuracy"]["per_seed"] != theirs["metrics"]["accuracy"]["per_seed"]


def test_regression_curve_and_refusals(utk):
    train, test = utk
    rows = label_efficiency(AGE, train, test, "pixels", [5, 500], seeds=2)
    assert [(r["n"], r["protocol"], r["n_train"], r["seeds"], r["capped"]) for r in rows] == [
        (5, "linear", 5, 2, False), (5, "knn", 5, 2, False),
        (500, "linear", len(train), 1, True), (500, "knn", len(train), 1, True)]
    assert rows[0]["headline"] == "mae" and rows[1]["k_used"] == 5
    assert rows[2]["note"] == f"n=500 > {len(train)} labelled train rows: all used"
    with pytest.raises(ShotsError, match="n=1 is too few labels per class for classification with linear"):
        label_efficiency(RACE, train, test, "pixels", [10, 1])
    assert label_efficiency(RACE, train, test, "pixels", [1], protocols=("knn",))[0]["n_train"] == 5
    with pytest.raises(ShotsError, match="n=2 is too few labels for regression"):
        label_efficiency(AGE, train, test, "pixels", [2])
    with pytest.raises(TargetError, match="not survival"):
        label_efficiency(Target("survival", ("age", "gender")), train, test, "pixels", [10])
    with pytest.raises(ShotsError, match="at least one n"):
        label_efficiency(AGE, train, test, "pixels", [])
    with pytest.raises(ShotsError, match="seeds >= 1"):
        label_efficiency(AGE, train, test, "pixels", [10], seeds=0)


def test_plot(tmp_path, race_rows):
    path = tmp_path / "race_label_efficiency.png"
    rows = race_rows + [{**r, "model": "other", "features": "pixels"} for r in race_rows if r["protocol"] == "knn"]
    plot_label_efficiency(path, "race: 8 px pixels", rows)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="one target"):
        plot_label_efficiency(path, "mixed", race_rows + [{**race_rows[0], "target": "age"}])
