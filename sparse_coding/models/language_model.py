"""Language models behind one small interface: activations at one or more hooks from one forward pass (which
stops once the last of them is reached), and logits with a hook's value replaced (CE loss recovered / KL).

Three kinds of model: Hugging Face `transformers` models from a folder or the hub (hf.py), TransformerLens models
by name, and our nanoGPT checkpoints. A hook is a module path of the base model (what `AutoModel` prints, e.g.
`layers.3.mlp`; the head class's own path, `model.layers.3.mlp`, is accepted too), optionally ending in ":input"
for the module's input rather than its output. TransformerLens hook points (`blocks.3.hook_mlp_out`) are
modules too, so the same code reaches them. `--layer`/`--layer_loc` map to a hook through the family's layout
(layouts.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from sparse_coding.errors import ModelError
from sparse_coding.models.layouts import INPUT, LAYOUTS, Layout, infer_layout
from sparse_coding.models.tokenizer import Tokenizer

LAYER_LOCS = ("mlp", "mlp_out", "residual", "attn", "attn_z")
# Joins hooks whose values a cross-layer dictionary reads side by side: "a+b" is a's value then b's, along the last
# dimension ([B, T, d_a + d_b]), from one forward pass.
JOIN = "+"
MODEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADS = ("causal", "masked")  # what a trained LM head predicts: the next token, or masked tokens
# (the hook's value, the source hook's value) → the value the model goes on with. The source is the hook's own
# value unless `logits` is given another source hook (a transcoder reads a module's input, replaces its output).
Replace = Callable[[Tensor, Tensor], Tensor]
# (layer j, target j's value, source j's value) → the value the model goes on with (LanguageModel.logits_layered).
LayerReplace = Callable[[int, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Hook:
    """A module path and which side of the module: its output (the default) or its input (":input")."""

    module: str
    input: bool = False

    @classmethod
    def parse(cls, name: str) -> Hook:
        module, sep, side = name.partition(":")
        if sep and side != INPUT[1:]:
            raise ModelError(f"hook {name!r}: a module path may end in {INPUT!r} (its input) and nothing else")
        return cls(module, bool(sep))

    def __str__(self) -> str:
        return self.module + (INPUT if self.input else "")


class _Stop(Exception):
    """Raised by a capture hook to end the forward pass once every hooked activation is in hand."""


class LanguageModel:
    """A model, its tokenizer, where its hooks are and what its LM head (if any, and trained) predicts.

    model: what runs forward (the head class when there is a trained head); base: the module tree hook names
    are relative to (the base model); head: "causal", "masked" or None; head_note says why there is none."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        name: str,
        family: str,
        head: str | None = "causal",
        base: nn.Module | None = None,
        head_note: str = "",
    ):
        self.model, self.tokenizer, self.name, self.family = model.eval(), tokenizer, name, family
        self.base = base if base is not None else model
        self.head, self.head_note = head, head_note
        self.layout: Layout | None = LAYOUTS.get(family) or infer_layout(self.base)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- hooks --------------------------------------------------------------------------------------------
    def _blocks(self) -> nn.ModuleList:
        if self.layout is None:
            raise ModelError(f"cannot find the layers of {self.name}; pass --hook_name")
        return self.base.get_submodule(self.layout.blocks)

    def n_layers(self) -> int:
        return len(self._blocks())

    def names(self) -> dict[str, str]:
        """What loads this model again (load_language_model's arguments), as SAE metadata keeps it."""
        return {"model_name": self.name}

    def n_heads(self) -> int | None:
        """Gives the attention heads per layer, from the model's config (None where it does not say)."""
        return self._config_int("n_head", "num_attention_heads", "n_heads", "num_heads")

    def _config_int(self, *keys: str) -> int | None:
        """The first of keys the model's config (HF's `config`, TransformerLens' `cfg`) sets to an int."""
        for cfg in (getattr(self.model, "config", None), getattr(self.model, "cfg", None)):
            for key in keys:
                value = getattr(cfg, key, None)
                if isinstance(value, int):
                    return value
        return None

    def hook_for(self, layer: int, layer_loc: str) -> str:
        """Gives the hook of a layer's location: mlp (neurons), mlp_out, residual, attn, attn_z (the heads' outputs
        before the output projection); mlp_in for --transcode."""
        if layer_loc not in (*LAYER_LOCS, "mlp_in"):
            raise ModelError(f"layer_loc must be one of {LAYER_LOCS}, got {layer_loc!r}")
        n = self.n_layers()
        if not 0 <= layer < n:
            raise ModelError(f"layer {layer} is out of range: {self.name} has layers 0..{n - 1}")
        assert self.layout is not None  # _blocks() found it
        inner = self.layout.loc(layer_loc)
        if inner is None:
            raise ModelError(f"{self.name} ({self.family}) has no {layer_loc!r} in its layers; pass --hook_name")
        hook = f"{self.layout.blocks}.{layer}" + (f".{inner}" if inner else "")
        return self.resolve_hook(hook)

    def transcode_hooks(self, hook: str) -> tuple[str, str]:
        """Gives the (input, output) hooks a transcoder over `hook`'s module maps between."""
        h = Hook.parse(self.resolve_hook(hook))
        if h.input:
            raise ModelError(f"--transcode needs a module to replace, not a module's input ({hook!r})")
        return str(Hook(h.module, input=True)), str(h)

    def mlp_transcode_hooks(self, layer: int) -> tuple[str, str]:
        """Gives the (input, output) hooks of a layer's MLP, what --transcode maps between by default."""
        return self.hook_for(layer, "mlp_in"), self.hook_for(layer, "mlp_out")

    def resolve_hook(self, name: str) -> str:
        """Gives the hook's canonical name (the base model's path), or a ModelError naming near misses."""
        hook = Hook.parse(name)
        return str(Hook(self._canonical(hook.module), hook.input))

    def _canonical(self, path: str) -> str:
        for root in (self.base, self.model):
            try:
                module = root.get_submodule(path)
            except AttributeError:
                continue
            if root is self.base:
                return path
            names = {id(m): n for n, m in self.base.named_modules()}
            return names.get(id(module), path)  # the head class's path to a module of the base model, or its own
        last = path.split(".")[-1]
        near = [n for n, _ in self.base.named_modules() if n and n.split(".")[-1] == last]
        hint = f"; modules with that ending: {', '.join(near[:6])}" if near else ""
        raise ModelError(f"{self.name} has no module {path!r}{hint}")

    def context_length(self) -> int | None:
        """Gives the longest input the model takes (None when its config does not say)."""
        return self._config_int("n_positions", "max_position_embeddings", "n_ctx", "block_size")

    # --- forward passes -----------------------------------------------------------------------------------
    def _forward(self, tokens: Tensor) -> Any:
        return self.model(input_ids=tokens)

    def _attach(self, hook: Hook, fn: Callable[[Tensor], Tensor | None], rows: torch.Size) -> RemovableHandle:
        """Calls fn on the hook's value, as [B, T, d] for token rows of shape [B, T], at each forward; a tensor
        it returns replaces that value. (Some modules see tokens flattened: OPT's fc1/fc2 take [B·T, d].)"""
        path = self._canonical(hook.module)
        try:
            module = self.base.get_submodule(path)
        except AttributeError:  # a module of the head class outside the base model (lm_head, cls.predictions)
            module = self.model.get_submodule(path)

        def call(value: Any) -> Any:
            if not isinstance(value, Tensor):
                raise ModelError(f"hook {hook} gives a {type(value).__name__}, not a tensor; hook a module inside it")
            # [B·T, d] (OPT's fc1/fc2), or per head [B, T, heads, d_head] (TransformerLens' hook_z): as [B, T, -1]
            per_head = value.dim() > 3 and value.shape[:2] == rows
            flat = per_head or (value.dim() == 2 and value.shape[0] == rows.numel())
            new = fn(value.reshape(*rows, -1) if flat else value)
            return None if new is None else new.reshape(value.shape)

        if hook.input:

            def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                if args:
                    new = call(args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                new = call(kwargs[key])
                return None if new is None else (args, {**kwargs, key: new})

            return module.register_forward_pre_hook(pre, with_kwargs=True)

        def post(_module: nn.Module, _args: Any, output: Any) -> Any:
            new = call(output[0] if isinstance(output, tuple) else output)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return module.register_forward_hook(post)

    @torch.no_grad()
    def activations(self, tokens: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
        """tokens [B, T] → {hook: its value [B, T, d]} from one forward pass, which stops at the last of them. A
        hook joined with '+' (JOIN) gives its parts' values side by side."""
        if isinstance(hooks, str):  # a str is a Sequence too: its characters would be taken as hook names
            raise TypeError(f"hooks is a list of hook names; pass [{hooks!r}]")
        parts = {h: h.split(JOIN) for h in hooks}
        values = self._capture(tokens, [p for ps in parts.values() for p in ps])
        return {h: torch.cat([values[p] for p in ps], dim=-1) if len(ps) > 1 else values[h] for h, ps in parts.items()}

    def _capture(self, tokens: Tensor, hooks: list[str]) -> dict[str, Tensor]:
        wanted = list(dict.fromkeys(hooks))
        captured: dict[str, Tensor] = {}

        def capture(name: str) -> Callable[[Tensor], None]:
            def fn(value: Tensor) -> None:
                captured.setdefault(name, value)
                if len(captured) == len(wanted):
                    raise _Stop

            return fn

        handles = [self._attach(Hook.parse(h), capture(h), tokens.shape) for h in wanted]
        try:
            self._forward(tokens.to(self.device))
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [h for h in wanted if h not in captured]
        if missing:
            raise ModelError(f"the forward pass of {self.name} never reached {', '.join(missing)}")
        return captured

    @torch.no_grad()
    def logits(
        self, tokens: Tensor, hook: str | None = None, replace: Replace | None = None, source: str | None = None
    ) -> Tensor:
        """tokens [B, T] → logits [B, T, vocab], with the hook's value swapped for replace(value, source value),
        the source being another hook read earlier in the same pass (default: the hook itself)."""
        handles = []
        if hook is not None and replace is not None:
            seen: dict[str, Tensor] = {}

            def remember(value: Tensor) -> None:
                seen["source"] = value

            def swap(value: Tensor) -> Tensor:
                if source is not None and "source" not in seen:
                    raise ModelError(f"{source} is not reached before {hook} in {self.name}'s forward pass")
                return replace(value, seen.get("source", value))

            if source is not None and source != hook:
                handles.append(self._attach(Hook.parse(source), remember, tokens.shape))
            handles.append(self._attach(Hook.parse(hook), swap, tokens.shape))
        return self._logits_with(tokens, handles)

    @torch.no_grad()
    def logits_layered(
        self, tokens: Tensor, targets: Sequence[str], sources: Sequence[str], replace: LayerReplace
    ) -> Tensor:
        """tokens [B, T] → logits [B, T, vocab] with every target hook j's value swapped for replace(j, value,
        source j's value in this pass): a cross-layer transcoder replacing all its MLP outputs at once, each layer
        reading its input as the replaced layers before it left it. Source j must come before target j in the
        forward pass, and the targets in order."""
        seen: dict[int, Tensor] = {}
        done: list[int] = []

        def remember(j: int) -> Callable[[Tensor], None]:
            def fn(value: Tensor) -> None:
                seen[j] = value

            return fn

        def swap(j: int) -> Callable[[Tensor], Tensor]:
            def fn(value: Tensor) -> Tensor:
                if j not in seen or done != list(range(j)):
                    raise ModelError(f"{sources[j]} and {targets[j]} are not reached in order in {self.name}'s pass")
                done.append(j)
                return replace(j, value, seen[j])

            return fn

        handles = [self._attach(Hook.parse(h), remember(j), tokens.shape) for j, h in enumerate(sources)]
        handles += [self._attach(Hook.parse(h), swap(j), tokens.shape) for j, h in enumerate(targets)]
        return self._logits_with(tokens, handles)

    def _logits_with(self, tokens: Tensor, handles: list[RemovableHandle]) -> Tensor:
        """The logits of a forward pass with the hooks attached (removed after it, whatever happens)."""
        try:
            out = self._forward(tokens.to(self.device))
        finally:
            for handle in handles:
                handle.remove()
        return out.logits if hasattr(out, "logits") else out


class NanoGPTModel(LanguageModel):
    def _forward(self, tokens: Tensor) -> Any:
        return self.model(tokens)


class TransformerLensModel(LanguageModel):
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, name: str):
        super().__init__(model, tokenizer, name, family="transformer_lens")

    def transcode_hooks(self, hook: str) -> tuple[str, str]:
        raise ModelError(
            f"{hook!r}: a TransformerLens hook point's input is its output; use --transcode with --layer "
            "(the MLP's ln2.hook_normalized → hook_mlp_out)"
        )

    def _forward(self, tokens: Tensor) -> Any:
        return self.model(tokens)


def load_language_model(
    name: str, device: torch.device, dtype: torch.dtype = torch.float32, diff_model: str = ""
) -> LanguageModel:
    """Gives the model named: a local nanoGPT checkpoint or HF folder, else a TransformerLens or HF hub name.
    dtype is the forward pass's (--model_dtype). With diff_model, the pair of the two (models/paired.py)."""
    if diff_model:
        from sparse_coding.models.paired import PairedModel

        return PairedModel(load_language_model(name, device, dtype), load_language_model(diff_model, device, dtype))
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "train_summary.json").is_file():
            from sparse_coding.models.nanogpt import load_checkpoint

            model, tok, _ = load_checkpoint(path)
            return NanoGPTModel(model.to(device, dtype), Tokenizer.from_hf(tok, str(path)), str(path), "nanogpt")
        from sparse_coding.models.hf import load_hf

        return load_hf(str(path), device, dtype)
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model folder {name!r} not found")
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        official = None
    if official is None:
        from sparse_coding.models.hf import load_hf

        return load_hf(name, device, dtype)
    try:
        model = HookedTransformer.from_pretrained(official, device=str(device), dtype=dtype)
    except Exception as e:  # network, hub or conversion: one line naming the model
        raise ModelError(f"cannot load {name!r} with TransformerLens: {type(e).__name__}: {e}") from e
    return TransformerLensModel(model, Tokenizer.from_hf(model.tokenizer, official), official)


def load_tokenizer(name: str) -> Tokenizer:
    """Gives only the tokenizer of a model (no weights): a nanoGPT checkpoint's tokenizer.json, else HF's."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / "train_summary.json").is_file():
        from sparse_coding.models.nanogpt import load_tokenizer as nanogpt_tokenizer

        return Tokenizer.from_hf(nanogpt_tokenizer(path), str(path))
    from transformers import AutoTokenizer

    try:
        return Tokenizer.from_hf(AutoTokenizer.from_pretrained(name), name)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {type(e).__name__}: {e}") from e
