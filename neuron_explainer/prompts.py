"""Prompt builders and answer parsers: pure functions from records to chat messages and from answers to numbers.

Kept apart from the client so they can be read, tested and changed without any network. Activations are shown
to the explainer in the token<TAB>activation format, as integers 0-10 relative to the feature's maximum.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from neuron_explainer.records import ActivationRecord

Messages = list[dict[str, str]]
MAX_LEVEL = 10
LEVELS = [str(i) for i in range(MAX_LEVEL + 1)]


def show_token(tok: str) -> str:
    """A token as one printable cell: newlines and tabs would break the line/TAB format."""
    return tok.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def normalize(activations: Sequence[float], max_activation: float) -> list[int]:
    """Activations → integers 0-10 relative to `max_activation` (negative values count as 0)."""
    if max_activation <= 0:
        return [0 for _ in activations]
    return [min(MAX_LEVEL, max(0, int(math.floor(MAX_LEVEL * a / max_activation + 0.5)))) for a in activations]


def format_record(rec: ActivationRecord, max_activation: float) -> str:
    return "\n".join(
        f"{show_token(t)}\t{v}" for t, v in zip(rec.tokens, normalize(rec.activations, max_activation), strict=True)
    )


EXPLAINER_SYSTEM = (
    "We study features (neurons or learned directions) of a language model. Each feature looks for some "
    "particular thing in a short text. Look at the text excerpts below, given one token per line as "
    "token<TAB>activation, activations from 0 (off) to 10 (strongest), and say what the feature fires on. "
    "Be concise and concrete: name the tokens or patterns, and the context if it matters. "
    "Answer with one line, at most 25 words, with no preamble."
)


def explainer_messages(records: Sequence[ActivationRecord], max_activation: float) -> Messages:
    """Chat messages asking for an explanation of the feature behind `records`."""
    body = "\n\n".join(f"Excerpt {i + 1}:\n{format_record(r, max_activation)}" for i, r in enumerate(records))
    return [
        {"role": "system", "content": EXPLAINER_SYSTEM},
        {"role": "user", "content": f"{body}\n\nExplanation of the feature:"},
    ]


def parse_explanation(text: str | None) -> str | None:
    """First non-empty line of the answer, without a leading 'Explanation:' and quotes; None if nothing is left."""
    for line in (text or "").splitlines():
        line = re.sub(r"^\s*(explanation( of the feature)?\s*:)\s*", "", line.strip(), flags=re.I).strip()
        if len(line) >= 2 and line[0] == line[-1] == '"' and '"' not in line[1:-1]:  # quoted whole, not in part
            line = line[1:-1].strip()
        if line:
            return line
    return None


SIMULATOR_SYSTEM = (
    "We study features of a language model. Given an explanation of what a feature fires on and a text given one "
    "token per line, predict the feature's activation on each token, an integer from 0 (off) to 10 (strongest). "
    "Most tokens are 0."
)


def simulator_messages(explanation: str, tokens: Sequence[str]) -> Messages:
    """Asks for token<TAB>activation lines, one per token, in order (the digits' logprobs give expected values)."""
    listing = "\n".join(show_token(t) for t in tokens)
    return [
        {"role": "system", "content": SIMULATOR_SYSTEM},
        {
            "role": "user",
            "content": f"Explanation: {explanation}\n\nReply with exactly {len(tokens)} lines, each the token, a TAB, "
            f"and its activation.\n\nTokens:\n{listing}",
        },
    ]


def simulator_json_messages(explanation: str, tokens: Sequence[str]) -> Messages:
    """For backends without logprobs: asks for a JSON list of integers, one per token."""
    return [
        {"role": "system", "content": SIMULATOR_SYSTEM},
        {
            "role": "user",
            "content": f"Explanation: {explanation}\n\nTokens (JSON list): {json.dumps(list(tokens))}\n\n"
            f'Reply with JSON only: {{"activations": [...]}} with exactly {len(tokens)} integers 0-10.',
        },
    ]


def expected_level(top_logprobs: Sequence[dict[str, Any]]) -> float | None:
    """Expected activation under the model's distribution over the tokens '0'..'10' (renormalised over them)."""
    probs: dict[int, float] = {}
    for entry in top_logprobs:
        tok = str(entry.get("token", "")).strip()
        if tok in LEVELS and int(tok) not in probs:
            probs[int(tok)] = math.exp(float(entry.get("logprob", -math.inf)))
    total = sum(probs.values())
    return sum(k * p for k, p in probs.items()) / total if total > 0 else None


def parse_simulation_logprobs(content_logprobs: Sequence[dict[str, Any]], n_tokens: int) -> list[float] | None:
    """Expected activations from the logprobs of the answer's tokens; None unless exactly n_tokens slots are found.

    A slot is the first number token after a TAB; its top_logprobs give the expected value (its own sampled
    value when the backend gave no alternatives).
    """
    out: list[float] = []
    after_tab = False
    for item in content_logprobs:
        tok = str(item.get("token", ""))
        if after_tab and tok.strip():
            if tok.strip() in LEVELS:
                alts = item.get("top_logprobs") or [{"token": tok, "logprob": item.get("logprob", 0.0)}]
                value = expected_level(alts)
                out.append(float(tok.strip()) if value is None else value)
            after_tab = False
        if "\t" in tok:
            tail = tok.rsplit("\t", 1)[1].strip()
            if tail in LEVELS:  # the tokenizer merged the TAB and the digits: no alternatives to weigh
                out.append(float(tail))
            after_tab = tail == ""
    return out if len(out) == n_tokens else None


def parse_simulation_text(text: str | None, n_tokens: int) -> list[float] | None:
    """Sampled activations from token<TAB>activation lines; None unless exactly n_tokens are found."""
    values = []
    for line in (text or "").splitlines():
        if "\t" in line:
            tail = line.rsplit("\t", 1)[1].strip()
            if tail in LEVELS:
                values.append(float(tail))
    return values if len(values) == n_tokens else None


def _json_object(text: str | None) -> Any:
    """The first JSON object in `text` (models like to wrap JSON in prose or code fences)."""
    match = re.search(r"\{.*\}", text or "", flags=re.S)
    if not match:
        return None
    try:
        return json.loads(match.group(0))
    except json.JSONDecodeError:
        return None


def _json_numbers(text: str | None, key: str, n: int) -> list[float] | None:
    """The list under `key` in the reply's JSON object; None unless it has n entries that are numbers."""
    obj = _json_object(text)
    values = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(values, list) or len(values) != n:
        return None
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def parse_simulation_json(text: str | None, n_tokens: int) -> list[float] | None:
    values = _json_numbers(text, "activations", n_tokens)
    return None if values is None else [min(float(MAX_LEVEL), max(0.0, v)) for v in values]


def _numbered(texts: Sequence[str]) -> str:
    return "\n".join(f"Example {i + 1}: {t}" for i, t in enumerate(texts))


def detection_messages(explanation: str, examples: Sequence[Sequence[str]]) -> Messages:
    """Asks, for each text, whether the feature is present in it (1) or not (0)."""
    texts = [json.dumps("".join(toks)) for toks in examples]
    return [
        {
            "role": "system",
            "content": "We study features of a language model. Given an explanation of a feature and several texts, "
            "say for each text whether the feature fires anywhere in it.",
        },
        {
            "role": "user",
            "content": f"Explanation: {explanation}\n\n{_numbered(texts)}\n\n"
            f'Reply with JSON only: {{"answers": [...]}} with {len(texts)} entries, 1 (fires) or 0 (does not).',
        },
    ]


def fuzzing_messages(explanation: str, examples: Sequence[tuple[Sequence[str], Sequence[bool]]]) -> Messages:
    """Asks, for each text with <<highlighted>> tokens, whether the highlights are where the feature fires."""
    texts = [
        json.dumps("".join(f"<<{t}>>" if h else t for t, h in zip(toks, marks, strict=True)))
        for toks, marks in examples
    ]
    return [
        {
            "role": "system",
            "content": "We study features of a language model. Given an explanation of a feature and several texts "
            "with some tokens marked <<like this>>, say for each text whether the marked tokens are ones the feature "
            "fires on according to the explanation.",
        },
        {
            "role": "user",
            "content": f"Explanation: {explanation}\n\n{_numbered(texts)}\n\n"
            f'Reply with JSON only: {{"answers": [...]}} with {len(texts)} entries, 1 (correctly marked) or 0.',
        },
    ]


def parse_answers(text: str | None, n: int) -> list[float] | None:
    """The 0/1 answers list; None unless it has n entries that are numbers."""
    return _json_numbers(text, "answers", n)


def intruder_messages(windows: Sequence[tuple[Sequence[str], Sequence[bool]]]) -> Messages:
    """Asks which of several texts, tokens marked <<like this>>, does not belong with the others."""
    texts = [
        json.dumps("".join(f"<<{t}>>" if m else t for t, m in zip(toks, marks, strict=True))) for toks, marks in windows
    ]
    return [
        {
            "role": "system",
            "content": "We study features of a language model. All but one of the texts below are places where one "
            "feature fires, on the tokens marked <<like this>>; one text does not belong. Find it.",
        },
        {
            "role": "user",
            "content": f"{_numbered(texts)}\n\n"
            f'Reply with JSON only: {{"answers": [n]}}, n the number (1 to {len(texts)}) of the text that does not '
            "belong.",
        },
    ]
