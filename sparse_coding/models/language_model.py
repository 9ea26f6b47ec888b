"""Language models behind one small interface: activations at a hook (the forward pass stops right after it)
and logits with the hook's output replaced (for CE loss recovered / KL).

Three families: TransformerLens models by name (hook names such as blocks.2.hook_mlp_out), any Hugging Face
`transformers` model from a local folder or the hub (hook = a module path such as transformer.h.2.mlp), and our
own nanoGPT checkpoints (module paths laid out like GPT-2's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparse_coding.errors import ModelError

# mlp: the MLP's hidden neurons after the nonlinearity (the original research code's choice; the widest and most
# polysemantic place); mlp_out: the MLP's output; residual: the residual stream after the block; attn: attention output.
LAYER_LOCS = ("mlp", "mlp_out", "residual", "attn")
Replace = Callable[[Tensor], Tensor]  # [B, T, d] → [B, T, d]


@dataclass
class Tokenizer:
    """What the pipeline needs of a tokenizer, for HF tokenizers and `tokenizers.Tokenizer` alike."""

    encode_batch: Callable[[list[str]], list[list[int]]]
    decode_tokens: Callable[[Sequence[int]], list[str]]  # one string per token id
    eos_id: int
    name: str
    special_ids: tuple[int, ...] = ()  # structural special tokens (BOS, EOS, PAD, SEP), left out of evals

    @classmethod
    def from_hf(cls, tok: Any, name: str) -> Tokenizer:
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
        if eos is None:
            raise ModelError(f"tokenizer of {name} has no EOS (or BOS) token to separate documents")
        attrs = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id")  # as SAELens' get_special_token_ids
        special = {int(i) for i in (getattr(tok, a, None) for a in attrs) if i is not None}
        return cls(
            encode_batch=lambda texts: tok(texts, add_special_tokens=False)["input_ids"],
            decode_tokens=lambda ids: [tok.decode([i]) for i in ids],
            eos_id=int(eos),
            name=getattr(tok, "name_or_path", "") or name,
            special_ids=tuple(sorted(special | {int(eos)})),
        )

    @classmethod
    def from_tokenizers(cls, tok: Any, name: str, eos_token: str = "<|endoftext|>") -> Tokenizer:
        eos = tok.token_to_id(eos_token)
        if eos is None:
            raise ModelError(f"tokenizer of {name} has no {eos_token!r} token")
        return cls(
            encode_batch=lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)],
            decode_tokens=lambda ids: [tok.decode([i]) for i in ids],
            eos_id=int(eos),
            name=name,
            special_ids=(int(eos),),
        )


class _Stop(Exception):
    """Raised by a capture hook to end the forward pass once the hooked activation is in hand."""


class LanguageModel:
    """A model, its tokenizer and how to reach a hook. Subclasses differ only in how hooks are attached."""

    family = "module"

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, name: str, has_lm_head: bool = True):
        self.model, self.tokenizer, self.name, self.has_lm_head = model.eval(), tokenizer, name, has_lm_head

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- hooks --------------------------------------------------------------------------------------------
    def n_layers(self) -> int:
        return len(self._blocks()[1])

    def hook_for(self, layer: int, layer_loc: str) -> str:
        """Gives the hook (module path) for a layer and location: mlp output, residual stream, attention output."""
        if layer_loc not in LAYER_LOCS:
            raise ModelError(f"layer_loc must be one of {LAYER_LOCS}, got {layer_loc!r}")
        path, blocks = self._blocks()
        if not 0 <= layer < len(blocks):
            raise ModelError(f"layer {layer} is out of range: {self.name} has layers 0..{len(blocks) - 1}")
        if layer_loc == "residual":
            return f"{path}.{layer}"
        block = f"{path}.{layer}"
        mlp = _child(blocks[layer], ("mlp", "feed_forward", "ffn"))
        if layer_loc == "attn":
            attn = _child(blocks[layer], ("attn", "attention", "self_attn"))
            if attn:
                return f"{block}.{attn}"
        elif mlp and layer_loc == "mlp_out":
            return f"{block}.{mlp}"
        elif mlp:
            act = _child(blocks[layer].get_submodule(mlp), ("act", "gelu", "act_fn", "activation_fn", "activation"))
            if act:
                return f"{block}.{mlp}.{act}"
        raise ModelError(f"cannot place layer_loc {layer_loc!r} in block {block} of {self.name}; pass --hook_name")

    def _blocks(self) -> tuple[str, nn.ModuleList]:
        for path in (
            "transformer.h",
            "gpt_neox.layers",
            "model.layers",
            "model.decoder.layers",
            "transformer.layers",
            "layers",
            "h",
        ):
            try:
                mod = self.model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(mod, nn.ModuleList):
                return path, mod
        lists = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        if not lists:
            raise ModelError(f"cannot find the layers of {self.name}; pass --hook_name")
        return max(lists, key=lambda nm: len(nm[1]))

    def check_hook(self, hook_name: str) -> None:
        try:
            self.model.get_submodule(hook_name)
        except AttributeError:
            near = [n for n, _ in self.model.named_modules() if n and n.split(".")[-1] == hook_name.split(".")[-1]]
            hint = f"; modules with that ending: {', '.join(near[:6])}" if near else ""
            raise ModelError(f"{self.name} has no module {hook_name!r}{hint}") from None

    def context_length(self) -> int | None:
        """Gives the longest input the model takes (None when its config does not say)."""
        cfg = getattr(self.model, "config", None)
        for key in ("n_positions", "max_position_embeddings", "n_ctx", "block_size"):
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                return value
        return None

    # --- forward passes -----------------------------------------------------------------------------------
    def _forward(self, tokens: Tensor) -> Any:
        return self.model(input_ids=tokens)

    @torch.no_grad()
    def activations(self, tokens: Tensor, hook_name: str) -> Tensor:
        """tokens [B, T] → the hook's output [B, T, d]; nothing after the hooked module runs."""
        captured: list[Tensor] = []

        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _Stop

        handle = self.model.get_submodule(hook_name).register_forward_hook(capture)
        try:
            self._forward(tokens.to(self.device))
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise ModelError(f"the forward pass of {self.name} never reached {hook_name!r}")
        return captured[0]

    @torch.no_grad()
    def logits(self, tokens: Tensor, hook_name: str | None = None, replace: Replace | None = None) -> Tensor:
        """tokens [B, T] → logits [B, T, vocab], with the hook's output swapped for replace(output) if given."""
        handle = None
        if hook_name is not None and replace is not None:

            def swap(_module: nn.Module, _inputs: Any, output: Any) -> Any:
                if isinstance(output, tuple):
                    return (replace(output[0]), *output[1:])
                return replace(output)

            handle = self.model.get_submodule(hook_name).register_forward_hook(swap)
        try:
            out = self._forward(tokens.to(self.device))
        finally:
            if handle is not None:
                handle.remove()
        return out.logits if hasattr(out, "logits") else out


