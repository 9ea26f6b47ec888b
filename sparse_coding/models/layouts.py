"""Where each model family keeps its layers and, inside a layer, each --layer_loc.

Paths are module paths of the base model (what `AutoModel.from_pretrained(...)` prints, whichever head class
wraps it); a path ending in ":input" means that module's input rather than its output. The locations:
- mlp: the MLP's neurons, after the nonlinearity and, in gated MLPs (Llama, Mistral, Qwen2, Gemma 2, T5 v1.1),
  after the gate: act_fn(gate_proj(x)) * up_proj(x). That is always the input of the MLP's down projection.
- mlp_out: the MLP's output, before it joins the residual stream.
- attn: the attention's output, before it joins the residual stream (BERT-style layers: before their residual
  LayerNorm).
- attn_z: the attention heads' outputs side by side, before the output projection mixes them (the projection's
  input; TransformerLens' hook_z, [.., heads, d_head] flattened): [..., n_heads · d_head], head-major.
- residual: the residual stream after the layer (the layer's own output).
- mlp_in (for --transcode): the MLP's input, after the layer norm in front of it.
Families not listed get a layout guessed from the module names (`infer_layout`); --hook_name always works.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

INPUT = ":input"


@dataclass(frozen=True)
class Layout:
    blocks: str  # the ModuleList of layers
    mlp: str
    mlp_out: str
    attn: str
    attn_z: str = ""  # the attention's output projection's input; empty: the family has none found
    mlp_in: str = ""  # empty: the input of mlp_out's module
    residual: str = ""  # empty: the layer's own output

    def loc(self, name: str) -> str | None:
        """Gives the path inside a layer for a location name ("" = the layer's own output); None where the
        family has no such place."""
        if name == "residual":
            return self.residual
        if name == "mlp_in":
            return self.mlp_in or (f"{self.mlp_out}{INPUT}" if self.mlp_out else None)
        return getattr(self, name) or None


_GATED = Layout("layers", mlp="mlp.down_proj:input", mlp_out="mlp", attn="self_attn", attn_z="self_attn.o_proj:input")
_BERT = Layout(
    "encoder.layer",
    mlp="intermediate",
    mlp_out="output.dense",
    attn="attention.output.dense",
    attn_z="attention.output.dense:input",
    mlp_in="intermediate:input",
)
_T5 = Layout(
    "encoder.block",
    mlp="layer.1.DenseReluDense.wo:input",
    mlp_out="layer.1.DenseReluDense",
    attn="layer.0.SelfAttention",
    attn_z="layer.0.SelfAttention.o:input",
)

# config.model_type → layout. Our nanoGPT is laid out like GPT-2 but keeps the "transformer." prefix (it is
# its own base model).
LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout("h", mlp="mlp.act", mlp_out="mlp", attn="attn", attn_z="attn.c_proj:input"),
    "gpt_neox": Layout("layers", mlp="mlp.act", mlp_out="mlp", attn="attention", attn_z="attention.dense:input"),
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "phi3": _GATED,
    "opt": Layout(
        "decoder.layers",
        mlp="fc2:input",
        mlp_out="fc2",
        attn="self_attn",
        attn_z="self_attn.out_proj:input",
        mlp_in="fc1:input",
    ),
    "phi": Layout("layers", mlp="mlp.fc2:input", mlp_out="mlp", attn="self_attn", attn_z="self_attn.dense:input"),
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": Layout(
        "transformer.layer", mlp="ffn.lin2:input", mlp_out="ffn", attn="attention", attn_z="attention.out_lin:input"
    ),
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
    "nanogpt": Layout("transformer.h", mlp="mlp.gelu", mlp_out="mlp", attn="attn", attn_z="attn.c_proj:input"),
    # TransformerLens hook points are modules too (identity ones), so the same code reaches them.
    "transformer_lens": Layout(
        "blocks",
        mlp="mlp.hook_post",
        mlp_out="hook_mlp_out",
        attn="hook_attn_out",
        attn_z="attn.hook_z",
        mlp_in="ln2.hook_normalized",
        residual="hook_resid_post",
    ),
}

_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_DOWN_NAMES = ("down_proj", "c_proj", "fc2", "fc_out", "dense_4h_to_h", "wo", "w2", "lin2")
_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "out_lin", "wo", "o")


def infer_layout(base: nn.Module) -> Layout | None:
    """Guesses the layout of an unlisted family: the longest list of layers, and inside the first layer the
    usual names of the MLP, its down projection and the attention. Locations not found are left empty."""
    lists = [(n, m) for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and n]
    if not lists:
        return None
    blocks, layers = max(lists, key=lambda nm: len(nm[1]))
    first = layers[0]
    mlp = _child(first, _MLP_NAMES)
    attn = _child(first, _ATTN_NAMES) or ""
    down = _child(first.get_submodule(mlp), _DOWN_NAMES) if mlp else None
    out = _child(first.get_submodule(attn), _OUT_NAMES) if attn else None
    return Layout(
        blocks,
        mlp=f"{mlp}.{down}{INPUT}" if down else "",
        mlp_out=mlp or "",
        attn=attn,
        attn_z=f"{attn}.{out}{INPUT}" if out else "",
    )


def _child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)
