"""The head's columns: planning from real labels, encoding, the masked loss against numpy, decoding, and the
one-line refusals of targets with nothing to learn."""
from __future__ import annotations

import numpy as np
import pytest

from helpers.faces import utkface_rows
from mefem_jax.evaluation.targets import TargetError
from mefem_jax.finetuning import outputs as outputs_lib


def _labels(rows):
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def test_columns_loss_and_decoding_on_utkface_labels():
    labels = _labels(utkface_rows(300))
    labels["age"][:7] = ""  # unlabelled for age only
    targets = outputs_lib.parse_fine_tune_targets("age:regression,race:classification")
    outs = outputs_lib.plan_outputs(targets, labels)
    age, race = outs
    assert (age.index, age.size, race.index, race.size) == (0, 1, 1, 5) and race.classes == ("0", "1", "2", "3", "4")
    ages = labels["age"][7:].astype(float)
    assert age.mean == pytest.approx(ages.mean()) and age.std == pytest.approx(ages.std())

    y = outputs_lib.encode_labels(outs, labels)
    assert np.isnan(y[:7, 0]).all() and np.isfinite(y[7:]).all()
    logits = np.random.default_rng(0).normal(size=(300, outputs_lib.num_logits(outs))).astype(np.float32)
    total, terms = outputs_lib.loss(outs, logits, y)
    # float64 reference: MSE over age-labelled rows + cross-entropy over all rows
    mse = np.mean((logits[7:, 0] - y[7:, 0]) ** 2)
    z = logits[:, 1:].astype(np.float64)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    ce = -np.mean(log_p[np.arange(300), y[:, 1].astype(int)])
    assert float(terms["loss_age"]) == pytest.approx(mse, rel=1e-5)
    assert float(terms["loss_race"]) == pytest.approx(ce, rel=1e-5)
    assert float(total) == pytest.approx(mse + ce, rel=1e-5)
    # a perfect regression logit decodes to the label in years
    perfect = np.zeros_like(logits)
    perfect[:, 0] = np.nan_to_num(y[:, 0])
    np.testing.assert_allclose(outputs_lib.decode(age, perfect)[7:], ages, rtol=1e-5)
    assert outputs_lib.decode(race, logits).sum(1) == pytest.approx(np.ones(300))
    assert outputs_lib.Output.from_json(race.as_json()) == race


@pytest.mark.parametrize("column, values, message", [
    ("age", ["30"] * 20, r"target 'age': the train split has a single value \(30\); nothing to learn"),
    ("gender", ["1"] * 20, r"target 'gender': the train split has a single class \(1\); nothing to learn"),
    ("age", ["30", "young"] * 10, r"train column 'age' must be numeric but holds 10 non-numeric value\(s\)"),
    ("weight", None, r"target column 'weight' is not in the train data; its labels are \['age', 'gender'\]"),
])
def test_targets_with_nothing_to_learn_are_one_line(column, values, message):
    labels = {"age": np.array([str(20 + i) for i in range(20)]), "gender": np.array(["0", "1"] * 10)}
    if values is not None:
        labels[column] = np.array(values)
    kind = "classification" if column == "gender" else "regression"
    with pytest.raises(TargetError, match=message):
        outputs_lib.plan_outputs(outputs_lib.parse_fine_tune_targets(f"{column}:{kind}"), labels)


def test_survival_targets_are_not_fine_tuned():
    with pytest.raises(TargetError, match="regression and classification targets"):
        outputs_lib.parse_fine_tune_targets("time,event:survival")