def _child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


class NanoGPTModel(LanguageModel):
    family = "nanogpt"

    def _forward(self, tokens: Tensor) -> Any:
        return self.model(tokens)


class TransformerLensModel(LanguageModel):
    """A HookedTransformer; hooks are its hook points (blocks.L.hook_mlp_out, ...)."""

    family = "transformer_lens"
    LOC_HOOKS = {
        "mlp": "mlp.hook_post",
        "mlp_out": "hook_mlp_out",
        "residual": "hook_resid_post",
        "attn": "hook_attn_out",
    }

    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    def context_length(self) -> int | None:
        return self.model.cfg.n_ctx

    def hook_for(self, layer: int, layer_loc: str) -> str:
        if layer_loc not in LAYER_LOCS:
            raise ModelError(f"layer_loc must be one of {LAYER_LOCS}, got {layer_loc!r}")
        if not 0 <= layer < self.n_layers():
            raise ModelError(f"layer {layer} is out of range: {self.name} has layers 0..{self.n_layers() - 1}")
        return f"blocks.{layer}.{self.LOC_HOOKS[layer_loc]}"

    def check_hook(self, hook_name: str) -> None:
        if hook_name not in self.model.hook_dict:
            near = [h for h in self.model.hook_dict if h.endswith(hook_name.split(".")[-1])]
            hint = f"; e.g. {', '.join(near[:4])}" if near else ""
            raise ModelError(f"{self.name} has no hook {hook_name!r}{hint}")

    @torch.no_grad()
    def activations(self, tokens: Tensor, hook_name: str) -> Tensor:
        parts = hook_name.split(".")
        stop = int(parts[1]) + 1 if parts[0] == "blocks" and parts[1].isdigit() else None
        _, cache = self.model.run_with_cache(tokens.to(self.device), names_filter=[hook_name], stop_at_layer=stop)
        return cache[hook_name]

    @torch.no_grad()
    def logits(self, tokens: Tensor, hook_name: str | None = None, replace: Replace | None = None) -> Tensor:
        hooks = [] if hook_name is None or replace is None else [(hook_name, lambda act, hook: replace(act))]
        return self.model.run_with_hooks(tokens.to(self.device), fwd_hooks=hooks)


