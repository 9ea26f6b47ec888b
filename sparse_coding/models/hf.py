"""Hugging Face `transformers` models, from a local folder or the hub, with an honest answer to "does this
checkpoint have a trained language-model head?".

A head counts only if the checkpoint declares a head class (config.json's `architectures`, when present) and
loading it into that class leaves no head weight missing, mismatched or newly initialised
(`from_pretrained(..., output_loading_info=True)`). A tied head (GPT-2's lm_head = the embeddings) is filled
without being reported missing, which is why the declared class matters too: a GPT2Model checkpoint is
headless even though its embeddings could be tied into a head. Without a trained head the base model alone is
kept and CE/KL are null. Encoder-decoder checkpoints (T5) load their encoder only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparse_coding.errors import ModelError
from sparse_coding.models.language_model import LanguageModel
from sparse_coding.models.tokenizer import Tokenizer

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_MASKED_SUFFIX = "ForMaskedLM"
# Encoder-only classes for encoder-decoder families: the decoder's weights are never loaded. Other
# encoder-decoders load whole and keep `get_encoder()`.
_ENCODER_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


def load_hf(name: str, device: torch.device, dtype: torch.dtype) -> LanguageModel:
    """Gives the HF model `name` (a folder or hub name) with its tokenizer and its trained head, if any."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name)
        tok = transformers.AutoTokenizer.from_pretrained(name)
    except Exception as e:  # hub, network, missing files: one line naming the model
        raise ModelError(f"cannot load {name!r} (config or tokenizer): {type(e).__name__}: {e}") from e
    tokenizer = Tokenizer.from_hf(tok, name)
    try:
        if getattr(config, "is_encoder_decoder", False):
            model, head, note = _load_encoder(name, config, dtype), None, "only the encoder of an encoder-decoder"
            base = model
        else:
            model, base, head, note = _load_with_head(name, config, dtype, tokenizer)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"cannot load model {name!r}: {type(e).__name__}: {e}") from e
    if head is None:
        print(f"{name}: no trained language-model head ({note}); CE loss recovered and KL will be null")
    return LanguageModel(model.to(device), tokenizer, name, config.model_type, head, base, note)


def declared_head(config: Any) -> str | None:
    """Gives the head the checkpoint says it has: "causal", "masked", or None; with no `architectures` in its
    config, the head the family usually has (masked for families with both, such as BERT and RoBERTa)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(_MASKED_SUFFIX) for a in archs):
        return "masked"
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        return "causal"
    if archs:
        return None  # a base model or a task head (classification, ...): no LM head was saved
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    return "causal" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None


def _load_with_head(
    name: str, config: Any, dtype: torch.dtype, tokenizer: Tokenizer
) -> tuple[nn.Module, nn.Module, str | None, str]:
    """Gives (model to run, base model, head, why no head): the head class when its weights all load."""
    import transformers

    head = declared_head(config)
    if head == "masked" and "mask" not in tokenizer.special:
        head, note = None, "a masked-LM head, but the tokenizer has no mask token"
    elif head is None:
        note = f"the checkpoint is a {', '.join(getattr(config, 'architectures', None) or [config.model_type])}"
    if head is None:
        model = transformers.AutoModel.from_pretrained(name, dtype=dtype)
        return model, model, None, note
    auto = transformers.AutoModelForMaskedLM if head == "masked" else transformers.AutoModelForCausalLM
    model, info = auto.from_pretrained(name, dtype=dtype, output_loading_info=True)
    prefix = f"{model.base_model_prefix}."
    untrained = sorted(
        k
        for k in [*info["missing_keys"], *(m[0] if isinstance(m, tuple) else m for m in info["mismatched_keys"])]
        if not k.startswith(prefix)
    )
    if untrained:
        return model.base_model, model.base_model, None, f"head weights not in the checkpoint: {', '.join(untrained)}"
    return model, model.base_model, head, ""


def _load_encoder(name: str, config: Any, dtype: torch.dtype) -> nn.Module:
    import transformers

    cls_name = _ENCODER_CLASSES.get(config.model_type)
    if cls_name is not None:
        return getattr(transformers, cls_name).from_pretrained(name, dtype=dtype)
    return transformers.AutoModel.from_pretrained(name, dtype=dtype).get_encoder()
