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

Threshold: a randomly initialised ViT embeds UTKFace faces at a RankMe of about 10 % of its width
or more on every readout (docs/RESULTS.md), and an I-JEPA run that collapsed to a few dimensions
reads below 5 %. `LOW_RANK_FRACTION` flags the latter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Warn when RankMe falls below this fraction of the embedding width (module docstring).
LOW_RANK_FRACTION = 0.05


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


def low_rank_warnings(ranks: dict[str, float], width: int) -> list[str]:
    """One line per readout whose RankMe is below LOW_RANK_FRACTION of the width."""
    floor = LOW_RANK_FRACTION * width
    return [f"{name} = {value:.1f} is below {LOW_RANK_FRACTION:.0%} of the width {width} ({floor:.1f}): "
            f"the representation uses few directions (dimensional collapse?)"
            for name, value in ranks.items() if value < floor]
