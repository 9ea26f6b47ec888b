"""Steering through an SAE keeps its reconstruction error: an empty edit changes nothing, an ablation removes
exactly that latent's decoder contribution."""

import pytest
import torch

from sparse_coding.errors import ConfigError
from sparse_coding.eval.steering import edit_activation, parse_edits, steer
from sparse_coding.models.language_model import load_language_model
from sparse_coding.saes import build_sae


@pytest.fixture(scope="module")
def lm_and_sae(hf_folder):
    lm = load_language_model(str(hf_folder), torch.device("cpu"))
    hook = lm.hook_for(1, "mlp")
    d = lm.activations(torch.zeros(1, 2, dtype=torch.long), [hook])[hook].shape[-1]
    sae = build_sae("relu", d, 64, [{"l1_alpha": 1.0}])
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # most latents fire, so edits have something to act on
    return lm, hook, sae, torch.randint(0, 300, (3, 10))


def test_an_empty_edit_leaves_the_logits_exactly_unchanged(lm_and_sae):
    lm, hook, sae, tokens = lm_and_sae
    for mode in ("add", "clamp", "ablate"):
        assert torch.equal(steer(lm, sae, hook, {}, mode)(tokens), lm.logits(tokens))


def test_ablate_removes_exactly_that_latents_decoder_contribution(lm_and_sae):
    lm, hook, sae, tokens = lm_and_sae
    act = lm.activations(tokens, [hook])[hook]
    codes = sae.encode(act.reshape(-1, act.shape[-1]))[0]
    j = int(codes.ne(0).sum(0).argmax())  # the latent firing most often
    contribution = (codes[:, j : j + 1] * sae.decoder()[0][j]).reshape(act.shape)
    edited = edit_activation(sae, act, {j: 0.0}, "ablate")
    assert codes[:, j].ne(0).sum() > 10
    assert torch.equal(edited, act + -contribution)  # bit for bit: x − z_j · W_dec[j]
    assert torch.allclose(edited - act, -contribution, atol=1e-6)
    # and through the model: the logits move only where that latent fired
    fired = codes[:, j].ne(0).reshape(tokens.shape)
    moved = (steer(lm, sae, hook, {j: 0.0}, "ablate")(tokens) != lm.logits(tokens)).any(-1)
    assert moved[:, 0].eq(fired[:, 0]).all()  # position 0 sees only itself


def test_add_and_clamp(lm_and_sae):
    lm, hook, sae, tokens = lm_and_sae
    act = lm.activations(tokens, [hook])[hook]
    flat = act.reshape(-1, act.shape[-1])
    w = sae.decoder()[0][5]
    added = edit_activation(sae, act, {5: 2.0}, "add").reshape(flat.shape)
    assert torch.allclose(added - flat, 2.0 * w.expand_as(flat), atol=1e-6)
    clamped = edit_activation(sae, act, {5: 3.0}, "clamp").reshape(flat.shape)
    z = sae.encode(flat)[0][:, 5:6]
    assert torch.allclose(clamped - flat, (3.0 - z) * w, atol=1e-6)


def test_edit_specs():
    assert parse_edits("3=1.5, 7=-2", 10) == {3: 1.5, 7: -2.0}
    assert parse_edits("4", 10) == {4: 0.0}
    for bad in ("x=1", "3=y", "10=1"):
        with pytest.raises(ConfigError):
            parse_edits(bad, 10)
