"""Feature records: for each feature its top-activating windows, random windows and per-quantile samples.

Plain data only (token strings + activation lists), JSON-serialisable, so every later stage (explain, simulate,
score, HTML) can be fed by hand in tests. Splits are by sequence: a sequence (row of the token matrix) lands in at
most one record of a feature, so nothing shown to the explainer is ever scored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from sparse_coding.errors import UserError


@dataclass
class ActivationRecord:
    """One context window: its tokens and one feature's activation on each."""

    tokens: list[str]
    activations: list[float]
    sequence_index: int = -1  # row of the token matrix it came from (-1: built by hand)
    start: int = 0  # position of tokens[0] in that row

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)


@dataclass
class FeatureRecord:
    """Everything the explainer and scorers need about one feature; train and held-out sequences are disjoint."""

    feature_index: int
    method: str  # where the feature came from: "sae", "neuron", "pca", "ica", "random"
    max_activation: float  # over the whole dataset; the 0-10 scale is relative to it
    firing_rate: float  # share of tokens with activation > 0
    train_top: list[ActivationRecord] = field(default_factory=list)  # shown to the explainer
    train_random: list[ActivationRecord] = field(default_factory=list)  # contrast for the offline explainer
    test_top: list[ActivationRecord] = field(default_factory=list)  # scored (held out)
    test_random: list[ActivationRecord] = field(default_factory=list)  # scored (held out)
    quantiles: list[list[ActivationRecord]] = field(default_factory=list)  # held out, lowest quantile first
    # Each quantile's activation interval [low, high]: the range of the per-sequence maxima it was drawn from.
    quantile_intervals: list[list[float]] = field(default_factory=list)
    histogram: dict[str, list[float]] = field(default_factory=dict)  # {"edges", "counts"} of activations > 0
    extras: dict[str, Any] = field(default_factory=dict)  # dashboard data a caller adds (neighbours, logits)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureRecord:
        def recs(items: Iterable[Mapping[str, Any]]) -> list[ActivationRecord]:
            return [ActivationRecord(**r) for r in items]

        return cls(
            feature_index=int(d["feature_index"]),
            method=str(d["method"]),
            max_activation=float(d["max_activation"]),
            firing_rate=float(d["firing_rate"]),
            train_top=recs(d.get("train_top", [])),
            train_random=recs(d.get("train_random", [])),
            test_top=recs(d.get("test_top", [])),
            test_random=recs(d.get("test_random", [])),
            quantiles=[recs(q) for q in d.get("quantiles", [])],
            quantile_intervals=[list(map(float, iv)) for iv in d.get("quantile_intervals", [])],
            histogram=dict(d.get("histogram", {})),
            extras=dict(d.get("extras", {})),
        )

    def sequences(self, split: str) -> set[int]:
        """Sequence indices used by the 'train' or 'test' split (for checking disjointness)."""
        if split == "train":
            groups = [self.train_top, self.train_random]
        else:
            groups = [self.test_top, self.test_random, *self.quantiles]
        return {r.sequence_index for g in groups for r in g}


@dataclass
class RecordConfig:
    window: int = 64  # tokens per context window
    n_top_train: int = 10
    n_top_test: int = 10
    n_random_train: int = 10
    n_random_test: int = 10
    n_quantiles: int = 5
    n_per_quantile: int = 4
    histogram_bins: int = 30
    seed: int = 0


Decoder = Callable[[int], str] | Sequence[str] | Mapping[int, str]


