"""One tiny random-weight model per supported HF family, built from its config offline (no hub) and saved to a
folder with a small tokenizer of the family's own special tokens, plus what each family's layer looks like,
written out by hand here (independently of sparse_coding/models/layouts.py) so tests can check the mapping."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from lm_fixtures import WORDS
from tokenizers import Tokenizer, models, pre_tokenizers

SMALL = {"vocab_size": 64}
# 2 layers, d 32, MLP 48: the HF config keys most families share
HF_SIZES = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    **SMALL,
}
LLAMA_LIKE = {**HF_SIZES, "num_key_value_heads": 2}
BERT_LIKE = {**HF_SIZES, "max_position_embeddings": 66}
# special tokens per tokenizer style: HF attribute → token
GPT_SPECIALS = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}
LLAMA_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
BERT_SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
ROBERTA_SPECIALS = {
    "bos_token": "<s>",
    "pad_token": "<pad>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "cls_token": "<s>",
    "sep_token": "</s>",
    "mask_token": "<mask>",
}
T5_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass
class Family:
    """A family's tiny model and, inside layer L, the modules (paths from the base model, by hand) whose output is
    the attention output, the MLP output, the MLP's down projection (its input = the neurons) and the attention's
    output projection (its input = the heads' outputs side by side)."""

    model_type: str
    config: Any
    head_class: Any  # the class saved when the family has an LM head; None: saved as the base model
    specials: dict[str, str]
    blocks: str
    attn: str
    mlp_out: str
    down: str
    out_proj: str
    head: str | None = "causal"

    def module(self, layer: int, inner: str) -> str:
        return f"{self.blocks}.{layer}.{inner}" if inner else f"{self.blocks}.{layer}"


def _llama_like(model_type: str, config: Any, head_class: Any) -> Family:
    """Llama, Mistral, Qwen2, Gemma 2: the same layer layout, a gated MLP whose down projection reads the neurons."""
    return Family(
        model_type, config, head_class, LLAMA_SPECIALS, blocks="layers", attn="self_attn", mlp_out="mlp",
        down="mlp.down_proj", out_proj="self_attn.o_proj",
    )  # fmt: skip


def _bert_like(model_type: str, config: Any, head_class: Any, specials: dict[str, str]) -> Family:
    """BERT, RoBERTa: attention and MLP outputs are dense layers inside their residual LayerNorm blocks."""
    return Family(
        model_type, config, head_class, specials, blocks="encoder.layer", attn="attention.output.dense",
        mlp_out="output.dense", down="output.dense", out_proj="attention.output.dense", head="masked",
    )  # fmt: skip


FAMILIES = {
    "gpt2": Family(
        "gpt2",
        tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0, **SMALL),
        tf.GPT2LMHeadModel,
        GPT_SPECIALS,
        blocks="h",
        attn="attn",
        mlp_out="mlp",
        down="mlp.c_proj",
        out_proj="attn.c_proj",
    ),
    "gpt_neox": Family(
        "gpt_neox",
        tf.GPTNeoXConfig(**HF_SIZES),
        tf.GPTNeoXForCausalLM,
        GPT_SPECIALS,
        blocks="layers",
        attn="attention",
        mlp_out="mlp",
        down="mlp.dense_4h_to_h",
        out_proj="attention.dense",
    ),
    "llama": _llama_like("llama", tf.LlamaConfig(**LLAMA_LIKE), tf.LlamaForCausalLM),
    "mistral": _llama_like("mistral", tf.MistralConfig(**LLAMA_LIKE), tf.MistralForCausalLM),
    "qwen2": _llama_like("qwen2", tf.Qwen2Config(**LLAMA_LIKE), tf.Qwen2ForCausalLM),
    "gemma2": _llama_like("gemma2", tf.Gemma2Config(**LLAMA_LIKE, head_dim=8), tf.Gemma2ForCausalLM),
    "opt": Family(
        "opt",
        tf.OPTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            ffn_dim=48,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            **SMALL,
        ),
        tf.OPTForCausalLM,
        GPT_SPECIALS,
        blocks="decoder.layers",
        attn="self_attn",
        mlp_out="fc2",
        down="fc2",
        out_proj="self_attn.out_proj",
    ),
    "phi": Family(
        "phi",
        tf.PhiConfig(**HF_SIZES),
        tf.PhiForCausalLM,
        GPT_SPECIALS,
        blocks="layers",
        attn="self_attn",
        mlp_out="mlp",
        down="mlp.fc2",
        out_proj="self_attn.dense",
    ),
    "bert": _bert_like("bert", tf.BertConfig(**BERT_LIKE), tf.BertForMaskedLM, BERT_SPECIALS),
    "roberta": _bert_like(
        "roberta", tf.RobertaConfig(**BERT_LIKE, pad_token_id=1), tf.RobertaForMaskedLM, ROBERTA_SPECIALS
    ),
    "distilbert": Family(
        "distilbert",
        tf.DistilBertConfig(n_layers=2, dim=32, hidden_dim=48, n_heads=4, max_position_embeddings=64, **SMALL),
        tf.DistilBertForMaskedLM,
        BERT_SPECIALS,
        blocks="transformer.layer",
        attn="attention",
        mlp_out="ffn",
        down="ffn.lin2",
        out_proj="attention.out_lin",
        head="masked",
    ),
    "t5": Family(
        "t5",
        tf.T5Config(num_layers=2, d_model=32, d_ff=48, d_kv=8, num_heads=4, feed_forward_proj="gated-gelu", **SMALL),
        tf.T5ForConditionalGeneration,  # saved whole, as the hub has it: only the encoder is loaded
        T5_SPECIALS,
        blocks="encoder.block",
        attn="layer.0.SelfAttention",
        mlp_out="layer.1.DenseReluDense",
        down="layer.1.DenseReluDense.wo",
        out_proj="layer.0.SelfAttention.o",
        head=None,
    ),
}


def family_tokenizer(specials: dict[str, str]) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over the test vocabulary with the given special tokens (ids first)."""
    tokens = list(dict.fromkeys(specials.values()))
    vocab = {t: i for i, t in enumerate([*tokens, *WORDS, "."])}
    unk = specials.get("unk_token")
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk or "."))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def save_family(folder: Path, name: str, with_head: bool = True, seed: int = 0) -> Path:
    """Saves family `name`'s tiny model to folder: its LM-head class, or the bare base model when with_head is
    False (a checkpoint without its LM head)."""
    fam = FAMILIES[name]
    torch.manual_seed(seed)
    model = fam.head_class(fam.config) if with_head else tf.AutoModel.from_config(fam.config)
    model.save_pretrained(folder)
    family_tokenizer(fam.specials).save_pretrained(folder)
    return folder
