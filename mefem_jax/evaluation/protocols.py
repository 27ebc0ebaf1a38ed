"""The protocols `evaluate --protocols` runs on one encoder's train and test embeddings.

    linear    a linear probe per target and readout (targets.probe_target; landmarks.landmark_probe):
              the default, and the one every other table refers to
    knn       DINO's weighted k-nearest-neighbour classifier (a weighted-mean regressor for regression
              targets) for k in knn.K_VALUES (knn.py)
    fewshot   label efficiency: linear and kNN refitted on n labelled training faces (per class for a
              classification), over several seeds (label_efficiency.py)

Each probe's row goes into the report with the encoder's label, and its per-face scores are kept
(`compare.Scored`) so that several encoders can be compared face by face. Subgroup reports
(`--groups`) break down each linear probe's test predictions by sex, race, age band, ...
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mefem_jax.evaluation import knn, label_efficiency, landmarks, subgroups
from mefem_jax.evaluation import report as eval_report
from mefem_jax.evaluation.compare import Scored, per_face_scores
from mefem_jax.evaluation.targets import Target, probe_rows, probe_target

logger = logging.getLogger(__name__)

PROTOCOLS = ("linear", "knn", "fewshot")


class ProtocolError(ValueError):
    """A --protocols value that names no protocol."""


def parse_protocols(names) -> tuple[str, ...]:
    names = tuple(n.strip() for n in names if n.strip())
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown or not names:
        raise ProtocolError(f"--protocols: unknown {unknown} or empty; choose from {','.join(PROTOCOLS)}")
    return names


@dataclass
class Outcome:
    """What the protocols found for one encoder (rows go to report.json; `linear` feeds the plots and
    saliency)."""
    probes: list[dict] = field(default_factory=list)
    fewshot: list[dict] = field(default_factory=list)
    subgroups: list[dict] = field(default_factory=list)
    scored: list[Scored] = field(default_factory=list)
    linear: dict = field(default_factory=dict)   # (target name, feature) -> ProbeResult


@dataclass(frozen=True)
class Plan:
    targets: list[Target]
    features: tuple[str, ...]
    protocols: tuple[str, ...]
    shots: tuple = ()
    fewshot_seeds: int = 3
    groupings: tuple = ()
    min_group: int = 30
    seed: int = 0


def run_protocols(plan: Plan, label: str, emb_train, emb_test) -> Outcome:
    outcome = Outcome()
    for target in plan.targets:
        for feature in plan.features:
            if "linear" in plan.protocols or plan.groupings:
                _linear(plan, target, feature, label, emb_train, emb_test, outcome)
            if "knn" in plan.protocols and target.kind in ("regression", "classification"):
                for k in knn.K_VALUES:
                    row, result = knn.knn_probe(target, emb_train, emb_test, feature, k, seed=plan.seed,
                                                intervals=True)
                    _keep(row, result, label, target, emb_test, outcome)
            if "fewshot" in plan.protocols and target.kind in ("regression", "classification"):
                rows = label_efficiency.label_efficiency(target, emb_train, emb_test, feature, plan.shots,
                                                         seeds=plan.fewshot_seeds, seed=plan.seed)
                outcome.fewshot += [{**r, "model": label} for r in rows]
    return outcome


def _linear(plan: Plan, target: Target, feature: str, label: str, emb_train, emb_test, outcome: Outcome) -> None:
    t0 = time.perf_counter()
    if target.kind == "landmarks":
        row, result = landmarks.landmark_probe(emb_train, emb_test, feature, seed=plan.seed, intervals=True)
    else:
        row, result = probe_target(target, emb_train, emb_test, feature, seed=plan.seed, intervals=True)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["protocol"] = "linear"
    _keep(row, result, label, target, emb_test, outcome)
    outcome.linear[(target.name, feature)] = result
    logger.info("%s: %s [%s] %s: %s", label, target.name, target.kind, feature, row["metrics"])
    if plan.groupings and target.kind in ("regression", "classification"):
        rows = _tested_rows(target, emb_test)
        for grouping in plan.groupings:
            groups = subgroups.group_of_rows(grouping, emb_test.labels)[rows]
            found = subgroups.subgroup_report(target.kind, result, groups, min_size=plan.min_group,
                                                seed=plan.seed)
            outcome.subgroups.append({"model": label, "target": target.name, "kind": target.kind,
                                      "features": feature, "grouping": grouping.name, **found})


def _tested_rows(target: Target, emb_test) -> np.ndarray:
    """Indices of the test rows a probe of `target` scored (those with a usable label), in its order."""
    keep, _, _ = probe_rows(target, emb_test.labels, "test")
    return np.flatnonzero(keep)


def _keep(row: dict, result, label: str, target: Target, emb_test, outcome: Outcome) -> None:
    row["model"] = label
    outcome.probes.append(row)
    per_face = per_face_scores(target.kind, result)
    if per_face is not None:
        outcome.scored.append(Scored(row, emb_test.ids[_tested_rows(target, emb_test)], per_face))


def probe_plots(out: Path, prefix: str, targets: list[Target], outcome: Outcome, features) -> list[str]:
    """The scatter (regression) and ROC (binary classification) plots of the linear probes."""
    written = []
    for target in targets:
        results = {f: outcome.linear[(target.name, f)] for f in features if (target.name, f) in outcome.linear}
        if not results:
            continue
        name = prefix + eval_report.safe_name(target.name)
        if target.kind == "regression":
            eval_report.plot_regression(out / f"{name}_scatter.png", target.name, results)
            written.append(f"{name}_scatter.png")
        elif target.kind == "classification" and all(len(r.classes) == 2 for r in results.values()):
            first = next(iter(results.values()))
            curves = {f: (r.y_true == 1, r.scores[:, 1]) for f, r in results.items()}
            eval_report.plot_roc(out / f"{name}_roc.png", f"{target.name} = {first.classes[1]}", curves)
            written.append(f"{name}_roc.png")
    return written
