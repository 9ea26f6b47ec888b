"""Model hooks on locally made HF and TransformerLens models."""

import pytest
import torch

from sparse_coding.models.language_model import ModelError, load_language_model


def test_hf_hooks_equal_the_models_own_activations(hf_folder):
    lm = load_language_model(str(hf_folder), torch.device("cpu"))
    assert lm.hook_for(1, "residual") == "h.1"  # the base model's names, as AutoModel prints them
    assert lm.hook_for(1, "mlp") == "h.1.mlp.act"
    assert lm.hook_for(0, "mlp_out") == "h.0.mlp"
    assert lm.hook_for(0, "attn") == "h.0.attn"
    assert lm.resolve_hook("transformer.h.0.mlp") == "h.0.mlp"  # the head class's names are accepted too
    assert lm.resolve_hook("lm_head:input") == "lm_head:input"  # and its modules outside the base model
    tokens = torch.randint(0, 300, (3, 10))
    with torch.no_grad():
        hidden = lm.model(input_ids=tokens, output_hidden_states=True).hidden_states
    acts = lm.activations(tokens, ["h.0", "h.1.mlp.act", "lm_head:input"])
    assert torch.allclose(acts["h.0"], hidden[1], atol=1e-6)
    assert torch.allclose(acts["lm_head:input"], hidden[-1], atol=1e-6)  # the last hidden state, after ln_f
    assert acts["h.1.mlp.act"].shape == (3, 10, 128)
    with pytest.raises(ModelError, match="out of range"):
        lm.hook_for(2, "mlp")
    with pytest.raises(ModelError, match="no module"):
        lm.resolve_hook("h.0.nope")


def test_hf_forward_stops_after_the_last_hook(hf_folder):
    lm = load_language_model(str(hf_folder), torch.device("cpu"))
    ran = []
    handle = lm.model.transformer.h[1].register_forward_hook(lambda *a: ran.append(1))
    lm.activations(torch.zeros(1, 4, dtype=torch.long), ["h.0.mlp.act", "h.0.attn"])
    assert ran == []
    lm.activations(torch.zeros(1, 4, dtype=torch.long), ["h.0.mlp.act", "h.1.attn"])
    handle.remove()
    assert ran == []  # block 1's attention ran, its MLP and the block's end did not


def test_transformer_lens_hooks(tl_model):
    assert tl_model.hook_for(1, "mlp") == "blocks.1.mlp.hook_post"
    assert tl_model.hook_for(1, "residual") == "blocks.1.hook_resid_post"
    assert tl_model.mlp_transcode_hooks(0) == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    tokens = torch.randint(0, 300, (2, 12))
    _, cache = tl_model.model.run_with_cache(tokens)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.1.hook_attn_out"]
    acts = tl_model.activations(tokens, hooks)
    for hook in hooks:
        assert torch.allclose(acts[hook], cache[hook], atol=1e-6)
    with pytest.raises(ModelError, match="no module"):
        tl_model.resolve_hook("blocks.0.hook_nope")
    with pytest.raises(ModelError, match="hook point's input is its output"):
        tl_model.transcode_hooks("blocks.0.hook_mlp_out")


def test_logits_with_a_hook_replaced(hf_folder, tl_model):
    for lm, hook in (
        (load_language_model(str(hf_folder), torch.device("cpu")), "h.1.mlp"),
        (tl_model, "blocks.1.hook_mlp_out"),
    ):
        tokens = torch.randint(0, 300, (2, 8))
        clean = lm.logits(tokens)
        assert torch.allclose(lm.logits(tokens, hook, lambda act, src: act), clean, atol=1e-5)
        assert not torch.allclose(lm.logits(tokens, hook, lambda act, src: torch.zeros_like(act)), clean, atol=1e-3)


def test_transformer_lens_attn_z_is_hook_z_with_its_heads_side_by_side(tl_model):
    hook = tl_model.hook_for(1, "attn_z")
    assert hook == "blocks.1.attn.hook_z" and tl_model.n_heads() == 4
    tokens = torch.randint(0, 300, (2, 12))
    _, cache = tl_model.model.run_with_cache(tokens)
    z = tl_model.activations(tokens, [hook])[hook]
    assert torch.equal(z, cache[hook].flatten(2))  # [B, T, heads, d_head] → [B, T, heads · d_head], head-major
    clean = tl_model.logits(tokens)
    assert torch.allclose(tl_model.logits(tokens, hook, lambda act, src: act.clone()), clean, atol=1e-5)
    one_head_off = tl_model.logits(tokens, hook, lambda act, src: torch.cat([act[..., :8] * 0, act[..., 8:]], -1))
    tl_model.model.blocks[1].attn.hook_z.add_hook(lambda t, hook: t.index_fill(2, torch.tensor([0]), 0.0))
    try:
        expected = tl_model.model(tokens)
    finally:
        tl_model.model.reset_hooks()
    assert torch.allclose(one_head_off, expected, atol=1e-5)  # the first 8 columns are head 0
