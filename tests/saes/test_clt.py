"""Cross-layer transcoders: the training forward (loss and every gradient) equals a plain per-layer, per-model
reference written from the definition; encode/decode agree with it; AuxK on dead latents; the folder is
circuit-tracer's, which its own loader reads and computes the same outputs from."""

from __future__ import annotations

import pytest
import torch

from sparse_coding.errors import ConfigError
from sparse_coding.saes import build_sae
from sparse_coding.saes.clt import CrossLayerTranscoder
from sparse_coding.saes.saelens import load_sae, save_sae

L, D, E, F = 3, 6, 5, 8  # layers, input and output width per layer, latents per layer


def _clt(arch: str, hparams: list[dict], d_out_layer: int = E, seed: int = 0, **options) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = build_sae(arch, L * D, L * F, hparams, n_layers=L, d_out=L * d_out_layer, **options)
    with torch.no_grad():  # away from the init's symmetries: biases and thresholds that matter
        clt.b_enc.normal_(0, 0.1)
        clt.b_dec.normal_(0, 0.3)
        if arch == "clt_jumprelu":
            clt.threshold.uniform_(0.0, 0.4)
    return clt


def _data(n: int = 64, seed: int = 1, e: int = E) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L * D, generator=g), torch.randn(n, L * e, generator=g) * torch.linspace(0.5, 3, L * e)


def _reference(clt: CrossLayerTranscoder, m: int, x: torch.Tensor, target: torch.Tensor, eps: float = 0.05):
    """Model m's loss from the definition, one layer at a time, on leaf copies of its weights (returned too)."""
    arch, B = clt.architecture, x.shape[0]
    w = {"W_enc": clt.W_enc[m].detach().clone(), "b_enc": clt.b_enc[m].detach().clone()}
    w |= {f"W_dec_{i}": W[m].detach().clone() for i, W in enumerate(clt.decoders())}
    w["b_dec"] = clt.b_dec[m].detach().clone()
    if arch == "clt_jumprelu":
        w["threshold"] = clt.threshold[m].detach().clone()
    for t in w.values():
        t.requires_grad_(True)
    xs, codes, l0 = x.view(B, L, D), [], 0.0
    for i in range(L):
        pre = xs[:, i] @ w["W_enc"][i].T + w["b_enc"][i]
        if arch == "clt":
            v, j = pre.topk(clt.ks[m], dim=-1)
            codes.append(torch.zeros_like(pre).scatter(-1, j, v.relu()))
        elif arch == "clt_batchtopk":
            v, j = pre.flatten().topk(clt.ks[m] * B)
            codes.append(torch.zeros(B * F).scatter(0, j, v.relu()).view(B, F))
        else:  # JumpReLU with the straight-through estimators written as surrogates
            theta = w["threshold"][i]
            on = (pre > theta).float()
            window = ((pre - theta).abs() < eps / 2).float().detach()
            surrogate = -(theta.detach() / eps) * window * theta
            codes.append(pre * on + surrogate - surrogate.detach())
            step = -(1 / eps) * window * theta
            l0 = l0 + (on + step - step.detach()).sum() / B
    b_dec, e = w["b_dec"].view(L, -1), target.shape[1] // L
    loss = 0.0
    for j in range(L):
        y = b_dec[j] + sum(codes[i] @ w[f"W_dec_{i}"][:, j - i] for i in range(j + 1))
        t = target[:, j * e : (j + 1) * e]
        loss = loss + (y - t).pow(2).sum() / (t - t.mean(0)).pow(2).sum()
    if arch == "clt_jumprelu":
        loss = loss + clt.l0_coef[m] * l0 / e
    return loss, w, codes


CASES = [
    ("clt", [{"k": 2}, {"k": 3}]),
    ("clt_batchtopk", [{"k": 2}, {"k": 3}]),
    ("clt_jumprelu", [{"l0_coef": 0.0}, {"l0_coef": 0.3}]),
]


