"""Model hooks on locally made HF and TransformerLens models."""

import pytest
import torch

from sparse_coding.models.language_model import (
    ModelError,
    load_language_model,
    next_token_ce,
)


def test_hf_hooks_equal_the_models_own_activations(hf_folder):
    lm = load_language_model(str(hf_folder), torch.device("cpu"))
    assert lm.hook_for(1, "residual") == "transformer.h.1"
    assert lm.hook_for(1, "mlp") == "transformer.h.1.mlp.act"
    assert lm.hook_for(0, "mlp_out") == "transformer.h.0.mlp"
    assert lm.hook_for(0, "attn") == "transformer.h.0.attn"
    tokens = torch.randint(0, 300, (3, 10))
    with torch.no_grad():
        hidden = lm.model(input_ids=tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(lm.activations(tokens, "transformer.h.0"), hidden[1], atol=1e-6)
    assert lm.activations(tokens, "transformer.h.1.mlp.act").shape == (3, 10, 128)
    with pytest.raises(ModelError, match="out of range"):
        lm.hook_for(2, "mlp")
    with pytest.raises(ModelError, match="no module"):
        lm.check_hook("transformer.h.0.nope")


def test_hf_forward_stops_after_the_hook(hf_folder):
    lm = load_language_model(str(hf_folder), torch.device("cpu"))
    ran = []
    handle = lm.model.transformer.h[1].register_forward_hook(lambda *a: ran.append(1))
    lm.activations(torch.zeros(1, 4, dtype=torch.long), "transformer.h.0.mlp.act")
    handle.remove()
    assert ran == []


def test_transformer_lens_hooks(tl_model):
    assert tl_model.hook_for(1, "mlp") == "blocks.1.mlp.hook_post"
    tokens = torch.randint(0, 300, (2, 12))
    _, cache = tl_model.model.run_with_cache(tokens)
    for hook in ("blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.1.hook_attn_out"):
        assert torch.allclose(tl_model.activations(tokens, hook), cache[hook], atol=1e-6)
    with pytest.raises(ModelError, match="no hook"):
        tl_model.check_hook("blocks.0.hook_nope")


def test_next_token_ce_by_hand():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 100.0  # position 0 predicts token 2 with certainty
    tokens = torch.tensor([[0, 2, 1]])
    # positions 0 → 2 (loss 0), 1 → 1 (uniform: log 4)
    assert next_token_ce(logits, tokens).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() / 2, abs=1e-5)
