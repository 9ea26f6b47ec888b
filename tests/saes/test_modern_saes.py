"""The fast training paths of batchtopk, matryoshka, jumprelu and gated against plain dense float64 autograd of
each paper's loss, written out here independently; and the bookkeeping they keep (thresholds, dead latents)."""

from __future__ import annotations

import pytest
import torch
from precision_check import PrecisionCheck
from torch import Tensor

from sparse_coding.saes import build_sae, gated, jumprelu, kernels, matryoshka
from sparse_coding.saes.kernels import batch_topk
from sparse_coding.saes.matryoshka import level_widths


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(params=["compiled", "torch"])
def path(request, monkeypatch):
    """Both implementations of each step: the compiled CPU kernels and the torch ops used where they are not."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "fuses_bias", lambda x: False)
        monkeypatch.setattr(jumprelu, "compiled", lambda x: False)
        monkeypatch.setattr(gated, "compiled", lambda x: False)
        monkeypatch.setattr(matryoshka, "compiled", lambda x: False)
    return request.param


def _fast_and_dense(sae, x: Tensor, reference, check: PrecisionCheck) -> None:
    """Runs the fast path and reference(sae, x) (the dense loss [M]) from the same state (buffers such as dead-latent
    counts included) in check's precision; asserts equal losses and gradients (within the precision's rounding)."""
    check.apply(sae)
    buffers = {n: b.clone() for n, b in sae.named_buffers()}
    out = sae.train_forward(x)
    out.loss.sum().backward()
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    for n, b in sae.named_buffers():
        b.copy_(buffers[n])
    ref = reference(sae, x)
    ref.sum().backward()
    check.assert_loss(out.loss, ref)
    check.assert_grads(fast, sae)


def _perturb(sae, bias: bool) -> None:
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        if bias:
            sae.b_dec.normal_()


def _dense_batch_topk(pre: Tensor, ks: list[int]) -> Tensor:
    """Codes [M, B, F] keeping each model's k·B largest pre-activations of the batch, ReLU'd."""
    M, B, F = pre.shape
    codes = []
    for m, k in enumerate(ks):
        v, i = pre[m].reshape(-1).topk(k * B)
        codes.append(torch.zeros(B * F, dtype=pre.dtype).scatter(0, i, v.relu()).view(B, F))
    return torch.stack(codes)


def _auxk(sae, x: Tensor, pre: Tensor, x_hat: Tensor, total_var: Tensor) -> Tensor:
    dead = sae.tokens_since_fired >= sae.dead_tokens_threshold
    k_aux = min(sae.d_in // 2, int(dead.sum(-1).max()))
    v, i = pre.masked_fill(~dead[:, None, :], float("-inf")).topk(k_aux, dim=-1)
    e_hat = torch.bmm(torch.zeros_like(pre).scatter(-1, i, v.relu()), sae.decoder())
    auxk = (e_hat - (x - x_hat).detach()).pow(2).sum((1, 2)) / total_var
    return sae.auxk_alpha * (dead.sum(-1).double() / (sae.d_in // 2)).clamp(max=1) * auxk


def _dead_some(sae) -> None:
    sae.tokens_since_fired[0, :5] = 10**9  # model 0: five dead latents; model 1: two
    sae.tokens_since_fired[1, -2:] = 10**9


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ks", [[3, 3], [2, 4]])
@pytest.mark.parametrize("f", [12, 512])
def test_batchtopk_fast_path_matches_dense_autograd(float64, path, bias, ks, f, train_dtype):
    d, B = 6, 9
    x = torch.randn(B, d)
    sae = build_sae("batchtopk", d, f, [{"k": k} for k in ks], decoder_bias=bias, dead_tokens_threshold=10**6)
    _perturb(sae, bias)
    _dead_some(sae)

    def reference(sae, x):
        pre = sae.pre_acts(x)
        x_hat = sae.decode(_dense_batch_topk(pre, ks))
        total_var = (x - x.mean(0)).pow(2).sum()
        return (x_hat - x).pow(2).sum((1, 2)) / total_var + _auxk(sae, x, pre, x_hat, total_var)

    _fast_and_dense(sae, x, reference, train_dtype)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_free_topk_decoder_fast_path_matches_dense_autograd(float64, path, arch, train_dtype):
    """A free decoder (rows of any norm): the reference ranks pre-activations times row norms and decodes through
    the normalised rows, written out from the raw parameters (SAELens' rescale_acts_by_decoder_norm)."""
    d, f, B, ks = 6, 12, 9, [2, 4]
    x = torch.randn(B, d)
    sae = build_sae(arch, d, f, [{"k": k} for k in ks], decoder_init_norm=0.1, dead_tokens_threshold=10**6)
    _perturb(sae, True)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(2, f, 1) * 10 + 0.5)
    _dead_some(sae)

    def reference(sae, x):
        norms = sae.W_dec.norm(dim=-1)
        # (the precision's matmul: in bf16/fp16 runs its inputs are rounded, as the fast path's are)
        W, b = sae.W_enc * norms[..., None], sae.b_enc * norms
        pre = sae.precision.baddbmm(b[:, None], x - sae.b_dec[:, None], W.mT)
        if arch == "topk":
            v, i = pre.topk(max(ks), dim=-1)
            v = v.relu() * (torch.arange(max(ks)) < torch.tensor(ks)[:, None, None])
            codes = torch.zeros_like(pre).scatter(-1, i, v)
        else:
            codes = _dense_batch_topk(pre, ks)
        unit = sae.W_dec / norms[..., None]
        x_hat = codes @ unit + sae.b_dec[:, None]
        total_var = (x - x.mean(0)).pow(2).sum()
        dead = sae.tokens_since_fired >= sae.dead_tokens_threshold
        k_aux = min(d // 2, int(dead.sum(-1).max()))
        av, ai = pre.masked_fill(~dead[:, None, :], float("-inf")).topk(k_aux, dim=-1)
        e_hat = torch.zeros_like(pre).scatter(-1, ai, av.relu()) @ unit
        auxk = (e_hat - (x - x_hat).detach()).pow(2).sum((1, 2)) / total_var
        scale = (dead.sum(-1).double() / (d // 2)).clamp(max=1)
        return (x_hat - x).pow(2).sum((1, 2)) / total_var + sae.auxk_alpha * scale * auxk

    _fast_and_dense(sae, x, reference, train_dtype)


def test_batchtopk_threshold_is_a_moving_average_of_the_smallest_kept_value(float64):
    sae = build_sae("batchtopk", 4, 16, [{"k": 2}, {"k": 5}])
    x = torch.randn(10, 4)
    smallest = []
    for m, k in enumerate([2, 5]):
        v = sae.pre_acts(x)[m].reshape(-1).topk(k * 10).values
        smallest.append(v[v > 0].min())
    sae.train_forward(x, stats=False)
    first = torch.stack(smallest)
    assert torch.allclose(sae.threshold, first)  # the first batch sets θ (no average from an arbitrary start)
    pre = sae.pre_acts(x)
    assert torch.equal(sae.encode(x), pre.relu() * (pre > sae.threshold[:, None, None]))  # inference: JumpReLU
    x2 = 3 * torch.randn(10, 4)
    second = torch.stack(
        [(v := sae.pre_acts(x2)[m].reshape(-1).topk(k * 10).values)[v > 0].min() for m, k in enumerate([2, 5])]
    )
    sae.train_forward(x2, stats=False)
    assert torch.allclose(sae.threshold, 0.99 * first + 0.01 * second)  # then SAELens' rate


@pytest.mark.parametrize("widths", [None, [3, 8]])
@pytest.mark.parametrize("bias", [False, True])
def test_matryoshka_fast_path_matches_dense_autograd(float64, path, widths, bias, train_dtype):
    d, f, B, ks = 6, 20, 9, [3, 4]
    x = torch.randn(B, d)
    sae = build_sae(
        "matryoshka", d, f, [{"k": k} for k in ks], decoder_bias=bias, matryoshka_widths=widths, dead_tokens_threshold=9
    )
    _perturb(sae, bias)
    _dead_some(sae)

    def reference(sae, x):
        pre = sae.pre_acts(x)
        codes = _dense_batch_topk(pre, ks)
        total_var = (x - x.mean(0)).pow(2).sum()
        fvus = []
        for w in level_widths(f, widths):
            prefix = torch.bmm(codes[..., :w], sae.decoder()[:, :w]) + sae.b_dec[:, None, :]
            fvus.append((prefix - x).pow(2).sum((1, 2)) / total_var)
        return torch.stack(fvus, -1).mean(-1) + _auxk(sae, x, pre, sae.decode(codes), total_var)

    _fast_and_dense(sae, x, reference, train_dtype)
    assert level_widths(20, None) == [1, 2, 5, 10, 20] and level_widths(20, [3, 8, 40]) == [3, 8, 20]


class _Step(torch.autograd.Function):
    """H(pre − θ) with the paper's estimator: no gradient to pre, −(1/ε)·K to θ."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.eps / 2).to(pre)
        return None, (-(1 / ctx.eps) * window * g).sum(1, keepdim=True), None


class _Jump(torch.autograd.Function):
    """pre·H(pre − θ): H to pre, −(θ/ε)·K to θ."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        window = ((pre - theta).abs() < ctx.eps / 2).to(pre)
        return g * (pre > theta), (-(theta / ctx.eps) * window * g).sum(1, keepdim=True), None


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("free", [False, True])
@pytest.mark.parametrize("pre_act", [0.0, 0.7])
def test_jumprelu_fast_path_matches_dense_autograd(float64, path, bias, free, pre_act, train_dtype):
    d, f, B, eps = 6, 16, 40, 0.5  # a wide window, so the estimators see many entries
    x = torch.randn(B, d)
    sae = build_sae(
        "jumprelu",
        d,
        f,
        [{"l0_coef": 0.3}, {"l0_coef": 2.0}],
        decoder_bias=bias,
        jumprelu_bandwidth=eps,
        jumprelu_pre_act_coef=pre_act,
        dead_tokens_threshold=100,
        decoder_init_norm=0.5 if free else 0.0,
    )
    _perturb(sae, bias)
    with torch.no_grad():
        sae.threshold.uniform_(0.0, 1.0)
        sae.tokens_since_fired[0, 3:6] = 100
        sae.tokens_since_fired[1, 0] = 100
    dead = (sae.tokens_since_fired >= 100).double()

    def reference(sae, x):
        pre = sae.pre_acts(x)
        theta = sae.threshold[:, None, :]
        x_hat = sae.decode(_Jump.apply(pre, theta, eps))
        fvu = (x_hat - x).pow(2).sum((1, 2)) / (x - x.mean(0)).pow(2).sum()
        l0 = _Step.apply(pre, theta, eps).sum(-1).mean(-1)
        gap = ((theta - pre).relu() * (dead * sae.W_dec.norm(dim=-1) if free else dead)[:, None, :]).sum(-1).mean(-1)
        return fvu + sae.l0_coef * l0 / d + pre_act * gap

    _fast_and_dense(sae, x, reference, train_dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("free", [False, True])
@pytest.mark.parametrize("l1_norm", ["dict_size", "none"])
def test_gated_fast_path_matches_dense_autograd(float64, path, bias, free, l1_norm, train_dtype):
    d, f, B = 6, 14, 11
    x = torch.randn(B, d)
    sae = build_sae(
        "gated",
        d,
        f,
        [{"l1_alpha": 0.2}, {"l1_alpha": 3.0}],
        decoder_bias=bias,
        l1_norm=l1_norm,
        decoder_init_norm=0.5 if free else 0.0,
    )
    _perturb(sae, bias)
    with torch.no_grad():
        sae.r_mag.normal_(0, 0.5)
        sae.b_mag.normal_()

    def reference(sae, x):
        shared = sae.precision.bmm(sae.center(x), sae.W_enc.mT)
        gate = shared + sae.b_enc[:, None, :]
        magnitude = shared * sae.r_mag.exp()[:, None, :] + sae.b_mag[:, None, :]
        x_hat = sae.decode((gate > 0) * magnitude.relu())
        x_aux = sae.precision.bmm(gate.relu(), sae.W_dec.detach()) + sae.b_dec.detach()[:, None, :]
        norms = sae.W_dec.norm(dim=-1) if free else torch.ones(2, f)
        l1 = (gate.relu() * norms[:, None, :]).sum(-1).mean(-1) / (f if l1_norm == "dict_size" else 1)
        mse, aux = ((y - x).pow(2).mean((1, 2)) for y in (x_hat, x_aux))
        return mse + sae.l1_alpha * l1 + aux

    _fast_and_dense(sae, x, reference, train_dtype)


@pytest.mark.parametrize("free", [False, True])
def test_relu_with_a_free_decoder_weights_l1_by_decoder_norms(float64, free, train_dtype, relu_step):
    d, f, B = 6, 10, 7
    x = torch.randn(B, d)
    sae = build_sae("relu", d, f, [{"l1_alpha": 0.3}, {"l1_alpha": 2.0}], decoder_init_norm=0.5 if free else 0.0)
    _perturb(sae, True)

    def reference(sae, x):
        codes = sae.encode(x)
        norms = sae.W_dec.norm(dim=-1)[:, None, :] if free else 1.0
        return (sae.decode(codes) - x).pow(2).mean((1, 2)) + sae.l1_alpha / f * (codes * norms).sum(-1).mean(-1)

    _fast_and_dense(sae, x, reference, train_dtype)
    if free:
        assert torch.allclose(
            build_sae("relu", d, f, [{"l1_alpha": 1.0}], decoder_init_norm=0.1).W_dec.norm(dim=-1),
            torch.full((1, f), 0.1),
        )


def test_batch_topk_kernel_matches_torch_topk():
    """float32 and float64 slabs, and a bf16 one with a float32 bias (a native bf16 product): its values are those
    of the widened sum, in float32."""
    for dtype, bias_dtype in [(torch.float32,) * 2, (torch.float64,) * 2, (torch.bfloat16, torch.float32)]:
        x = (torch.randn(3, 64, 200) * torch.rand(200)).to(dtype)  # latents of different scales
        bias = torch.randn(3, 200, dtype=bias_dtype)
        counts = [1, 640, 64 * 200]
        vals, idx = batch_topk(x, counts, bias)
        flat = (x.to(bias_dtype) + bias[:, None, :]).reshape(3, -1)
        assert vals.dtype == bias_dtype
        for m, n in enumerate(counts):
            assert torch.equal(vals[m, :n].sort().values, flat[m].topk(n).values.sort().values)
            assert torch.equal(flat[m][idx[m, :n]], vals[m, :n]) and (idx[m, :n].diff() > 0).all()
            assert (vals[m, n:] == 0).all() and (idx[m, n:] == 64 * 200 - 1).all()


def test_batch_topk_is_exact_when_its_sample_misleads():
    """One model, a slab whose sampled rows (every 8th) are the only large ones: the sample's bound is too high,
    fewer than n entries reach it, and the kernel must take its second pass to stay exact."""
    x = torch.randn(1, 4096, 64)
    x[:, ::8] *= 100
    n = 64 * 4096 // 4
    vals, idx = batch_topk(x, [n])
    assert torch.equal(vals[0].sort().values, x.reshape(-1).topk(n).values.sort().values)
    assert torch.equal(x.reshape(-1)[idx[0]], vals[0]) and (idx[0].diff() > 0).all()


def test_batch_topk_ties_go_to_the_lower_index():
    x = torch.tensor([[[1.0, 2.0, 2.0], [2.0, 0.0, 2.0]]])
    vals, idx = batch_topk(x, [3])
    assert idx.tolist() == [[1, 2, 3]] and vals.tolist() == [[2.0, 2.0, 2.0]]