def _as_numpy(x: Any) -> np.ndarray:
    """Accepts numpy arrays and torch tensors alike (the library itself never needs torch)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def decode_tokens(token_ids: Any, decode: Decoder) -> list[list[str]]:
    """token_ids: [N, T] ints → token strings [N][T]; `decode` is id → str, a vocabulary list, or a dict.

    Each distinct id is decoded once. For a Hugging Face tokenizer pass `lambda i: tok.decode([i])`.
    """
    ids = _as_numpy(token_ids)
    if ids.ndim != 2:
        raise UserError(f"tokens must be [N, T] token ids, got shape {tuple(ids.shape)}")
    uniq, inverse = np.unique(ids, return_inverse=True)
    lookup = decode if callable(decode) else decode.__getitem__
    try:
        strings = [str(lookup(int(i))) for i in uniq]
    except (IndexError, KeyError) as e:
        raise UserError(f"token id {e} is not in the vocabulary given") from e
    table = np.array(strings, dtype=object)[inverse.reshape(ids.shape)]
    return [list(row) for row in table]


def _window(tokens: list[str], acts: np.ndarray, seq: int, centre: int, window: int) -> ActivationRecord:
    """Window of `window` tokens holding position `centre`, with three quarters of it before (context matters)."""
    T = len(tokens)
    start = 0 if window >= T else min(max(centre - (window - 1 - window // 4), 0), T - window)
    end = min(start + window, T)
    return ActivationRecord(
        tokens=list(tokens[start:end]),
        activations=[round(float(a), 6) for a in acts[start:end]],
        sequence_index=seq,
        start=start,
    )


def build_feature_record(
    token_strs: Sequence[Sequence[str]],
    feature_acts: Any,
    feature_index: int,
    cfg: RecordConfig | None = None,
    method: str = "sae",
) -> FeatureRecord:
    """token_strs: [N][T] strings, feature_acts: [N, T] one feature → its FeatureRecord (seeded, splits disjoint)."""
    cfg = cfg or RecordConfig()
    a = _as_numpy(feature_acts).astype(np.float64)
    N = len(token_strs)
    if a.ndim != 2 or a.shape[0] != N or (N and a.shape[1] != len(token_strs[0])):
        raise UserError(f"activations of feature {feature_index} have shape {tuple(a.shape)}, tokens are [{N}, T]")
    if not np.isfinite(a).all():
        raise UserError(f"activations of feature {feature_index} contain NaN or inf")
    # Seeded per feature, so a record does not depend on which other features were built alongside it.
    rng = np.random.default_rng([cfg.seed, feature_index])
    seq_max, seq_arg = a.max(axis=1), a.argmax(axis=1)
    order = np.argsort(-seq_max, kind="stable")
    firing = order[seq_max[order] > 0]
    used: set[int] = set()

    def at_max(seqs: Iterable[int]) -> list[ActivationRecord]:
        return [_window(list(token_strs[s]), a[s], int(s), int(seq_arg[s]), cfg.window) for s in seqs]

    top = firing[: cfg.n_top_train + cfg.n_top_test]
    used.update(int(s) for s in top)
    top = top[rng.permutation(len(top))]  # which top sequences are shown vs. scored is random, not by rank
    # A rarely firing feature has fewer top sequences than asked for: split them in the asked-for proportion.
    n_train = round(len(top) * cfg.n_top_train / max(cfg.n_top_train + cfg.n_top_test, 1))
    train_top = sorted(at_max(top[:n_train]), key=lambda r: -r.max_activation)
    test_top = sorted(at_max(top[n_train:]), key=lambda r: -r.max_activation)

    # Per-quantile samples: equal-count bins over the remaining firing sequences ranked by their max activation.
    rest = np.array([s for s in firing[::-1] if int(s) not in used], dtype=np.int64)  # lowest first
    quantiles: list[list[ActivationRecord]] = []
    intervals: list[list[float]] = []
    for chunk in np.array_split(rest, cfg.n_quantiles) if len(rest) else []:
        pick = rng.choice(chunk, size=min(cfg.n_per_quantile, len(chunk)), replace=False) if len(chunk) else []
        used.update(int(s) for s in pick)
        quantiles.append(at_max(pick))
        peaks = seq_max[chunk] if len(chunk) else np.zeros(1)
        intervals.append([round(float(peaks.min()), 6), round(float(peaks.max()), 6)])  # rounded as the windows are

    # Random windows: uniform over the unused sequences, at a uniform position.
    pool = np.array([s for s in range(N) if s not in used], dtype=np.int64)
    pick = rng.choice(pool, size=min(cfg.n_random_train + cfg.n_random_test, len(pool)), replace=False)
    T = a.shape[1] if N else 0
    starts = rng.integers(0, max(T - cfg.window, 0) + 1, size=len(pick))
    randoms = [
        _window(list(token_strs[s]), a[s], int(s), int(st) + cfg.window - 1 - cfg.window // 4, cfg.window)
        for s, st in zip(pick, starts, strict=True)
    ]

    pos = a[a > 0]
    counts, edges = np.histogram(pos, bins=cfg.histogram_bins) if pos.size else (np.zeros(0), np.zeros(0))
    return FeatureRecord(
        feature_index=int(feature_index),
        method=method,
        max_activation=float(a.max()) if a.size else 0.0,
        firing_rate=float(pos.size / a.size) if a.size else 0.0,
        train_top=train_top,
        train_random=randoms[: cfg.n_random_train],
        test_top=test_top,
        test_random=randoms[cfg.n_random_train :],
        quantiles=quantiles,
        quantile_intervals=intervals,
        histogram={"edges": [float(e) for e in edges], "counts": [float(c) for c in counts]},
    )


def build_feature_records(
    tokens: Any,
    acts: Any,
    decode: Decoder | None = None,
    features: Sequence[int] | None = None,
    cfg: RecordConfig | None = None,
    method: str = "sae",
) -> list[FeatureRecord]:
    """tokens: [N, T] ids (with `decode`) or [N][T] strings; acts: [N, T, n_features] → one record per feature.

    `acts` may also be a function feature_index → [N, T], to build one feature at a time when the full
    tensor does not fit in memory (then `features` is required).
    """
    if decode is not None:
        token_strs = decode_tokens(tokens, decode)
    elif isinstance(tokens, Sequence) and tokens and isinstance(tokens[0][0], str):
        token_strs = [list(row) for row in tokens]
    else:
        raise UserError("tokens are ids: pass `decode` (id → string, or a vocabulary list)")
    if callable(acts):
        if features is None:
            raise UserError("with activations given as a function, pass the feature indices to build")
        get = acts
    else:
        arr = _as_numpy(acts)
        if arr.ndim != 3:
            raise UserError(f"activations must be [N, T, n_features], got shape {tuple(arr.shape)}")
        features = range(arr.shape[2]) if features is None else features

        def get(f: int) -> np.ndarray:
            return arr[:, :, f]

    chosen = list(features)
    return [
        build_feature_record(token_strs, get(int(f)), int(f), cfg, method)
        for f in tqdm(chosen, desc=f"records ({method})", disable=len(chosen) < 50)
    ]
