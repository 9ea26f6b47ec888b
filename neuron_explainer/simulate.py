"""Simulators: from an explanation alone, predict a feature's activation (0-10) on each token of a text, and
judge detection / fuzzing examples. The LLM one lives here; the offline one in offline.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from neuron_explainer.client import ChatClient
from neuron_explainer.prompts import (
    detection_messages,
    fuzzing_messages,
    intruder_messages,
    parse_answers,
    parse_simulation_json,
    parse_simulation_logprobs,
    parse_simulation_text,
    simulator_json_messages,
    simulator_messages,
)

TOP_LOGPROBS = 15  # enough alternatives to cover the eleven levels '0'..'10'
PROBE = [{"role": "user", "content": "Reply with the single digit 0."}]  # does the backend return logprobs?


class Simulator(Protocol):
    name: str
    decision_threshold: float  # detect/fuzz scores above it count as "yes"

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float] | None: ...

    async def detect(self, explanation: str, examples: Sequence[Sequence[str]]) -> list[float | None]: ...

    async def fuzz(
        self, explanation: str, examples: Sequence[tuple[Sequence[str], Sequence[bool]]]
    ) -> list[float | None]: ...

    async def intruder(self, windows: Sequence[tuple[Sequence[str], Sequence[bool]]]) -> int | None:
        """The position of the window that does not belong (None: unparsed)."""
        ...


class LLMSimulator:
    """Expected activations from the 0-10 logprobs where the backend returns them, else from a JSON answer.

    mode "auto" first sends one fixed probe request asking for logprobs, and uses the logprob prompt if the answer
    has them, the JSON prompt if not. The probe is the same request every run (so the cache answers it on a rerun,
    and a rerun asks exactly what the first run asked); "logprobs" and "json" skip it.
    """

    decision_threshold = 0.5

    def __init__(self, client: ChatClient, model: str, mode: str = "auto", batch_size: int = 10) -> None:
        if mode not in ("auto", "logprobs", "json"):
            raise ValueError(f"simulator mode must be auto, logprobs or json, not {mode!r}")
        self.client, self.model, self.mode, self.batch_size = client, model, mode, batch_size
        self.name = f"llm:{model}"
        self._probe_lock: asyncio.Lock | None = None

    async def _resolve_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        self._probe_lock = self._probe_lock or asyncio.Lock()
        async with self._probe_lock:
            if self.mode == "auto":
                r = await self.client.complete(
                    self.model, PROBE, max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS
                )
                self.mode = "logprobs" if r.logprobs else "json"
        return self.mode

    async def simulate(self, explanation: str, tokens: Sequence[str]) -> list[float] | None:
        max_tokens = 16 + 12 * len(tokens)
        if await self._resolve_mode() == "logprobs":
            r = await self.client.complete(
                self.model,
                simulator_messages(explanation, tokens),
                max_tokens=max_tokens,
                logprobs=True,
                top_logprobs=TOP_LOGPROBS,
            )
            if r.logprobs:
                return parse_simulation_logprobs(r.logprobs, len(tokens))
            return parse_simulation_text(r.content, len(tokens))  # no logprobs this time: the sampled numbers
        r = await self.client.complete(self.model, simulator_json_messages(explanation, tokens), max_tokens=max_tokens)
        return parse_simulation_json(r.content, len(tokens))

    async def _batched(self, examples: Sequence, build) -> list[float | None]:
        out: list[float | None] = []
        for i in range(0, len(examples), self.batch_size):
            batch = examples[i : i + self.batch_size]
            r = await self.client.complete(self.model, build(batch), max_tokens=16 + 4 * len(batch))
            answers = parse_answers(r.content, len(batch))
            out.extend(answers if answers is not None else [None] * len(batch))
        return out

    async def detect(self, explanation: str, examples: Sequence[Sequence[str]]) -> list[float | None]:
        return await self._batched(examples, lambda b: detection_messages(explanation, b))

    async def fuzz(
        self, explanation: str, examples: Sequence[tuple[Sequence[str], Sequence[bool]]]
    ) -> list[float | None]:
        return await self._batched(examples, lambda b: fuzzing_messages(explanation, b))

    async def intruder(self, windows: Sequence[tuple[Sequence[str], Sequence[bool]]]) -> int | None:
        r = await self.client.complete(self.model, intruder_messages(windows), max_tokens=16)
        answer = parse_answers(r.content, 1)
        if answer is None or not 1 <= answer[0] <= len(windows):
            return None
        return int(answer[0]) - 1
