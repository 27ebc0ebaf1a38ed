"""Representation health: the effective rank (RankMe) of a set of embeddings.

A JEPA can lose dimensions without losing scale: the target features keep a healthy spread
(`target_std`) while every face moves along the same few directions, which is what a linear probe
then sees. RankMe (Garrido et al., 2023) counts the directions actually used:

    s = singular values of the centred [n, d] embedding matrix,  p = s / sum(s),
    RankMe = exp(-sum p log p)        between 1 (one direction) and min(n, d) (all equal)

We centre first (a deviation from the paper's definition): the mean embedding is the same for every
face, tells a probe nothing, and would otherwise count as a dimension of its own. Everything is in
float64 on the host; the patch-token rank comes from a [d, d] Gram matrix accumulated over every
patch token of every image (`TokenStats`), so it costs nothing extra to keep in memory.

Warnings. What the rank of a healthy encoder is depends on its width, data and readout (a random-
init width-128 ViT embeds UTKFace faces at about 9 (CLS), 8 (mean) and 30 (patch tokens); a
SIGReg-regularised run lifted CLS to 29), so no absolute number suits every model. What does not
depend on them is the signature of dimensional collapse measured in small JEPA runs, ours and the
official I-JEPA code alike: the rank *halves*. It may halve from its value at initialisation within a
few hundred steps, or rise first and halve later: the 3,000-step `:cpu` run's CLS rank went 9.2 (step
0) -> 11.7 (500) -> 5.5 (2,000), never below half its first value, while its CLS probes fell back to
the random init's (docs/RESULTS.md). So:

* during training, a readout whose RankMe falls below `COLLAPSE_RATIO` (1/2) of the highest value it
  had in the run (its peak, the run's logged history included after a resume) is a log warning
  (`CollapseWatch`);
* in a standalone evaluation, where there is no history, only a readout below `MIN_RANK` (2: the
  embeddings essentially on a line) is a warning.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

COLLAPSE_RATIO = 0.5  # warn when a readout's rank falls below this fraction of its peak in the run
MIN_RANK = 2.0        # ... or, with no history, below this


def rank_from_singular_values(s: np.ndarray, eps: float = 1e-12) -> float:
    s = np.clip(np.asarray(s, np.float64), 0.0, None)
    total = s.sum()
    if total <= eps:
        return 1.0  # every embedding identical: one direction at most
    p = s / total
    p = p[p > eps]
    return float(np.exp(-np.sum(p * np.log(p))))


def rankme(x: np.ndarray) -> float:
    """RankMe of the rows of `x` [n, d], after centring."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"rankme needs an [n >= 2, d] matrix, got shape {x.shape}")
    return rank_from_singular_values(np.linalg.svd(x - x.mean(0), compute_uv=False))


@dataclass
class TokenStats:
    """Sufficient statistics of many token embeddings for their centred RankMe: count, sum, Gram."""
    count: float
    total: np.ndarray   # [d]
    gram: np.ndarray    # [d, d], sum of x x^T

    def __add__(self, other: "TokenStats") -> "TokenStats":
        return TokenStats(self.count + other.count, self.total + other.total, self.gram + other.gram)

    def rankme(self) -> float:
        if self.count < 2:
            raise ValueError("rankme needs at least 2 tokens")
        mean = self.total / self.count
        cov = self.gram - self.count * np.outer(mean, mean)  # centred scatter matrix
        eig = np.linalg.eigvalsh((cov + cov.T) / 2.0)
        # Forming the Gram squares the condition number: eigenvalues within rounding of 0 would come
        # back as singular values ~1e-8 of the largest instead of 0. Zero them as an SVD would.
        eig[eig < eig.max() * 1e-12] = 0.0
        return rank_from_singular_values(np.sqrt(eig))


def health(features: dict[str, np.ndarray], tokens: TokenStats | None = None,
           readouts: tuple[str, ...] = ("cls", "mean")) -> dict[str, float]:
    """{"rankme_cls": ..., "rankme_mean": ..., "rankme_patch": ...} for the readouts present."""
    out = {f"rankme_{name}": rankme(features[name]) for name in readouts if name in features}
    if tokens is not None:
        out["rankme_patch"] = tokens.rankme()
    return out


def low_rank_warnings(ranks: dict[str, float], reference: dict[str, float] | None = None) -> list[str]:
    """One line per readout that collapsed: below COLLAPSE_RATIO of `reference` (the same readout's
    peak in this run) when given, else below MIN_RANK."""
    lines = []
    for name, value in ranks.items():
        if reference and name in reference:
            floor = COLLAPSE_RATIO * reference[name]
            if value < floor:
                lines.append(f"{name} = {value:.1f} fell below {COLLAPSE_RATIO:.0%} of its peak "
                             f"{reference[name]:.1f} in this run: the representation is losing dimensions (collapse?)")
        elif value < MIN_RANK:
            lines.append(f"{name} = {value:.2f} is below {MIN_RANK}: the embeddings lie nearly on a line (collapsed)")
    return lines


class CollapseWatch:
    """Remembers the peak RankMe of each readout and warns when a later one is under half of it (module
    docstring). `history`: rows logged earlier in the run (metrics.jsonl), so a resumed run keeps its peaks."""

    def __init__(self, history: Iterable[dict] = ()):
        self.reference: dict[str, float] = {}
        for row in history:
            self._remember({k: v for k, v in row.items() if k.startswith("rankme_") and v is not None})

    def _remember(self, ranks: dict[str, float]) -> None:
        for name, value in ranks.items():
            self.reference[name] = max(float(value), self.reference.get(name, float("-inf")))

    def check(self, ranks: dict[str, float]) -> list[str]:
        lines = low_rank_warnings(ranks, self.reference) if self.reference else []
        self._remember(ranks)
        return lines
