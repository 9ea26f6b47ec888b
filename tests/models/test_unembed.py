"""The direct path from a hook to the logits, found by name and shape, equals the hand-written product."""

import torch

from sparse_coding.models.language_model import load_language_model
from sparse_coding.models.unembed import logit_effects


def test_hf_gpt2_mlp_neurons_and_residual(hf_folder):
    lm = load_language_model(str(hf_folder), torch.device("cpu"))
    m = lm.model
    dirs = torch.randn(3, 128)
    gamma, w_u = m.transformer.ln_f.weight, m.lm_head.weight
    expected = ((dirs @ m.transformer.h[1].mlp.c_proj.weight) * gamma) @ w_u.T  # Conv1D weight is [in, out]
    assert torch.allclose(logit_effects(lm, "transformer.h.1.mlp.act", 128)(dirs), expected, atol=1e-5)
    res = torch.randn(2, 32)
    assert torch.allclose(logit_effects(lm, "transformer.h.1", 32)(res), (res * gamma) @ w_u.T, atol=1e-5)


def test_transformer_lens_mlp_neurons(tl_model):
    m = tl_model.model
    dirs = torch.randn(2, 128)
    expected = (dirs @ m.blocks[0].mlp.W_out) * m.ln_final.w @ m.W_U
    assert torch.allclose(logit_effects(tl_model, "blocks.0.mlp.hook_post", 128)(dirs), expected, atol=1e-5)
