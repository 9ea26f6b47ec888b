"""How sure a comparison of mean scores is: percentile-bootstrap intervals over features, vectorised.

A method's interval resamples its features' scores with replacement; the interval on a difference of two
methods' means resamples each method's features independently (they are different features, not pairs). The
bootstrap seed is fixed, so an interval depends only on the scores. `compare` turns the intervals on
SAE − baseline into a verdict: a baseline is beaten when the whole interval lies above 0, beats the SAE when
it lies below, and is a tie otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LEVEL, N_BOOT, SEED = 0.95, 10_000, 0


def _boot_means(values: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """[n_boot] means of resamples (with replacement) of values [n]."""
    return values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)


def _interval(samples: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))]


def mean_interval(values: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT) -> list[float] | None:
    """The bootstrap interval [low, high] of the mean of values; None for fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return None
    return _interval(_boot_means(v, np.random.default_rng(SEED), n_boot), level)


def difference_interval(
    a: Sequence[float], b: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT
) -> list[float] | None:
    """The bootstrap interval of mean(a) − mean(b), a and b resampled independently; None if either has < 2."""
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(va) < 2 or len(vb) < 2:
        return None
    rng = np.random.default_rng(SEED)
    return _interval(_boot_means(va, rng, n_boot) - _boot_means(vb, rng, n_boot), level)


def compare(
    scores: dict[str, Sequence[float]], reference: str = "sae", level: float = LEVEL
) -> tuple[dict[str, Any], str]:
    """Compares the reference method's mean score with every other method's. Gives ({method: {"difference",
    "interval", "outcome": "beats" | "loses to" | "ties with" | "not compared"}}, a one-line verdict)."""
    ref = list(scores.get(reference, []))
    out: dict[str, Any] = {}
    for method, vals in scores.items():
        if method == reference:
            continue
        interval = difference_interval(ref, vals, level)
        diff = float(np.mean(ref) - np.mean(vals)) if len(ref) and len(vals) else None
        outcome = "not compared"
        if interval is not None:
            outcome = "beats" if interval[0] > 0 else "loses to" if interval[1] < 0 else "ties with"
        out[method] = {"difference": diff, "interval": interval, "outcome": outcome}
    return out, verdict(out, level, reference)


def verdict(comparisons: dict[str, Any], level: float = LEVEL, reference: str = "sae") -> str:
    """One sentence naming the baselines the reference beats, ties with and loses to at this confidence."""
    groups: dict[str, list[str]] = {}
    for method, c in comparisons.items():
        groups.setdefault(c["outcome"], []).append(method)
    if not groups or set(groups) == {"not compared"}:
        return "not enough scored features to compare"
    who = "SAE features" if reference == "sae" else f"{reference} features"
    groups.pop("not compared", None)
    parts = [f"{outcome} {', '.join(methods)}" for outcome, methods in sorted(groups.items())]
    return f"{who} " + "; ".join(parts) + f" (bootstrap {level:.0%} intervals on the difference of mean scores)"


def correlation_interval(
    true: Sequence[Sequence[float]],
    pred: Sequence[Sequence[float] | None],
    level: float = LEVEL,
    n_boot: int = 2_000,
) -> list[float] | None:
    """The bootstrap interval of one feature's pooled correlation score (score.pooled_correlation) over its scored
    windows, each resampled whole (a window's tokens are not independent of one another); None with fewer than two
    simulated windows. Vectorised: a resample's correlation comes from the summed per-window moments."""
    pairs = [
        (np.asarray(t, np.float64), np.asarray(p, np.float64)) for t, p in zip(true, pred, strict=True) if p is not None
    ]
    if len(pairs) < 2:
        return None
    moments = np.array([[len(t), t.sum(), p.sum(), t @ t, p @ p, t @ p] for t, p in pairs])  # [windows, 6]
    rng = np.random.default_rng(SEED)
    draws = rng.multinomial(len(pairs), np.full(len(pairs), 1 / len(pairs)), size=n_boot)  # [n_boot, windows]
    n, sx, sy, sxx, syy, sxy = (draws @ moments).T
    var_x, var_y, cov = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
    defined = var_x > 1e-12 * np.maximum(sxx, 1e-300)  # constant true activations: no correlation (as the score)
    r = np.where(var_y > 1e-12 * np.maximum(syy, 1e-300), cov / np.sqrt(np.clip(var_x * var_y, 1e-300, None)), 0.0)
    if defined.sum() < 2:
        return None
    return _interval(r[defined], level)
