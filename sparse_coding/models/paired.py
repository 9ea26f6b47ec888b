"""Two language models over the same tokens, as one model: what a model-diffing crosscoder reads (run.py
--diff_model).

Hooks `a.<path>` and `b.<path>` name the first and the second model's modules (the pair's module tree is
{"a": first, "b": second}), so a hook of both is `a.<path>+b.<path>` (models/language_model.py's JOIN) and the
rest of the pipeline (caching, streaming, splicing) works on it unchanged. A forward pass runs both models on the
same tokens and gives the logits of one of them, `side` (the first when none is set): scoring through the pair
on side "a" replaces hooks in both models and measures the first model's loss (the second's replacement cannot
reach those logits); eval/reconstruction.py scores a pair with no side set on both sides.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from sparse_coding.errors import ConfigError, ModelError
from sparse_coding.models.language_model import JOIN, LanguageModel

SIDES = ("a", "b")
_PROBE = "The quick brown fox jumps over the lazy dog 1234567890 — naïve café 東京 ```def f(x): return x```"


class PairedModel(LanguageModel):
    def __init__(self, a: LanguageModel, b: LanguageModel, side: str | None = None):
        if a.tokenizer.encode_batch([_PROBE]) != b.tokenizer.encode_batch([_PROBE]) or (
            a.tokenizer.special != b.tokenizer.special
        ):
            raise ConfigError(f"{a.name} and {b.name} tokenize text differently; model diffing needs one tokenizer")
        head = a.head if a.head == b.head else None
        note = a.head_note or b.head_note or ("" if head else f"{a.name} and {b.name} have different LM heads")
        super().__init__(
            nn.ModuleDict({"a": a.model, "b": b.model}),
            a.tokenizer,
            f"{a.name}+{b.name}",
            family="paired",
            head=head,
            base=nn.ModuleDict({"a": a.base, "b": b.base}),
            head_note=note,
        )
        self.layout = None
        self.pair, self.side = {"a": a, "b": b}, side

    def on(self, side: str) -> PairedModel:
        """The same pair giving the logits of `side` ("a" or "b")."""
        view = copy.copy(self)
        view.side = side
        return view

    def names(self) -> dict[str, str]:
        return {"model_name": self.pair["a"].name, "diff_model": self.pair["b"].name}

    def n_layers(self) -> int:
        return min(m.n_layers() for m in self.pair.values())

    def n_heads(self) -> int | None:
        return self.pair["a"].n_heads()

    def context_length(self) -> int | None:
        lengths = [n for m in self.pair.values() if (n := m.context_length()) is not None]
        return min(lengths) if lengths else None

    def hook_for(self, layer: int, layer_loc: str) -> str:
        return JOIN.join(f"{s}.{m.hook_for(layer, layer_loc)}" for s, m in self.pair.items())

    def resolve_hook(self, name: str) -> str:
        """`a.<path>` / `b.<path>`: that model's module; a plain path: the module of that name in both, joined."""
        side, _, rest = name.partition(".")
        if side in SIDES and rest:
            return f"{side}.{self.pair[side].resolve_hook(rest)}"
        return JOIN.join(f"{s}.{m.resolve_hook(name)}" for s, m in self.pair.items())

    def transcode_hooks(self, hook: str) -> tuple[str, str]:
        raise ModelError("model diffing trains crosscoders on one hook of both models, not transcoders")

    def mlp_transcode_hooks(self, layer: int) -> tuple[str, str]:
        return self.transcode_hooks("")

    def _forward(self, tokens: Tensor) -> Any:
        outs = {s: m._forward(tokens) for s, m in self.pair.items()}  # both run: either may hold a hook
        return outs[self.side or "a"]
