"""Scoring a fine-tuned head: validation metrics during the run (which step is kept), and the test report.

Metrics are evaluate's (evaluation/probes.py): MAE, RMSE, R², Pearson r for regression in the label's
units; accuracy, majority-class accuracy and ROC-AUC for classification. The test report adds
percentile-bootstrap 95 % intervals over the test faces (evaluation/bootstrap.py), as `evaluate` does,
so a fine-tune and a linear probe of the same encoder can be compared row for row.

`eval.select` names the validation number that picks the kept step: `loss` (the summed training loss
on the validation faces, the default: it weighs every target) or one metric, e.g. `age_mae`,
`gender_accuracy`. Losses, MAEs and RMSEs are better lower, everything else higher
(training/kept_step.py, which keeps the step).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mefem_jax.evaluation import bootstrap
from mefem_jax.evaluation.probes import classification_metrics, regression_metrics
from mefem_jax.finetuning.outputs import Output, decode


def _rows(labels: np.ndarray, j: int) -> np.ndarray:
    return np.isfinite(labels[:, j])


def validation_metrics(outputs: Sequence[Output], logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{"loss", "<target>_loss", and per target its metrics} on the encoded labels (outputs.encode_labels)."""
    metrics, total = {}, 0.0
    for j, out in enumerate(outputs):
        rows = _rows(labels, j)
        if not rows.any():
            continue
        cols = logits[rows, out.index:out.index + out.size]
        if out.kind == "regression":
            term = float(np.mean((cols[:, 0] - labels[rows, j]) ** 2))
            y_true = labels[rows, j] * out.std + out.mean
            found = regression_metrics(y_true, decode(out, logits[rows]))
            keep = ("mae", "rmse", "r2")
        else:
            y = labels[rows, j].astype(np.int64)
            shifted = cols - cols.max(1, keepdims=True)
            log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
            term = float(-np.mean(log_p[np.arange(len(y)), y]))
            found = classification_metrics(y, decode(out, logits[rows]))
            keep = ("accuracy", "roc_auc")
        metrics[f"{out.name}_loss"] = term
        metrics.update({f"{out.name}_{k}": found[k] for k in keep})
        total += term
    metrics["loss"] = total
    return metrics


def test_rows(outputs: Sequence[Output], logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[dict]:
    """One report row per target, evaluate's layout: metrics with bootstrap intervals, counts, classes."""
    rows = []
    for j, out in enumerate(outputs):
        keep = _rows(labels, j)
        row = {"target": out.name, "kind": out.kind, "n_test": int(keep.sum()),
               "n_missing_test": int((~keep).sum())}
        if keep.any() and out.kind == "regression":
            y_true, y_pred = labels[keep, j] * out.std + out.mean, decode(out, logits[keep])
            row.update(metrics=regression_metrics(y_true, y_pred),
                       intervals=bootstrap.regression_intervals(y_true, y_pred, seed=seed))
        elif keep.any():
            y, scores = labels[keep, j].astype(np.int64), decode(out, logits[keep])
            row.update(metrics=classification_metrics(y, scores), classes=list(out.classes),
                       intervals=bootstrap.classification_intervals(y, scores, seed=seed))
        rows.append(row)
    return rows


def per_face(outputs: Sequence[Output], logits: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> list[dict]:
    """Each test face's label and prediction (predictions.csv): what paired comparisons need."""
    table = []
    for i, face in enumerate(ids.tolist()):
        row = {"id": face}
        for j, out in enumerate(outputs):
            value = labels[i, j]
            if out.kind == "regression":
                row[out.name] = value * out.std + out.mean if np.isfinite(value) else ""
                row[f"{out.name}_pred"] = float(decode(out, logits[i:i + 1])[0])
            else:
                row[out.name] = out.classes[int(value)] if np.isfinite(value) else ""
                probs = decode(out, logits[i:i + 1])[0]
                row[f"{out.name}_pred"] = out.classes[int(np.argmax(probs))]
        table.append(row)
    return table
