"""What the head predicts: the targets as logit columns, their label encoding, loss and decoding.

    --config.target=age:regression,gender:classification   ->   columns [age | gender=0, gender=1]

Every target gets a slice of one linear head (`Output.index`, `Output.size`): a regression target one
column, a classification target one per class. Regression labels are standardised with the train split's
mean and standard deviation, so the head starts on the scale of its targets whatever their units, and
several targets weigh alike in the summed loss; `Output.mean` / `std` undo it (they travel in the
export's config.json). Classes are the train split's, sorted as text.

The loss of a batch is the sum over targets of the mean squared error (regression, standardised) or the
softmax cross-entropy (classification), each averaged over the rows that carry that label: a face
labelled for age only still trains the age columns. Everything here is static per run (a tuple of
frozen dataclasses), so the jitted step sees fixed slices.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mefem_jax.evaluation.targets import Target, TargetError, class_labels, missing_labels, numeric, parse_targets

KINDS = ("regression", "classification")


@dataclasses.dataclass(frozen=True)
class Output:
    name: str                  # the label column
    kind: str                  # "regression" | "classification"
    index: int                 # first logit column
    size: int                  # number of logit columns
    mean: float = 0.0          # regression: label = logit * std + mean
    std: float = 1.0
    classes: tuple[str, ...] = ()  # classification: class of each column

    def as_json(self) -> dict:
        row = {"name": self.name, "kind": self.kind, "index": self.index, "size": self.size}
        if self.kind == "regression":
            row.update(mean=self.mean, std=self.std)
        else:
            row["classes"] = list(self.classes)
        return row

    @staticmethod
    def from_json(row: dict) -> "Output":
        return Output(row["name"], row["kind"], int(row["index"]), int(row["size"]), float(row.get("mean", 0.0)),
                      float(row.get("std", 1.0)), tuple(row.get("classes", ())))


def parse_fine_tune_targets(text: str) -> list[Target]:
    """`--config.target` in evaluate's grammar, regression and classification kinds only."""
    targets = parse_targets(text)
    other = [t.name for t in targets if t.kind not in KINDS]
    if other:
        raise TargetError(f"target: fine-tuning takes regression and classification targets; {other} are not")
    return targets


def plan_outputs(targets: Sequence[Target], labels: dict[str, np.ndarray], where: str = "train") -> tuple[Output, ...]:
    """The head's columns, from the train split's labels; a target with nothing to learn is refused."""
    outputs, index = [], 0
    for target in targets:
        column = target.columns[0]
        if column not in labels:
            raise TargetError(f"target column {column!r} is not in the {where} data; its labels are "
                              f"{sorted(k for k in labels if k not in ('image', 'id'))}")
        values = labels[column][~missing_labels(labels[column])]
        if len(values) == 0:
            raise TargetError(f"target {column!r}: no labelled rows in the {where} split")
        if target.kind == "regression":
            y = numeric(values, column, where)
            y = y[np.isfinite(y)]
            if len(y) < 2 or np.ptp(y) == 0:
                raise TargetError(f"target {column!r}: the {where} split has a single value ({y[0]:g}); "
                                  "nothing to learn")
            outputs.append(Output(column, "regression", index, 1, float(y.mean()), float(y.std())))
            index += 1
        else:
            classes = tuple(sorted(set(class_labels(values).tolist())))
            if len(classes) < 2:
                raise TargetError(f"target {column!r}: the {where} split has a single class ({classes[0]}); "
                                  "nothing to learn")
            outputs.append(Output(column, "classification", index, len(classes), classes=classes))
            index += len(classes)
    return tuple(outputs)


def num_logits(outputs: Sequence[Output]) -> int:
    return sum(o.size for o in outputs)


def encode_labels(outputs: Sequence[Output], labels: dict[str, np.ndarray]) -> np.ndarray:
    """float32 [n, len(outputs)]: standardised values, class indices (as floats), NaN where unlabelled.
    A class the train split never saw is unlabelled for the loss (and counted by the caller's metrics)."""
    n = len(next(iter(labels.values())))
    encoded = np.full((n, len(outputs)), np.nan, np.float32)
    for j, out in enumerate(outputs):
        values = labels[out.name]
        present = ~missing_labels(values)
        if out.kind == "regression":
            y = np.full(n, np.nan)
            y[present] = numeric(values[present], out.name, "labelled")
            encoded[:, j] = (y - out.mean) / out.std
        else:
            text = np.where(present, class_labels(values), "")  # typed (float) labels: 1.0 is class "1"
            lookup = {c: i for i, c in enumerate(out.classes)}
            encoded[:, j] = [lookup.get(t, np.nan) for t in text.tolist()]
    return encoded


def loss(outputs: Sequence[Output], logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Summed per-target loss of a batch (see the module docstring) and each target's term."""
    total, terms = 0.0, {}
    for j, out in enumerate(outputs):
        y = labels[:, j]
        has = jnp.isfinite(y)
        count = jnp.maximum(jnp.sum(has), 1)
        cols = logits[:, out.index:out.index + out.size]
        if out.kind == "regression":
            per_row = jnp.square(cols[:, 0] - jnp.where(has, y, 0.0))
        else:
            cls = jnp.where(has, y, 0).astype(jnp.int32)
            per_row = -jnp.take_along_axis(jax.nn.log_softmax(cols), cls[:, None], axis=1)[:, 0]
        term = jnp.sum(jnp.where(has, per_row, 0.0)) / count
        terms[f"loss_{out.name}"] = term
        total = total + term
    return total, terms


def decode(out: Output, logits: np.ndarray) -> np.ndarray:
    """One target's predictions from the head's logits: values in the label's units, or class
    probabilities [n, classes]."""
    cols = np.asarray(logits, np.float64)[:, out.index:out.index + out.size]
    if out.kind == "regression":
        return cols[:, 0] * out.std + out.mean
    cols = cols - cols.max(axis=1, keepdims=True)
    p = np.exp(cols)
    return p / p.sum(axis=1, keepdims=True)
