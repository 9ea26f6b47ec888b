"""Sparse probing with labels the corpus itself provides: does a handful of SAE latents tell, token by token,
whether we are inside a code block, on a doctest line, on a Python keyword or inside an inline literal — and
how does that compare with as many neurons (coordinates of the raw activation) or with a dense probe on the
whole activation?

Labels come from the text of each context row (tokens decoded and joined), so any reStructuredText-like
corpus with Python in it serves (the offline corpus is Python's documentation). A row's text before its first
newline is left unlabelled: its line started before the row did. A k-sparse probe (as SAEBench's sparse
probing) keeps the k features whose class means differ most on the training split, standardises them and fits
a logistic regression; its accuracy is measured on held-out tokens of balanced classes.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

TASKS = ("code_block", "doctest", "python_keyword", "inline_literal")
KEYWORDS = frozenset(keyword.kwlist)
_INLINE = re.compile(r"``[^`\n]+``")


def _line_labels(text: str) -> dict[str, np.ndarray]:
    """Per character of one row's text: inside a literal block (indented lines after a line ending in '::'),
    on a doctest line ('>>>' or '...' prompts), inside ``inline literal``; -1 before the first newline."""
    n = len(text)
    code, doctest = np.zeros(n, np.int8), np.zeros(n, np.int8)
    block_indent: int | None = None  # indentation of the line that opened the current literal block
    pos = 0
    for i, line in enumerate(text.split("\n")):
        end = pos + len(line)
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        if block_indent is not None and stripped and indent <= block_indent:
            block_indent = None
        if block_indent is not None and stripped:
            code[pos:end] = 1
        if stripped.startswith((">>>", "...")):
            doctest[pos:end] = code[pos:end] = 1
        if line.rstrip().endswith("::") and i > 0:
            block_indent = indent
        pos = end + 1
    inline = np.zeros(n, np.int8)
    for m in _INLINE.finditer(text):
        inline[m.start() : m.end()] = 1
    first = text.find("\n")
    cut = n if first < 0 else first + 1
    for arr in (code, doctest, inline):
        arr[:cut] = -1
    return {"code_block": code, "doctest": doctest, "inline_literal": inline}


def corpus_labels(token_strs: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Token strings [R][T] → {task: labels [R, T] in {1, 0, -1 (unlabelled)}}; a token takes the label of its
    last character (a token's leading space belongs to the gap before it); python_keyword is labelled within
    code only. Loops over rows and lines of text, once per evaluation (a few hundred rows)."""
    R, T = len(token_strs), len(token_strs[0]) if token_strs else 0
    out = {task: np.full((R, T), -1, np.int8) for task in TASKS}
    for r, toks in enumerate(token_strs):
        ends = np.cumsum([len(t) for t in toks]) - 1
        chars = _line_labels("".join(toks))
        nonempty = np.array([len(t) > 0 for t in toks])
        for task, per_char in chars.items():
            out[task][r, nonempty] = per_char[ends[nonempty]]
        words = np.array([t.strip() in KEYWORDS for t in toks], np.int8)
        out["python_keyword"][r] = np.where(out["code_block"][r] == 1, words, -1)  # keyword or not, within code
    return out


MIN_PER_CLASS = 50  # below this a task's test accuracy moves in steps of 10 % or more: left out


def balanced_split(
    labels: np.ndarray, n_per_class: int, rng: np.random.Generator, test_share: float = 0.2
) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices (train, test) into the flat labels: up to n_per_class of each class, equal counts, shuffled;
    None when either class has fewer than MIN_PER_CLASS tokens."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n = min(n_per_class, len(pos), len(neg))
    if n < MIN_PER_CLASS:
        return None
    picked = [rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]
    n_test = max(1, round(n * test_share))
    test = np.concatenate([p[:n_test] for p in picked])
    train = np.concatenate([p[n_test:] for p in picked])
    return rng.permutation(train), test


def probe_set(
    labels: dict[str, np.ndarray], n_per_class: int, seed: int
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Chooses every task's balanced train/test tokens. Gives (tokens: flat indices of all the tokens any task
    uses, tasks: {task: (labels, train, test)}, indices into `tokens`), so features are computed once, for
    those tokens only."""
    chosen = {}
    for task, lab in labels.items():
        split = balanced_split(lab.reshape(-1), n_per_class, np.random.default_rng([seed, TASKS.index(task)]))
        if split is not None:
            chosen[task] = (lab.reshape(-1), *split)
    tokens = np.unique(np.concatenate([np.concatenate(s[1:]) for s in chosen.values()])) if chosen else np.zeros(0, int)
    tasks = {  # tokens is sorted, so searchsorted maps a flat index to its position in it
        task: (y[tokens].astype(np.int64), np.searchsorted(tokens, train), np.searchsorted(tokens, test))
        for task, (y, train, test) in chosen.items()
    }
    return tokens, tasks


def _fit_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(x_train), y_train)
    return float(probe.score(scaler.transform(x_test), y_test))


def sparse_probe_accuracies(
    x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """Test accuracy of the k-sparse probe for each k (up to the number of features): features x [N, f],
    labels y [N] in {0, 1}; the k features are chosen by the difference of class means on the training split."""
    xt, yt = x[train], y[train]
    gap = np.abs(xt[yt == 1].mean(0) - xt[yt == 0].mean(0))
    order = np.argsort(-gap, kind="stable")
    return {str(k): _fit_accuracy(xt[:, order[:k]], yt, x[test][:, order[:k]], y[test]) for k in ks if k <= x.shape[1]}


def probe_tasks(
    features: dict[str, np.ndarray],
    tasks: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    ks: Sequence[int],
    dense: np.ndarray | None = None,
) -> dict[str, Any]:
    """k-sparse accuracies of every feature set (name → [N, f] over probe_set's tokens) on every task, and with
    `dense` [N, d] the dense probe's accuracy. Gives {"tasks": {task: {"n_train", "n_test", name: {k: acc},
    "dense": acc}}, "mean": {name: {k: mean accuracy over tasks}}}."""
    out: dict[str, Any] = {}
    for task, (y, train, test) in tasks.items():
        entry: dict[str, Any] = {"n_train": int(len(train)), "n_test": int(len(test))}
        for name, x in features.items():
            entry[name] = sparse_probe_accuracies(x, y, train, test, ks)
        if dense is not None:
            entry["dense"] = _fit_accuracy(dense[train], y[train], dense[test], y[test])
        out[task] = entry
    mean = {}
    for name in [*features, *(["dense"] if dense is not None else [])]:
        per_task = [t[name] for t in out.values()]
        if name == "dense":
            mean[name] = float(np.mean(per_task)) if per_task else None
        else:
            mean[name] = {k: float(np.mean([p[k] for p in per_task])) for k in (per_task[0] if per_task else {})}
    return {"tasks": out, "mean": mean}
