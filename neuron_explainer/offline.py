"""Offline explainer and simulator (the default when no API is configured): token and bigram lookup, no LLM.

The explainer looks at the training windows (top-activating and random) and greedily picks the tokens, or
tokens after a given previous token, whose presence best predicts the activation (pooled correlation over the
training tokens, the same quantity the "all" scorer measures on held-out data). It writes them as a sentence,
e.g. `fires on tokens " the", " a"` or `fires on " York" after " New"`, with 0-10 strengths in parentheses when
they differ. Tokens are written as JSON strings, so the simulator parses the sentence back exactly: it predicts
from the explanation text alone, like an LLM simulator would, and the same scorers apply.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from neuron_explainer.explain import Explanation
from neuron_explainer.intruder import offline_guess
from neuron_explainer.prompts import MAX_LEVEL
from neuron_explainer.records import FeatureRecord


@dataclass(frozen=True)
class Pattern:
    token: str
    prev: str | None = None  # None: any previous token
    level: int = MAX_LEVEL  # predicted activation 0-10


def _q(tok: str) -> str:
    return json.dumps(tok, ensure_ascii=False)


def format_explanation(patterns: Sequence[Pattern]) -> str:
    """Patterns → a readable sentence that `parse_explanation_patterns` reads back."""
    if not patterns:
        return "fires on no token pattern found"
    levels = [p.level for p in patterns]
    show_levels = max(levels) - min(levels) > 2  # equal strengths read better without numbers

    def item(p: Pattern) -> str:
        s = _q(p.token) if p.prev is None else f"{_q(p.token)} after {_q(p.prev)}"
        return f"{s} ({p.level})" if show_levels else s

    unigrams = [item(p) for p in patterns if p.prev is None]
    bigrams = [item(p) for p in patterns if p.prev is not None]
    parts = []
    if unigrams:
        parts.append(("tokens " if len(unigrams) > 1 else "") + ", ".join(unigrams))
    if bigrams:
        parts.append(", ".join(bigrams))
    return "fires on " + "; and on ".join(parts)


_JSON_STR = r'"(?:[^"\\]|\\.)*"'
_ITEM = re.compile(rf"({_JSON_STR})(?:\s+after\s+({_JSON_STR}))?(?:\s+\((\d+)\))?")


def parse_explanation_patterns(text: str | None) -> list[Pattern]:
    """Reads the patterns back out of an offline explanation (unknown prose gives no pattern)."""
    patterns = []
    for m in _ITEM.finditer(text or ""):
        try:
            token = json.loads(m.group(1))
            prev = json.loads(m.group(2)) if m.group(2) else None
        except json.JSONDecodeError:
            continue
        level = min(MAX_LEVEL, int(m.group(3))) if m.group(3) else MAX_LEVEL
        patterns.append(Pattern(token, prev, level))
    return patterns


def predict(patterns: Sequence[Pattern], tokens: Sequence[str]) -> list[float]:
    """Per-token activation 0-10: the level of the matching bigram, else of the matching token, else 0."""
    uni = {p.token: p.level for p in patterns if p.prev is None}
    bi = {(p.prev, p.token): p.level for p in patterns if p.prev is not None}
    out = []
    for t, tok in enumerate(tokens):
        prev = tokens[t - 1] if t > 0 else None
        out.append(float(bi.get((prev, tok), uni.get(tok, 0))))
    return out


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


class OfflineExplainer:
    """Greedy token/bigram lookup over the training windows."""

    name = "offline"

    def __init__(self, max_patterns: int = 8, min_count: int = 2, min_gain: float = 0.01) -> None:
        self.max_patterns, self.min_count, self.min_gain = max_patterns, min_count, min_gain

    def find_patterns(self, record: FeatureRecord) -> list[Pattern]:
        """The chosen patterns, strongest first."""
        scale = record.max_activation if record.max_activation > 0 else 1.0
        toks: list[str] = []
        prevs: list[str | None] = []
        levels: list[float] = []
        for r in [*record.train_top, *record.train_random]:
            toks.extend(r.tokens)
            prevs.extend([None, *r.tokens[:-1]])
            levels.extend(min(MAX_LEVEL, max(0.0, MAX_LEVEL * a / scale)) for a in r.activations)
        y = np.asarray(levels, dtype=np.float64)
        if y.size < 2 or np.ptp(y) == 0:
            return []
        tok_arr = np.array(toks, dtype=object)
        prev_arr = np.array(prevs, dtype=object)
        # Candidates: what sits at clearly active positions (level >= 2) in the training windows.
        active = y >= 2
        candidates: dict[tuple[str, str | None], np.ndarray] = {}
        for tok, prev in {(t, p) for t, p, a in zip(toks, prevs, active, strict=True) if a}:
            uni = tok_arr == tok
            if (tok, None) not in candidates and uni.sum() >= self.min_count:
                candidates[(tok, None)] = uni
            if prev is not None:
                bi = uni & (prev_arr == prev)
                if bi.sum() >= self.min_count:
                    candidates[(tok, prev)] = bi

        chosen: dict[tuple[str, str | None], int] = {}
        best = 0.0
        for _ in range(self.max_patterns):
            gains = []
            for key in candidates:
                if key in chosen:
                    continue
                trial = {**chosen, key: 0}
                pred = self._predict_arrays(trial, candidates, y)
                gains.append((_corr(y, pred) - best, key))
            if not gains:
                break
            gain, key = max(gains, key=lambda g: (g[0], g[1][1] is None))  # on a tie, the simpler pattern
            if gain < self.min_gain:
                break
            chosen[key] = 0
            best += gain
        levels_by_key = self._levels(chosen, candidates, y)
        patterns = [Pattern(tok, prev, levels_by_key[(tok, prev)]) for tok, prev in chosen]
        return sorted(patterns, key=lambda p: -p.level)

    @staticmethod
    def _levels(
        chosen: dict[tuple[str, str | None], int], candidates: dict[tuple[str, str | None], np.ndarray], y: np.ndarray
    ) -> dict[tuple[str, str | None], int]:
        """Each pattern's level: the mean activation where it is the pattern that applies (bigrams first)."""
        taken = np.zeros_like(y, dtype=bool)
        out = {}
        for key in sorted(chosen, key=lambda k: k[1] is None):  # bigrams before unigrams
            mask = candidates[key] & ~taken
            taken |= candidates[key]
            out[key] = int(round(float(y[mask].mean()))) if mask.any() else 0
        return out

    def _predict_arrays(
        self, chosen: dict[tuple[str, str | None], int], candidates: dict[tuple[str, str | None], np.ndarray], y
    ) -> np.ndarray:
        levels = self._levels(chosen, candidates, y)
        pred = np.zeros_like(y)
        for key in sorted(chosen, key=lambda k: k[1] is not None):  # bigrams last, so they override
            pred[candidates[key]] = levels[key]
        return pred

    def explain_sync(self, record: FeatureRecord) -> Explanation:
        patterns = self.find_patterns(record)
        return Explanation(text=format_explanation(patterns), patterns=[asdict(p) for p in patterns])

    async def explain(self, record: FeatureRecord) -> Explanation:
        return self.explain_sync(record)


