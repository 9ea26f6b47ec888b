"""Small language models and text made here (no hub): a BPE tokenizer trained on generated sentences, a
random-weight HF GPT-2 saved to a folder, and a random-weight HookedTransformer."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

WORDS = [
    "the",
    "cat",
    "dog",
    "bird",
    "sat",
    "ran",
    "flew",
    "on",
    "under",
    "over",
    "a",
    "mat",
    "tree",
    "house",
    "quickly",
    "slowly",
    "and",
    "then",
    "red",
    "blue",
    "big",
    "small",
    "saw",
    "heard",
    "found",
    "green",
    "old",
    "new",
    "river",
    "hill",
    "city",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "." for _ in range(n)]


def make_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def make_hf_gpt2(folder: Path, seed: int = 0) -> Path:
    """Saves a random 2-layer GPT-2 with its tokenizer to folder."""
    tok = make_tokenizer(sentences(400))
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_hooked_transformer(seed: int = 0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok = make_tokenizer(sentences(400))
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=128, d_vocab=len(tok), act_fn="gelu", seed=seed
    )
    return HookedTransformer(cfg), tok


def make_nanogpt(folder: Path, seed: int = 0) -> Path:
    """Saves a random 2-layer nanoGPT checkpoint (our own model's format) with its tokenizer to folder."""
    from sparse_coding.models.nanogpt import GPT, GPTConfig, save_checkpoint

    tok = make_tokenizer(sentences(400))
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=len(tok)))
    return save_checkpoint(folder, model, tok, {"val_loss": 0.0, "unigram_entropy": 0.0, "tokens_seen": 0})


def write_corpus(folder: Path, n_docs: int = 300) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs.jsonl"
    import json

    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(n_docs, seed=1)))
    return path


def smoke_run_args(root: Path) -> list[str]:
    """Makes a tiny GPT-2 and corpus under root; gives run.py's smoke flags for them (without --out)."""
    model, data = make_hf_gpt2(root / "gpt2"), write_corpus(root / "corpus")
    return ["--preset", "smoke", "--model_name", str(model), "--dataset_name", str(data),
            "--activations_dir", str(root / "acts")]  # fmt: skip


def write_rst_corpus(folder: Path, n_docs: int = 60, seed: int = 2) -> Path:
    """Generated documentation-like text (made here, no third-party text): prose with ``inline literals``,
    literal blocks after '::' holding Python, and doctest lines, for the corpus-labelled probing tasks."""
    import json

    rng = random.Random(seed)
    code_lines = ["for x in range(3):", "    if x and not y:", "        return x", "while True:", "    break",
                  "def f(a, b=None):", "    return a is b", "class Box:", "    pass", "import os"]  # fmt: skip

    def prose() -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
        words[rng.randrange(len(words))] = f"``{rng.choice(WORDS)}``"
        return " ".join(words)

    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(2, 4)):
            parts.append(prose() + " as follows::\n\n" + "\n".join("   " + rng.choice(code_lines) for _ in range(3)))
            parts.append(prose() + ".\n\n" + "\n".join(f"   >>> {rng.choice(code_lines).strip()}" for _ in range(2)))
        docs.append("\n\n".join(parts) + "\n")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path
