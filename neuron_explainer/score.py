"""Scorers as pure functions over plain lists/arrays (hand-checked in tests).

Correlation scoring (Bills et al. 2023): the Pearson correlation between simulated and true activations, pooled
over every token of the records scored — "top" over the held-out top-activating records, "random" over the random
ones, "all" (top-and-random) over both together. A simulator that predicts a constant scores 0 (it explains
nothing); when the true activations are constant the correlation is undefined and the score is None.

Detection and fuzzing (Paulo et al. 2024): binary judgements per example — does this text contain the feature /
are these highlighted tokens the ones it fires on — scored by balanced accuracy (of predictions) and ROC AUC (of
scores), via scikit-learn. Examples whose answer could not be parsed are left out and counted as parse failures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score


def pooled_correlation(true: Sequence[Sequence[float]], pred: Sequence[Sequence[float] | None]) -> float | None:
    """Pearson correlation over all tokens of all records; records whose prediction is None (unparsed) are skipped."""
    pairs = [(t, p) for t, p in zip(true, pred, strict=True) if p is not None]
    if not pairs:
        return None
    for t, p in pairs:
        if len(t) != len(p):
            raise ValueError(f"a record has {len(t)} true activations but {len(p)} simulated ones")
    x = np.concatenate([np.asarray(t, dtype=np.float64) for t, _ in pairs])
    y = np.concatenate([np.asarray(p, dtype=np.float64) for _, p in pairs])
    if x.size < 2 or np.ptp(x) == 0:
        return None
    if np.ptp(y) == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def correlation_scores(
    top_true: Sequence[Sequence[float]],
    top_pred: Sequence[Sequence[float] | None],
    random_true: Sequence[Sequence[float]],
    random_pred: Sequence[Sequence[float] | None],
) -> dict[str, float | None]:
    """{"top", "random", "all"} correlation scores; "all" pools the top and random records (Bills et al.)."""
    return {
        "top": pooled_correlation(top_true, top_pred),
        "random": pooled_correlation(random_true, random_pred),
        "all": pooled_correlation([*top_true, *random_true], [*top_pred, *random_pred]),
    }


def binary_scores(
    labels: Sequence[int], scores: Sequence[float | None], threshold: float = 0.5
) -> dict[str, float | None]:
    """labels 0/1, scores (None = unparsed) → {"balanced_accuracy", "auc", "parse_failure_rate", "n"}.

    A prediction is positive when its score exceeds `threshold`. Either metric is None when it is undefined
    (nothing parsed; AUC also when only one class is present).
    """
    kept = [(int(lab), float(s)) for lab, s in zip(labels, scores, strict=True) if s is not None]
    n = len(labels)
    out: dict[str, float | None] = {
        "balanced_accuracy": None,
        "auc": None,
        "parse_failure_rate": (n - len(kept)) / n if n else None,
        "n": n,
    }
    if not kept:
        return out
    y = np.array([k[0] for k in kept])
    s = np.array([k[1] for k in kept])
    if len(set(y.tolist())) == 2:
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, s > threshold))
        out["auc"] = float(roc_auc_score(y, s))
    return out


def parse_failure_rate(preds: Sequence[object | None]) -> float | None:
    """Share of None entries (requests whose answer could not be parsed)."""
    return sum(p is None for p in preds) / len(preds) if preds else None
