"""Explainers: a FeatureRecord in, an Explanation out. The LLM one lives here; the offline one in offline.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from neuron_explainer.client import ChatClient
from neuron_explainer.prompts import explainer_messages, parse_explanation
from neuron_explainer.records import FeatureRecord


@dataclass
class Explanation:
    text: str | None  # None: the explainer's answer could not be parsed
    patterns: list[dict[str, Any]] | None = None  # the offline explainer's structured form (for reading only)


class Explainer(Protocol):
    name: str

    async def explain(self, record: FeatureRecord) -> Explanation: ...


class LLMExplainer:
    """Shows the feature's training top-activating windows (token<TAB>0-10) to a chat model and asks what it is."""

    def __init__(self, client: ChatClient, model: str, max_tokens: int = 120) -> None:
        self.client, self.model, self.max_tokens = client, model, max_tokens
        self.name = f"llm:{model}"

    async def explain(self, record: FeatureRecord) -> Explanation:
        messages = explainer_messages(record.train_top, record.max_activation)
        response = await self.client.complete(self.model, messages, max_tokens=self.max_tokens)
        return Explanation(text=parse_explanation(response.content))
