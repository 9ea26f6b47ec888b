"""Crosscoders: the training loss and every gradient equal a reference written from the definition (squared error
over every layer, L1 weighted by each latent's per-layer decoder norms summed) on both of the relu step's paths;
the folder saves and loads back."""

from __future__ import annotations

import pytest
import torch

from sparse_coding.errors import ConfigError
from sparse_coding.saes import build_sae
from sparse_coding.saes.crosscoder import Crosscoder
from sparse_coding.saes.saelens import load_sae, save_sae

L, D, F = 3, 6, 16  # layers, width per layer, latents


def _crosscoder(l1: list[float], free: bool) -> Crosscoder:
    torch.manual_seed(0)
    cc = build_sae("crosscoder", L * D, F, [{"l1_alpha": a} for a in l1], n_layers=L,
                   decoder_init_norm=0.1 if free else 0.0)  # fmt: skip
    with torch.no_grad():  # away from the init: biases that matter, uneven per-layer decoder norms
        cc.b_enc.normal_(0, 0.1)
        cc.b_dec.normal_(0, 0.3)
        cc.W_dec.mul_(torch.rand(cc.n_models, F, L, 1).repeat_interleave(D, 2).flatten(2) + 0.2)
        cc.constrain_weights()
    return cc


def _reference(cc: Crosscoder, m: int, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Model m's loss from the definition on leaf copies of its weights."""
    w = {k: getattr(cc, k)[m].detach().clone().requires_grad_(True) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    xc = x - w["b_dec"] if cc.centers_input else x
    codes = torch.relu(xc @ w["W_enc"].T + w["b_enc"])
    err = codes @ w["W_dec"] + w["b_dec"] - x
    per_layer_norms = w["W_dec"].view(F, L, D).norm(dim=-1).sum(-1)  # Σ_l ‖W_dec[i, l]‖
    l1 = (codes * per_layer_norms).sum(-1).mean()
    return err.pow(2).mean() + float(cc.l1_alpha[m]) * l1 / F, w


@pytest.mark.parametrize("free", [True, False], ids=["free-decoder", "unit-rows"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense-step", "sparse-step"])
def test_loss_and_gradients_match_the_definition(free, sparse):
    cc = _crosscoder([0.3, 3.0], free)
    x = torch.randn(256, L * D, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        if sparse:  # each latent's bias below 97 % of its pre-activations: ~3 % of codes positive
            cc.b_enc.sub_(cc.pre_acts(x).quantile(0.97, dim=1))
        assert cc.runs_sparse(cc.encode(x)) == sparse, "the case does not take the path it names"
    out = cc.train_forward(x)
    out.loss.sum().backward()
    for m in range(cc.n_models):
        loss, w = _reference(cc, m, x)
        loss.backward()
        assert float(out.loss[m].detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
        for k, t in w.items():
            torch.testing.assert_close(getattr(cc, k).grad[m], t.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_a_latent_writing_into_one_layer_pays_less_than_one_spread_over_all():
    cc = _crosscoder([1.0], free=True)
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0, 0, :D] = 1.0 / D**0.5  # unit norm, in layer 0 alone
        cc.W_dec[0, 1] = 1.0 / (L * D) ** 0.5  # unit norm, spread evenly over the L layers
    weights = cc.l1_weights()[0].detach()
    assert float(weights[0]) == pytest.approx(1.0) and float(weights[1]) == pytest.approx(L**0.5)


def test_saves_and_loads_back(tmp_path):
    cc = _crosscoder([0.1, 0.3], free=True)
    save_sae(tmp_path / "cc", cc, 1, {"hook_name": "h.0+h.1+h.2"})
    loaded, cfg = load_sae(tmp_path / "cc")
    assert isinstance(loaded, Crosscoder) and loaded.n_layers == L and cfg["architecture"] == "crosscoder"
    x = torch.randn(32, L * D)
    torch.testing.assert_close(loaded.reconstruct(x)[0], cc.reconstruct(x)[1])


def test_refuses_a_width_that_is_not_its_layers():
    with pytest.raises(ValueError, match="not 4 layers"):
        build_sae("crosscoder", 18, 8, [{"l1_alpha": 1.0}], n_layers=4)
    with pytest.raises(ConfigError, match="no transcoder form"):
        build_sae("crosscoder", 18, 8, [{"l1_alpha": 1.0}], n_layers=3, d_out=18)


def test_fvu_by_layer_is_each_layers_own_and_needs_no_latents_per_layer():
    """A crosscoder's latents belong to no layer: any d_sae (here 100 over 3 layers) gets each layer's FVU."""
    from sparse_coding.eval.reconstruction import layer_stats

    cc = build_sae("crosscoder", L * D, 100, [{"l1_alpha": 0.1}], n_layers=L)
    x = torch.randn(64, L * D, generator=torch.Generator().manual_seed(2)) * torch.tensor(
        [1.0, 3.0, 0.5]
    ).repeat_interleave(D)
    stats = layer_stats(cc, x, batch_size=32)
    with torch.no_grad():
        err = (cc.reconstruct(x)[0] - x).view(64, L, D)
    by_hand = err.pow(2).sum(dim=(0, 2)) / (x - x.mean(0)).view(64, L, D).pow(2).sum(dim=(0, 2))
    assert set(stats) == {"fvu_by_layer"}
    torch.testing.assert_close(stats["fvu_by_layer"][0], by_hand, rtol=1e-5, atol=1e-6)
