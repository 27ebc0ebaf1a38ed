"""LP-FT's first stage: a linear probe fitted on the frozen encoder's features, as the head's start.

Kumar et al. (2022, "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution")
show that fine-tuning from a random head lets the early, large gradients of that head rewrite the
pretrained features; starting from a fitted linear probe (LP), the fine-tune (FT) only refines them.
The probe is evaluate's (ridge with leave-one-out alpha; L2 logistic regression with C by held-out
log-loss) on features standardised by `input_stats`: the head keeps that standardisation as its fixed
input (`head.standardize`, finetuning/model.py), or has it folded into its kernel and bias
(weights/classifier.py `fold_standardisation`) to read the raw features like the head it replaces.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegressionCV, RidgeCV

from mefem_jax.evaluation.probes import LOGISTIC_CS, RIDGE_ALPHAS
from mefem_jax.finetuning.outputs import Output, num_logits


def input_stats(features: np.ndarray) -> dict:
    """{"input_mean", "input_std"}: float32 [D], the spread of the frozen features over the train faces
    (a constant dimension gets std 1, so it reads as 0 rather than dividing by 0)."""
    x = np.asarray(features, np.float64)
    sd = x.std(0)
    return {"input_mean": x.mean(0).astype(np.float32), "input_std": np.where(sd > 0, sd, 1.0).astype(np.float32)}


def fit_head(features: np.ndarray, labels: np.ndarray, outputs: Sequence[Output], stats: dict,
             seed: int = 0) -> dict:
    """{"kernel": float32 [D, K], "bias": float32 [K]} on the features standardised by `stats`, fitted
    per target on the rows carrying its label.

    `labels` is outputs.encode_labels' [n, targets] (standardised values, class indices, NaN)."""
    z = (np.asarray(features, np.float64) - stats["input_mean"]) / stats["input_std"]
    weights = np.zeros((z.shape[1], num_logits(outputs)))
    bias = np.zeros(num_logits(outputs))
    for j, out in enumerate(outputs):
        rows = np.isfinite(labels[:, j])
        cols = slice(out.index, out.index + out.size)
        if out.kind == "regression":
            model = RidgeCV(alphas=RIDGE_ALPHAS).fit(z[rows], labels[rows, j])
            weights[:, cols], bias[cols] = model.coef_[:, None], model.intercept_
            continue
        y = labels[rows, j].astype(np.int64)
        with warnings.catch_warnings():  # a weakly penalised candidate may stop early; held-out loss judged it
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.8 announcing 1.10's defaults
            model = LogisticRegressionCV(Cs=list(LOGISTIC_CS), cv=3, scoring="neg_log_loss", max_iter=300,
                                         random_state=seed).fit(z[rows], y)
        coef, intercept = model.coef_, model.intercept_
        if coef.shape[0] == 1:  # binary: one logit z; softmax over [-z/2, z/2] is its sigmoid
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.concatenate([-intercept / 2, intercept / 2])
        full_w, full_b = np.zeros((out.size, z.shape[1])), np.full(out.size, -1e4)  # classes absent from rows
        full_w[model.classes_], full_b[model.classes_] = coef, intercept
        weights[:, cols], bias[cols] = full_w.T, full_b
    return {"kernel": weights.astype(np.float32), "bias": bias.astype(np.float32)}
