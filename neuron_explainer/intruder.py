"""Intruder detection: shown k windows, k − 1 where the feature fires and one where it does not, can a judge
tell which one does not belong? No explanation is involved, so it tests how coherent the feature itself is.

In each window the tokens where it is most active (at least half the window's maximum) are marked; the
intruder, a held-out random window where the feature is (nearly) silent, gets as many marks at random places,
so the number of marks gives nothing away. Windows come from the held-out examples (quantile samples and the
scoring top examples), never from those shown to the explainer. The score is the share of trials the judge
gets right; chance is 1/k.

The offline judge picks the window whose marked tokens overlap least with the other windows' marked tokens
(ties broken at random): it succeeds when a feature fires on recurring tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neuron_explainer.records import ActivationRecord, FeatureRecord

Window = tuple[list[str], list[bool]]  # tokens and which are marked


@dataclass
class IntruderTrial:
    windows: list[Window]
    intruder: int  # position of the intruder among the windows


def _marks(record: ActivationRecord) -> list[bool]:
    a = np.asarray(record.activations, dtype=np.float64)
    return ((a > 0) & (a >= 0.5 * a.max())).tolist() if a.size and a.max() > 0 else [False] * len(a)


def intruder_trials(record: FeatureRecord, n_trials: int, k: int, rng: np.random.Generator) -> list[IntruderTrial]:
    """Up to n_trials trials of k windows; none when there are fewer than k − 1 firing windows or no quiet one."""
    firing = [r for r in [*[r for q in record.quantiles for r in q], *record.test_top] if r.max_activation > 0]
    quiet = sorted(record.test_random, key=lambda r: r.max_activation)[: max(1, len(record.test_random) // 2)]
    if len(firing) < k - 1 or not quiet or quiet[0].max_activation >= 0.5 * record.max_activation > 0:
        return []
    trials = []
    for _ in range(n_trials):
        chosen = [firing[i] for i in rng.choice(len(firing), size=k - 1, replace=False)]
        windows = [(list(r.tokens), _marks(r)) for r in chosen]
        odd = quiet[int(rng.integers(len(quiet)))]
        n_marks = max(1, round(np.mean([sum(m) for _, m in windows])))
        marks = np.zeros(len(odd.tokens), dtype=bool)
        marks[rng.choice(len(odd.tokens), size=min(n_marks, len(odd.tokens)), replace=False)] = True
        position = int(rng.integers(k))
        windows.insert(position, (list(odd.tokens), marks.tolist()))
        trials.append(IntruderTrial(windows, position))
    return trials


def offline_guess(windows: Sequence[Window], rng: np.random.Generator) -> int:
    """The window whose marked tokens are least shared with the others' (random among ties)."""
    marked = [{t for t, m in zip(toks, marks, strict=True) if m} for toks, marks in windows]
    overlap = np.array(
        [sum(len(s & o) for j, o in enumerate(marked) if j != i) / max(len(s), 1) for i, s in enumerate(marked)]
    )
    lowest = np.flatnonzero(overlap == overlap.min())
    return int(rng.choice(lowest))


def intruder_score(trials: Sequence[IntruderTrial], guesses: Sequence[int | None]) -> float | None:
    """Share of trials whose answer names the intruder (unparsed answers count as wrong); None without trials."""
    if not trials:
        return None
    return float(np.mean([g == t.intruder for t, g in zip(trials, guesses, strict=True)]))