class OfflineSimulator:
    """Predicts from the explanation text alone (parsed back into patterns); never fails to parse. As the
    intruder judge it compares the marked tokens of the windows (intruder.offline_guess)."""

    name = "offline"
    decision_threshold = 0.05  # scores are max/mean predicted level / 10: any matched pattern counts as "yes"

    def simulate_sync(self, explanation: str, tokens: Sequence[str]) -> list[float]:
        return predict(parse_explanation_patterns(explanation), tokens)

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float] | None:
        return self.simulate_sync(explanation, tokens)

    async def detect(self, explanation: str, examples: Sequence[Sequence[str]]) -> list[float | None]:
        patterns = parse_explanation_patterns(explanation)
        return [max(predict(patterns, toks), default=0.0) / MAX_LEVEL for toks in examples]

    async def fuzz(
        self, explanation: str, examples: Sequence[tuple[Sequence[str], Sequence[bool]]]
    ) -> list[float | None]:
        patterns = parse_explanation_patterns(explanation)
        out: list[float | None] = []
        for toks, marks in examples:
            pred = [p for p, m in zip(predict(patterns, toks), marks, strict=True) if m]
            out.append(float(np.mean(pred)) / MAX_LEVEL if pred else 0.0)
        return out

    async def intruder(self, windows: Sequence[tuple[Sequence[str], Sequence[bool]]]) -> int | None:
        # Ties are broken by a generator seeded from the windows themselves: the same trial gets the same
        # answer whatever order features are scored in (and on a resumed run).
        seed = zlib.crc32("\x00".join(t for toks, _ in windows for t in toks).encode())
        return offline_guess(windows, np.random.default_rng(seed))