@pytest.mark.parametrize(("arch", "hparams"), CASES)
def test_training_forward_and_gradients_match_the_definition(arch, hparams):
    clt = _clt(arch, hparams)
    x, target = _data()
    out = clt.train_forward(x, target=target)
    out.loss.sum().backward()
    for m in range(clt.n_models):
        loss, w, _ = _reference(clt, m, x, target)
        loss.backward()
        assert float(out.loss[m].detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
        grads = {"W_enc": clt.W_enc.grad[m], "b_enc": clt.b_enc.grad[m], "b_dec": clt.b_dec.grad[m]}
        grads |= {f"W_dec_{i}": W.grad[m] for i, W in enumerate(clt.decoders())}
        if arch == "clt_jumprelu":
            grads["threshold"] = clt.threshold.grad[m]
        for name, g in grads.items():
            assert torch.allclose(g, w[name].grad, atol=1e-5, rtol=1e-4), (arch, m, name)


@pytest.mark.parametrize(("arch", "hparams"), CASES)
def test_encode_and_decode_give_the_reference_codes_and_outputs(arch, hparams):
    clt = _clt(arch, hparams)
    x, target = _data()
    if arch == "clt_batchtopk":  # inference is JumpReLU with each layer's learned threshold
        clt.train_forward(x, target=target)
        with torch.no_grad():
            pre = clt.layer_pre_acts(x).view(2, L, 64, F)
        theta = clt.threshold
        codes = clt.encode(x)
        expected = (pre.relu() * (pre > theta[:, :, None, None].float())).movedim(1, 2).flatten(2)
        assert torch.equal(codes, expected)
        return
    with torch.no_grad():
        codes = clt.encode(x)
        out = clt.decode(codes)
    assert codes.shape == (2, 64, L * F) and out.shape == (2, 64, L * E)
    for m in range(2):
        loss, _, ref_codes = _reference(clt, m, x, target)
        assert torch.allclose(codes[m], torch.cat([c.detach() for c in ref_codes], dim=1), atol=1e-6)
        err = (out[m] - target).view(64, L, E)
        var = (target - target.mean(0)).pow(2).view(64, L, E).sum(dim=(0, 2))
        assert float((err.pow(2).sum(dim=(0, 2)) / var).sum()) == pytest.approx(float(loss.detach()), rel=1e-5) or (
            arch == "clt_jumprelu"  # its loss also holds the L0 term
        )
    # a latent of layer i writes nothing into layers before i
    dense = clt.decoder()
    assert dense.shape == (2, L * F, L * E)
    assert dense[:, F : 2 * F, :E].abs().sum() == 0 and dense[:, 2 * F :, : 2 * E].abs().sum() == 0


def test_decoders_stay_at_unit_norm_over_all_their_target_layers():
    clt = _clt("clt", [{"k": 2}])
    for W in clt.decoders():
        assert torch.allclose(W.flatten(2).norm(dim=-1), torch.ones(1, F), atol=1e-6)
    x, target = _data()
    clt.train_forward(x, target=target).loss.sum().backward()
    clt.constrain_grads()
    for W in clt.decoders():  # no gradient along the decoder itself: a step keeps the norm to first order
        assert torch.allclose((W.grad * W).flatten(2).sum(-1), torch.zeros(1, F), atol=1e-6)
    with torch.no_grad():
        for W in clt.decoders():
            W.add_(W.grad * 10)
    clt.constrain_weights()
    for W in clt.decoders():
        assert torch.allclose(W.flatten(2).norm(dim=-1), torch.ones(1, F), atol=1e-6)


def test_auxk_asks_each_layers_dead_latents_to_reconstruct_the_error():
    clt = _clt("clt", [{"k": 2}], auxk_alpha=0.5, dead_tokens_threshold=10)
    x, target = _data()
    dead = torch.zeros(1, L, F, dtype=torch.bool)
    dead[0, 0, :3], dead[0, 2, 5:] = True, True
    clt.tokens_since_fired.masked_fill_(dead, 100)
    loss = clt.train_forward(x, target=target).loss[0]
    plain, w, codes = _reference(clt, 0, x, target)
    k_aux = E // 2
    with torch.no_grad():
        xs, e_hat = x.view(64, L, D), torch.zeros(64, L, E)
        for i in range(L):
            pre = (xs[:, i] @ w["W_enc"][i].T + w["b_enc"][i]).masked_fill(~dead[0, i], float("-inf"))
            n = int(dead[0, i].sum())
            if n == 0:
                continue
            v, j = pre.topk(min(k_aux, n), dim=-1)
            a = torch.zeros(64, F).scatter(-1, j, v.relu())
            for t in range(i, L):
                e_hat[:, t] += a @ w[f"W_dec_{i}"][:, t - i]
        y = torch.stack(
            [
                w["b_dec"].view(L, E)[t] + sum(codes[i] @ w[f"W_dec_{i}"][:, t - i] for i in range(t + 1))
                for t in range(L)
            ],
            dim=1,
        )
        err = y - target.view(64, L, E)
        var = (target - target.mean(0)).pow(2).view(64, L, E).sum(dim=(0, 2))
        auxk = ((e_hat + err).pow(2).sum(dim=(0, 2)) / var).sum()
        scale = min(int(dead.sum()) / (L * k_aux), 1.0)
    assert float(loss.detach()) == pytest.approx(float(plain.detach()) + 0.5 * scale * float(auxk.detach()), rel=1e-5)


@pytest.mark.parametrize("arch", ["clt", "clt_batchtopk", "clt_jumprelu"])
def test_saved_as_circuit_tracers_folder_and_reloaded(tmp_path, arch):
    knob = {"l0_coef": 0.1} if arch == "clt_jumprelu" else {"k": 3}
    clt = _clt(arch, [knob], d_out_layer=D)  # circuit-tracer's CLTs read and write one width
    x, target = _data(e=D)
    clt.train_forward(x, target=target)  # (batchtopk: sets its thresholds)
    folder = save_sae(tmp_path / "clt", clt, 0, {"hook_name": "mlp_in+...", "hook_name_out": "mlp_out+..."})
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        ["cfg.json", *[f"W_enc_{i}.safetensors" for i in range(L)], *[f"W_dec_{i}.safetensors" for i in range(L)]]
    )
    back, cfg = load_sae(folder)
    assert (cfg["architecture"], cfg["n_layers"], cfg["d_transcoder"], cfg["d_model"]) == (arch, L, F, D)
    with torch.no_grad():
        assert torch.allclose(back.decode(back.encode(x)), clt.decode(clt.encode(x)), atol=1e-6)
    if arch == "clt":
        return  # circuit-tracer has no per-token top-k: it would read this CLT as ReLU (module docstring)
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    theirs = load_clt(str(folder), device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    assert theirs.n_layers == L and theirs.d_transcoder == F
    layer_x = x.view(64, L, D).transpose(0, 1)  # [L, B, d], circuit-tracer's layout
    with torch.no_grad():
        features = theirs.encode(layer_x)  # [L, B, F]
        ours = clt.encode(x)[0].view(64, L, F).transpose(0, 1)
        assert torch.allclose(features, ours, atol=1e-6)
        assert features.count_nonzero() > 0
        recon = theirs.forward(layer_x)  # [L, B', d]: up to the last position with an active feature
        mine = clt.decode(clt.encode(x))[0].view(64, L, D).transpose(0, 1)
        assert torch.allclose(recon, mine[:, : recon.shape[1]], atol=1e-5)


def test_a_clt_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="divisible"):
        build_sae("clt", 10, 12, [{"k": 2}], n_layers=3, d_out=9)
    with pytest.raises(ValueError, match="give d_out"):
        build_sae("clt", 9, 12, [{"k": 2}], n_layers=3)
    with pytest.raises(ValueError, match="1..4"):
        build_sae("clt", 9, 12, [{"k": 5}], n_layers=3, d_out=9)
    from sparse_coding.pipelines.toy import smoke

    with pytest.raises(ConfigError, match="--n_layers"):
        smoke().__class__(**{**smoke().__dict__, "arch": "clt"}).check()
