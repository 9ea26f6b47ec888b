"""The fast training paths against plain dense autograd, and the SAE interface."""

import pytest
import torch
import torch.nn.functional as F

from sparse_coding.errors import ConfigError
from sparse_coding.saes import SAES, build_sae


def _grads(sae):
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def _perturb(sae, bias):
    with torch.no_grad():
        sae.b_enc.normal_()
        if bias:
            sae.b_dec.normal_()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("l1_norm", ["dict_size", "none"])
def test_relu_fast_path_matches_dense_autograd(tied, bias, l1_norm, device, train_dtype, relu_step):
    torch.set_default_dtype(torch.float64)
    try:
        d, f, B = 6, 10, 7
        x = torch.randn(B, d, device=device)
        sae = build_sae(
            "relu",
            d,
            f,
            [{"l1_alpha": 0.3}, {"l1_alpha": 2.0}],
            tied=tied,
            decoder_bias=bias,
            l1_norm=l1_norm,
        ).to(device)
        train_dtype.apply(sae)
        _perturb(sae, bias)
        out = sae.train_forward(x)
        out.loss.sum().backward()
        fast = _grads(sae)
        sae.zero_grad()
        codes = sae.encode(x)
        scale = 1 / f if l1_norm == "dict_size" else 1.0
        ref = (sae.decode(codes) - x).pow(2).mean((1, 2)) + sae.l1_alpha * scale * codes.abs().sum(-1).mean(-1)
        ref.sum().backward()
        train_dtype.assert_loss(out.loss, ref)
        train_dtype.assert_grads(fast, sae)
        assert out.parts["l0"].tolist() == pytest.approx((codes > 0).sum(-1).double().mean(-1).tolist())
        assert sae.runs_sparse(codes) == (relu_step == "sparse" and train_dtype.name == "fp32")
        assert len(set((codes > 0).sum((1, 2)).tolist())) == 2  # the sparse step pads the sparser model's entries
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ks", [[3, 3], [2, 4]])
@pytest.mark.parametrize("f", [10, 512])  # 512: the CPU top-k's block path, not only its heap
def test_topk_fast_path_matches_dense_autograd_with_auxk(bias, ks, f, device, train_dtype):
    torch.set_default_dtype(torch.float64)
    try:
        d, B = 6, 7
        x = torch.randn(B, d, device=device)
        sae = build_sae("topk", d, f, [{"k": k} for k in ks], decoder_bias=bias, dead_tokens_threshold=1).to(device)
        train_dtype.apply(sae)
        _perturb(sae, bias)
        sae.tokens_since_fired[0, :5] = 5  # model 0: five dead latents; model 1: two
        sae.tokens_since_fired[1, 8:] = 5
        dead = sae.tokens_since_fired >= 1
        out = sae.train_forward(x)
        out.loss.sum().backward()
        fast = _grads(sae)
        sae.zero_grad()

        pre, codes = sae.pre_acts(x), sae.encode(x)
        assert ((codes > 0).sum(-1) <= torch.tensor(ks, device=device)[:, None]).all()
        x_hat = sae.decode(codes)
        total_var = (x - x.mean(0)).pow(2).sum()
        fvu = (x_hat - x).pow(2).sum((1, 2)) / total_var
        k_aux = min(d // 2, int(dead.sum(-1).max()))
        v, i = pre.masked_fill(~dead[:, None, :], float("-inf")).topk(k_aux, dim=-1)
        e_hat = torch.bmm(torch.zeros_like(pre).scatter(-1, i, v.relu()), sae.decoder())
        auxk = (e_hat - (x - x_hat).detach()).pow(2).sum((1, 2)) / total_var
        scale = (dead.sum(-1).double() / (d // 2)).clamp(max=1)
        ref = fvu + sae.auxk_alpha * scale * auxk
        ref.sum().backward()
        train_dtype.assert_loss(out.loss, ref)
        train_dtype.assert_grads(fast, sae)
    finally:
        torch.set_default_dtype(torch.float32)


def test_topk_tracks_dead_latents(device):
    sae = build_sae("topk", 4, 16, [{"k": 1}], dead_tokens_threshold=100).to(device)
    x = torch.randn(8, 4, device=device)
    out = sae.train_forward(x)
    fired = torch.zeros(16, dtype=torch.bool, device=device)
    fired[sae.encode(x)[0].nonzero()[:, 1]] = True  # the latents any token's code uses
    assert fired.sum() >= 1 and out.parts["l0"].item() == 1
    assert (sae.tokens_since_fired[0][fired] == 0).all()
    assert (sae.tokens_since_fired[0][~fired] == 8).all()


def test_projected_gradient_equals_normalising_in_the_forward_pass():
    """At unit norm, removing the radial gradient component is the gradient of W / ‖W‖."""
    sae = build_sae("relu", 5, 7, [{"l1_alpha": 0.1}])
    x = torch.randn(9, 5)
    W = sae.W_dec.detach().clone().requires_grad_()
    target = torch.randn(1, 9, 5)
    loss_fn = lambda dec: (torch.bmm(torch.relu(sae.pre_acts(x)).detach(), dec) - target).pow(2).sum()  # noqa: E731
    loss_fn(F.normalize(W, dim=-1)).backward()
    sae.W_dec.grad = torch.autograd.grad(loss_fn(sae.W_dec), sae.W_dec)[0]
    sae.constrain_grads()
    assert torch.allclose(sae.W_dec.grad, W.grad, atol=1e-5)


def test_constrain_weights_restores_unit_rows():
    sae = build_sae("topk", 5, 7, [{"k": 2}, {"k": 3}])
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.constrain_weights()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(2, 7))


def test_initialisation():
    topk = build_sae("topk", 6, 12, [{"k": 2}]).export(0)
    assert torch.allclose(topk["W_enc"], topk["W_dec"].T)  # TopK: encoder = decoder transpose
    relu = build_sae("relu", 6, 12, [{"l1_alpha": 1.0}]).export(0)
    assert torch.allclose(relu["W_dec"].norm(dim=-1), torch.ones(12))
    narrow = build_sae("relu", 6, 4, [{"l1_alpha": 1.0}]).export(0)["W_dec"]
    assert torch.allclose(narrow @ narrow.T, torch.eye(4), atol=1e-5)  # orthonormal rows where they fit
    assert relu["W_enc"].abs().max() <= 6**-0.5 and relu["b_enc"].abs().max() <= 6**-0.5  # nn.Linear's bounds


def test_tied_relu_shares_weights():
    sae = build_sae("relu", 6, 12, [{"l1_alpha": 1.0}], tied=True)
    assert "W_enc" not in dict(sae.named_parameters())
    w = sae.export(0)
    assert torch.equal(w["W_enc"], w["W_dec"].T)


def test_second_forward_before_backward_is_refused():
    sae = build_sae("relu", 4, 8, [{"l1_alpha": 1.0}])
    x = torch.randn(3, 4)
    first = sae.train_forward(x)
    sae.train_forward(x)
    with pytest.raises(RuntimeError, match="buffers"):
        first.loss.sum().backward()


def test_registry_and_bad_arguments():
    assert set(SAES) >= {"relu", "topk"}
    with pytest.raises(ConfigError, match="unknown architecture"):
        build_sae("nope", 4, 8, [{}])
    with pytest.raises(ValueError, match="k must be"):
        build_sae("topk", 4, 8, [{"k": 9}])
    with pytest.raises(ValueError, match="l1_norm"):
        build_sae("relu", 4, 8, [{"l1_alpha": 1.0}], l1_norm="bogus")


def test_topk_counts_a_latent_as_fired_if_any_token_fires_it():
    """Token 1 picks latent 0 (1.0) and latent 1 (0.0); token 2 the reverse: both fired, latent 2 did not."""
    sae = build_sae("topk", 2, 3, [{"k": 2}], decoder_bias=False, dead_tokens_threshold=10**9)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-0.1, -0.1]]]))
        sae.b_enc.zero_()
    for order in ([[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]):
        out = sae.train_forward(torch.tensor(order))
        assert (sae.tokens_since_fired[0] == 0).tolist() == [True, True, False]  # fired: its count restarts
        out.loss.sum().backward()
