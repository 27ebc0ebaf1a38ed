"""Face verification on labelled pairs: cosine similarity, ROC-AUC, accuracy, TAR at fixed FAR.

A pairs file has one pair per line: two image ids and a flag, separated by commas, tabs or
spaces; `1` (or `true`) marks a genuine pair (same person), `0` (or `false`) an impostor pair.
Blank lines and `#` comments are ignored, and a first line whose flag is not a flag is taken as
a header (e.g. `id_a,id_b,same`).

Definitions (so numbers can be checked by hand):
* a pair is *accepted* at threshold t when its score is strictly greater than t;
* FAR(t) = accepted impostors / impostors, TAR(t) = accepted genuines / genuines;
* TAR@FAR=f uses the lowest threshold whose FAR is <= f: with n impostor scores sorted
  descending, k = floor(f * n) of them may pass, so t is the (k+1)-th largest impostor score.
  When f * n < 1 the FAR cannot be resolved below 1/n and t is the largest impostor score;
  `far_resolvable` says whether n >= 1/f.
* best accuracy is the highest accuracy over all thresholds *on these pairs*; it is an optimistic
  figure (the threshold is chosen on the data it is scored on), reported with that threshold.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

FARS = (1e-2, 1e-3)
_SAME = {"1", "true"}
_DIFFERENT = {"0", "false"}


class PairsError(ValueError):
    """A malformed pairs file, or pairs naming images that were not embedded."""


def read_pairs(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """-> (ids_a, ids_b, same) with `same` a bool array."""
    ids_a, ids_b, same = [], [], []
    path = Path(path)
    if not path.is_file():
        raise PairsError(f"pairs file {path} does not exist")
    first_data_line = True
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [f.strip() for f in re.split(r"[,\t]" if re.search(r"[,\t]", line) else r"\s+", line)]
        flag = fields[-1].lower() if len(fields) == 3 else None
        if flag not in _SAME and flag not in _DIFFERENT:
            if first_data_line and len(fields) == 3:
                first_data_line = False
                continue  # a header such as "id_a,id_b,same"
            raise PairsError(f"{path}:{lineno}: expected 'id_a id_b flag' with flag 1 (same "
                             f"person) or 0 (different), got {raw.strip()!r}")
        first_data_line = False
        ids_a.append(fields[0])
        ids_b.append(fields[1])
        same.append(flag in _SAME)
    if not same:
        raise PairsError(f"{path} holds no pairs")
    return ids_a, ids_b, np.asarray(same, bool)


def cosine_scores(features: np.ndarray, ids: list[str], ids_a: list[str], ids_b: list[str]) -> np.ndarray:
    """Cosine similarity of each pair's two embeddings (rows of `features`, named by `ids`)."""
    row = {id_: i for i, id_ in enumerate(ids)}
    missing = sorted({i for i in (*ids_a, *ids_b) if i not in row})
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise PairsError(f"{len(missing)} id(s) named in the pairs file are not in the embedded data: {shown}")
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    a = unit[[row[i] for i in ids_a]]
    b = unit[[row[i] for i in ids_b]]
    return np.sum(a * b, axis=1)


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> tuple[float, float]:
    """(TAR, threshold) at the lowest threshold with FAR <= far (see the module docstring)."""
    impostor = np.sort(scores[~same])[::-1]
    # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from losing one allowed accept.
    k = min(int(math.floor(far * len(impostor) + 1e-9)), len(impostor) - 1)
    threshold = float(impostor[k])
    return float(np.mean(scores[same] > threshold)), threshold


def best_accuracy(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(accuracy, threshold) maximising accuracy of `score > threshold` over all cut points."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    # Cutting after the i-th highest score accepts the first i pairs: correct = genuines among
    # them + impostors after them. Only cuts between distinct scores are realisable.
    tp = np.concatenate([[0], np.cumsum(y)])
    fp = np.concatenate([[0], np.cumsum(~y)])
    correct = tp + (np.sum(~y) - fp)
    valid = np.concatenate([[True], s[:-1] != s[1:], [True]])
    i = int(np.argmax(np.where(valid, correct, -1)))
    # i == 0 accepts none (nothing exceeds the top score); i == n accepts all.
    threshold = float(s[i]) if i < len(s) else float(np.nextafter(s[-1], -np.inf))
    return float(correct[i] / len(s)), threshold


def verification_metrics(scores: np.ndarray, same: np.ndarray, fars: tuple[float, ...] = FARS) -> dict:
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, np.float64)
    same = np.asarray(same, bool)
    if same.all() or not same.any():
        raise PairsError("verification needs both genuine and impostor pairs")
    acc, acc_t = best_accuracy(scores, same)
    out = {"n_pairs": int(len(same)), "n_genuine": int(same.sum()), "n_impostor": int((~same).sum()),
           "roc_auc": float(roc_auc_score(same, scores)), "best_accuracy": acc,
           "best_threshold": acc_t}
    for far in fars:
        tar, t = tar_at_far(scores, same, far)
        out[f"tar@far={far:g}"] = tar
        out[f"threshold@far={far:g}"] = t
        out[f"far_resolvable@far={far:g}"] = bool((~same).sum() >= 1.0 / far)
    return out