def load_language_model(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> LanguageModel:
    """Gives the model named: a local nanoGPT checkpoint or HF folder, else a TransformerLens or HF hub name."""
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "train_summary.json").is_file():
            from sparse_coding.models.nanogpt import load_checkpoint

            model, tok, _ = load_checkpoint(path)
            return NanoGPTModel(model.to(device, dtype), _wrap_tokenizer(tok, str(path)), str(path))
        return _load_hf(str(path), device, dtype)
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model folder {name!r} not found")
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        official = None
    if official is not None:
        try:
            model = HookedTransformer.from_pretrained(official, device=str(device), dtype=dtype)
        except Exception as e:  # network, hub or conversion: one line naming the model
            raise ModelError(f"cannot load {name!r} with TransformerLens: {type(e).__name__}: {e}") from e
        return TransformerLensModel(model, Tokenizer.from_hf(model.tokenizer, official), official)
    return _load_hf(name, device, dtype)


def _load_hf(name: str, device: torch.device, dtype: torch.dtype) -> LanguageModel:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise ModelError(f"cannot load a tokenizer for {name!r}: {type(e).__name__}: {e}") from e
    try:
        model, has_head = AutoModelForCausalLM.from_pretrained(name, torch_dtype=dtype), True
    except ValueError:  # an architecture without a language-model head: activations only, no CE/KL
        model, has_head = AutoModel.from_pretrained(name, torch_dtype=dtype), False
    except Exception as e:
        raise ModelError(f"cannot load model {name!r}: {type(e).__name__}: {e}") from e
    return LanguageModel(model.to(device), Tokenizer.from_hf(tok, name), name, has_lm_head=has_head)


def _wrap_tokenizer(tok: Any, name: str) -> Tokenizer:
    if hasattr(tok, "token_to_id"):  # a bare `tokenizers.Tokenizer`
        return Tokenizer.from_tokenizers(tok, name)
    return Tokenizer.from_hf(tok, name)


def token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy in nats at each position [B, T-1]: logits [B, T, V] at 0..T-2 predict 1..T-1."""
    targets = tokens[:, 1:].to(logits.device)
    return nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, reduction="none")


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats: logits [B, T, V] at positions 0..T-2 predict tokens 1..T-1."""
    return token_ce(logits, tokens).mean()


def load_tokenizer(name: str) -> Tokenizer:
    """Gives only the tokenizer of a model (no weights): a nanoGPT checkpoint's tokenizer.json, else HF's."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / "train_summary.json").is_file():
        from tokenizers import Tokenizer as RawTokenizer

        return Tokenizer.from_tokenizers(RawTokenizer.from_file(str(path / "tokenizer.json")), str(path))
    from transformers import AutoTokenizer

    try:
        return Tokenizer.from_hf(AutoTokenizer.from_pretrained(name), name)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {type(e).__name__}: {e}") from e
