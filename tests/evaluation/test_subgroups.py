"""--groups subgroup reports on real UTKFace test faces: linear probes of age and gender on 16 px pixels
of a few hundred faces, their metrics split by gender, race and age band and checked against the same
metrics computed on each subset alone, against a direct numpy computation of the worst group and the
gap, and against a brute-force stratified bootstrap."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from helpers.faces import IMAGES, load_faces, require_utkface
from mefem_jax.evaluation import bootstrap
from mefem_jax.evaluation.probes import (blas_threads, classification_metrics, fit_classification_probe,
                                         fit_regression_probe, regression_metrics)
from mefem_jax.evaluation.subgroups import (GroupError, Grouping, check_group_columns, group_of_rows,
                                            left_out_counts, parse_groups, plot_subgroups, subgroup_table,
                                            subgroup_report)

N_BOOT = 20  # bootstrap.py's convention with few replicates: each classification one costs sklearn AUCs (~4 ms)
GROUPS = "gender,race,age_bin=0,20,40,60,120"


@pytest.fixture(scope="module")
def probes():
    """(test labels as read from labels.csv, age regression result, gender classification result)."""
    with open(require_utkface() / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"][::60]  # spread over every age and group
    test = [r for r in rows if r["split"] == "test"][::12]
    x = load_faces([IMAGES / r["file"] for r in train + test], 16).reshape(len(train) + len(test), -1)
    x_train, x_test = x[:len(train)], x[len(train):]
    labels = {c: np.array([r[c] for r in test]) for c in ("age", "gender", "race")}
    with blas_threads(1):
        age = fit_regression_probe(x_train, [float(r["age"]) for r in train], x_test, labels["age"].astype(float))
        gender = fit_classification_probe(x_train, np.array([r["gender"] for r in train]), x_test, labels["gender"])
    return labels, age, gender


def reports(kind, result, labels, **kwargs):
    return {g.name: subgroup_report(kind, result, group_of_rows(g, labels), n_boot=N_BOOT, **kwargs)
            for g in parse_groups(GROUPS)}


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_group_metrics_are_the_subsets_metrics(probes, kind):
    labels, age, gender = probes
    result = age if kind == "regression" else gender
    for grouping in parse_groups(GROUPS):
        groups = group_of_rows(grouping, labels)
        report = subgroup_report(kind, result, groups, min_size=1, seed=3, n_boot=N_BOOT)
        order = ([f"age {lo:g}-{hi:g}" for lo, hi in zip(grouping.edges[:-1], grouping.edges[1:])]
                 if grouping.edges else sorted(set(groups)))  # bins in their edges' order, not the text's
        assert [g["group"] for g in report["groups"]] == [name for name in order if name in set(groups)]
        assert sum(g["n"] for g in report["groups"]) + report["left_out"] == len(groups)
        for g in report["groups"]:
            rows = groups == g["group"]
            assert g["n"] == rows.sum()
            if kind == "regression":
                expected = regression_metrics(age.y_true[rows], age.y_pred[rows])
                intervals = bootstrap.regression_intervals(age.y_true[rows], age.y_pred[rows], N_BOOT, seed=3)
            else:
                expected = classification_metrics(gender.y_true[rows], gender.scores[rows])
                intervals = bootstrap.classification_intervals(gender.y_true[rows], gender.scores[rows], N_BOOT,
                                                               seed=3)
            np.testing.assert_equal(g["metrics"], expected)  # exactly; NaN (a one-class AUC) equals NaN
            np.testing.assert_equal(g["intervals"], intervals)


def test_grammar_bins_and_left_out_rows(probes):
    labels = dict(probes[0])
    assert parse_groups(" gender, race ,age_bin=0,20,40.5, 60 ,race_bin=0,2,4") == [
        Grouping("gender", "gender"), Grouping("race", "race"), Grouping("age_bin", "age", (0, 20, 40.5, 60)),
        Grouping("race_bin", "race", (0, 2, 4))]
    assert parse_groups("age_bin=0,50,120,gender")[1] == Grouping("gender", "gender")  # edges end at a column

    age = labels["age"].copy()
    age[[3, 50, 51]] = ["", "nan", " "]  # missing, as a CSV holds them
    labels["age"] = age
    grouping = parse_groups("age_bin=2,20,40,60,80")[0]
    got = group_of_rows(grouping, labels)
    ages = np.array([float(a) if a.strip() not in ("", "nan") else np.nan for a in age])
    bins = [(2, 20), (20, 40), (40, 60), (60, 80)]
    expected = [next((f"age {lo}-{hi}" for lo, hi in bins if lo <= a < hi or a == hi == 80), "") for a in ages]
    assert got.tolist() == expected
    assert set(got[ages == 20]) == {"age 20-40"} and set(got[ages == 80]) == {"age 60-80"}  # [20, 40), [60, 80]
    assert left_out_counts(grouping, labels) == {"missing": 3, "outside": int(np.sum((ages < 2) | (ages > 80)))}
    assert np.sum(ages < 2) > 0 and np.sum(ages > 80) > 0  # both edges cut real faces off

    # 1 (a typed shard) and "1" (CSV text) are one group; a NaN is missing, not a group of its own.
    typed = group_of_rows(Grouping("gender", "gender"), {"gender": np.array([1.0, np.nan, 0.0, 1.0])})
    assert typed.tolist() == ["gender 1", "", "gender 0", "gender 1"]
    text = group_of_rows(Grouping("gender", "gender"), {"gender": np.array(["1", "0"])})
    assert text.tolist() == typed[[0, 2]].tolist()


@pytest.mark.parametrize("kind,grouping", [("regression", "age_bin"), ("regression", "race"),
                                           ("classification", "race")])
def test_worst_group_and_gap(probes, kind, grouping):
    labels, age, gender = probes
    result = age if kind == "regression" else gender
    groups = group_of_rows(next(g for g in parse_groups(GROUPS) if g.name == grouping), labels)
    per_row = (np.abs(age.y_pred - age.y_true) if kind == "regression"
               else (gender.scores.argmax(1) == gender.y_true).astype(float))
    sized = [g for g in set(groups) - {""} if np.sum(groups == g) >= 20]
    value = {g: per_row[groups == g].mean() for g in sized}
    high, low = max(value, key=value.get), min(value, key=value.get)

    report = subgroup_report(kind, result, groups, min_size=20, seed=7, n_boot=N_BOOT)
    worst = high if kind == "regression" else low
    assert report["worst"]["group"] == worst
    assert report["worst"]["value"] == pytest.approx(value[worst], abs=1e-12)
    gap = report["gap"]
    assert gap["groups"] == [high, low]
    assert gap["difference"] == pytest.approx(value[high] - value[low], abs=1e-12)
    assert gap["low"] < gap["difference"] < gap["high"]
    # Brute force: each group resampled on its own, the same two groups every time.
    rng = np.random.default_rng(7)
    a, b = per_row[groups == high], per_row[groups == low]
    diffs = (a[rng.integers(0, len(a), (N_BOOT, len(a)))].mean(1)
             - b[rng.integers(0, len(b), (N_BOOT, len(b)))].mean(1))
    assert [gap["low"], gap["high"]] == pytest.approx(np.percentile(diffs, [2.5, 97.5]), abs=1e-12)
    assert subgroup_report(kind, result, groups, min_size=20, seed=7, n_boot=N_BOOT)["gap"] == gap
    assert subgroup_report(kind, result, groups, min_size=20, seed=8, n_boot=N_BOOT)["gap"]["low"] != gap["low"]


def test_small_groups_are_too_few(probes):
    labels, age, _ = probes
    groups = group_of_rows(Grouping("race", "race"), labels)
    counts = {g: int(np.sum(groups == g)) for g in set(groups)}
    smallest = min(counts, key=counts.get)
    min_size = counts[smallest] + 1
    assert sorted(counts.values())[1] >= min_size  # only the smallest falls under it
    report = subgroup_report("regression", age, groups, min_size=min_size, n_boot=N_BOOT)
    assert report["too_few"] == [{"group": smallest, "n": counts[smallest]}]
    assert smallest not in [g["group"] for g in report["groups"]] + report["gap"]["groups"]
    assert report["worst"]["group"] != smallest
    lines = subgroup_table([{**report, "target": "age", "grouping": "race", "model": "m", "features": "pixels"}])
    header, row = lines[2], lines[4]
    assert header.count("(n=") == len(counts) and f"{smallest} (n={counts[smallest]})" in header
    assert row.startswith("| m | pixels |") and row.count("too few") == 1

    nobody = subgroup_report("regression", age, groups, min_size=len(groups) + 1, n_boot=N_BOOT)
    assert nobody["groups"] == [] and nobody["worst"] is None and nobody["gap"] is None
    assert len(nobody["too_few"]) == len(counts)
    assert subgroup_table([{**nobody, "target": "age", "grouping": "race"}])[4].count("too few") == len(counts)


@pytest.mark.parametrize("text,words", [
    ("age_bin=0", ["age_bin=0", "at least two"]),
    ("age_bin=0,20,20", ["age_bin=0,20,20", "increasing"]),
    ("gender,age_bin=40,20", ["age_bin=40,20", "increasing"]),
    ("age_bin=0,nan", ["age_bin=0,nan", "finite"]),
    ("age_bin=young,old", ["age_bin=young", "numbers"]),
    ("age=0,20", ["age=0,20", "COLUMN_bin"]),
    ("_bin=0,20", ["_bin=0,20", "COLUMN_bin"]),
    ("gender,,race", ["empty entry"]),
    ("race,race", ["race", "twice"]),
])
def test_bad_groups_are_one_line(text, words):
    with pytest.raises(GroupError) as err:
        parse_groups(text)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words)


def test_bad_columns_and_values_are_one_line(probes):
    labels, age, _ = probes
    with pytest.raises(GroupError, match=r"\['ethnicity'\] not in the test data; its labels are \['age', 'gender'"):
        check_group_columns(parse_groups("gender,ethnicity"), list(labels), "test")
    check_group_columns(parse_groups(GROUPS), list(labels), "test")
    with pytest.raises(ValueError, match="--groups gender_bin: column 'gender' must be numeric"):
        group_of_rows(Grouping("gender_bin", "gender", (0, 1)), {"gender": np.array(["M", "F"])})
    with pytest.raises(GroupError, match="not 'survival'"):
        subgroup_report("survival", age, group_of_rows(Grouping("race", "race"), labels))
    with pytest.raises(GroupError, match="3 group labels"):
        subgroup_report("regression", age, np.array(["a", "b", "c"]))


def test_plot_writes_a_png(probes, tmp_path):
    labels, age, _ = probes
    path = tmp_path / "age_groups.png"
    plot_subgroups(path, "age, pixels: MAE by group", reports("regression", age, labels, min_size=30))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
