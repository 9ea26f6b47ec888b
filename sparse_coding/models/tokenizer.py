"""What the pipeline needs of a tokenizer: batched encoding, per-token decoding, the token that separates
documents when text is packed into rows, and the special tokens kept out of the stored activations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sparse_coding.errors import ConfigError, ModelError

# The kinds of special token a tokenizer may define, as named in --exclude_tokens (HF's attribute names less
# "_token"). The separator between documents is the first of SEPARATOR_KINDS the tokenizer has.
SPECIAL_KINDS = ("bos", "eos", "pad", "sep", "cls", "unk", "mask")
SEPARATOR_KINDS = ("eos", "sep", "bos")
EXCLUDE_DEFAULT, EXCLUDE_NONE = "default", "none"


@dataclass
class Tokenizer:
    encode_batch: Callable[[list[str]], list[list[int]]]  # without special tokens: documents are packed as is
    decode_tokens: Callable[[Sequence[int]], list[str]]  # one string per token id
    name: str
    special: dict[str, tuple[str, int]] = field(default_factory=dict)  # kind → (token, id), e.g. "sep": ("[SEP]", 102)
    special_ids: tuple[int, ...] = ()  # every special token the tokenizer defines
    token_to_id: Callable[[str], int | None] = lambda _token: None

    @classmethod
    def from_hf(cls, tok: Any, name: str) -> Tokenizer:
        """Wraps a transformers tokenizer."""
        special = {}
        for kind in SPECIAL_KINDS:
            token, token_id = getattr(tok, f"{kind}_token", None), getattr(tok, f"{kind}_token_id", None)
            if token is not None and token_id is not None:
                special[kind] = (str(token), int(token_id))
        unk = getattr(tok, "unk_token_id", None)

        def token_to_id(token: str) -> int | None:
            token_id = tok.convert_tokens_to_ids(token)
            return None if token_id is None or (token_id == unk and token != tok.unk_token) else int(token_id)

        return cls(
            encode_batch=lambda texts: tok(texts, add_special_tokens=False)["input_ids"],
            decode_tokens=lambda ids: [tok.decode([i]) for i in ids],
            name=getattr(tok, "name_or_path", "") or name,
            special=special,
            special_ids=tuple(sorted({int(i) for i in tok.all_special_ids})),
            token_to_id=token_to_id,
        )

    def separator(self, override: str = "") -> tuple[str, int]:
        """Gives the (token, id) placed between documents: `override` if given (one token of the vocabulary),
        else EOS, else the separator token (BERT's [SEP]), else BOS."""
        if override:
            token_id = self.token_to_id(override)
            if token_id is None:
                raise ConfigError(f"--doc_separator {override!r} is not a single token of {self.name}'s vocabulary")
            return override, token_id
        for kind in SEPARATOR_KINDS:
            if kind in self.special:
                return self.special[kind]
        raise ModelError(
            f"the tokenizer of {self.name} has no EOS, SEP or BOS token to separate documents; "
            "name one of its tokens with --doc_separator"
        )

    def excluded_ids(self, spec: str) -> dict[str, int]:
        """Gives the special tokens (token → id) whose positions are kept out of the stored activations:
        'default' = every special token the tokenizer defines, 'none' = nothing, or a comma-separated list of
        kinds (bos,eos,pad,sep,cls,unk,mask); a kind this tokenizer does not define is skipped."""
        if spec == EXCLUDE_NONE:
            return {}
        if spec == EXCLUDE_DEFAULT:
            named = {token: token_id for token, token_id in self.special.values()}
            others = {self.decode_tokens([i])[0]: i for i in self.special_ids if i not in named.values()}
            return {**named, **others}
        kinds = parse_exclude_tokens(spec)
        return {self.special[k][0]: self.special[k][1] for k in kinds if k in self.special}


def parse_exclude_tokens(spec: str) -> list[str]:
    """Gives the kinds in an --exclude_tokens value, or a ConfigError naming what is not one."""
    if spec in (EXCLUDE_DEFAULT, EXCLUDE_NONE):
        return []
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in SPECIAL_KINDS]
    if bad or not kinds:
        raise ConfigError(
            f"--exclude_tokens takes '{EXCLUDE_DEFAULT}', '{EXCLUDE_NONE}' or a comma-separated list of "
            f"{','.join(SPECIAL_KINDS)}; got {spec!r}"
        )
    return kinds
