"""Two models as one (model diffing): hooks of either by prefix, both run on the same tokens, one tokenizer."""

import pytest
import torch
from lm_fixtures import make_hf_gpt2, make_tokenizer, sentences
from transformers import GPT2Config, GPT2LMHeadModel

from sparse_coding.errors import ConfigError
from sparse_coding.models.language_model import load_language_model

CPU = torch.device("cpu")


def test_a_pairs_hooks_are_each_models_own(hf_folder, tmp_path):
    other = make_hf_gpt2(tmp_path / "other", seed=1)
    pair = load_language_model(str(hf_folder), CPU, diff_model=str(other))
    a, b = load_language_model(str(hf_folder), CPU), load_language_model(str(other), CPU)
    assert pair.hook_for(1, "residual") == "a.h.1+b.h.1" and pair.resolve_hook("h.0.mlp") == "a.h.0.mlp+b.h.0.mlp"
    assert pair.names() == {"model_name": str(hf_folder), "diff_model": str(other)}
    tokens = torch.randint(0, 200, (2, 10))
    both = pair.activations(tokens, ["a.h.1+b.h.1"])["a.h.1+b.h.1"]
    own = [m.activations(tokens, ["h.1"])["h.1"] for m in (a, b)]
    torch.testing.assert_close(both, torch.cat(own, dim=-1))
    torch.testing.assert_close(pair.on("b").logits(tokens), b.logits(tokens))
    torch.testing.assert_close(pair.logits(tokens), a.logits(tokens))  # no side set: the first model's


def test_models_that_tokenize_differently_are_refused(hf_folder, tmp_path):
    tok = make_tokenizer(sentences(60, seed=5))  # another vocabulary
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(
        tmp_path / "other"
    )
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="tokenize text differently"):
        load_language_model(str(hf_folder), CPU, diff_model=str(tmp_path / "other"))
