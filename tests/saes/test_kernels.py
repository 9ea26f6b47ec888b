"""The compiled primitives: the CPU top-k against torch.topk (same values, indices that hold them, ties and
NaN handled), its fallback, the per-latent sums against a dense one-hot matmul, and the fused JumpReLU/gated
passes against the same formulas in torch."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from sparse_coding.saes import kernels
from sparse_coding.saes.kernels import build_directory, cpu_kernel_available, latent_sum, topk_last_dim


def test_the_kernel_builds_here():
    assert cpu_kernel_available()  # a C++ compiler and ninja are part of the set-up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("shape", "k"),
    [((2, 3, 8192), 32), ((5, 1000), 7), ((4, 300), 256), ((3, 50), 50), ((6, 1), 1), ((2, 2, 129), 2)],
)
def test_matches_torch_topk(dtype, shape, k):
    x = torch.randn(*shape).to(dtype)
    vals, idx = topk_last_dim(x, k)
    ref = x.topk(k, dim=-1, sorted=True).values
    assert vals.dtype == dtype and idx.dtype == torch.long and vals.shape == ref.shape
    assert torch.equal(vals, ref)
    assert torch.equal(x.gather(-1, idx), vals)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # no index twice


def test_ties_go_to_the_lower_index_and_nan_ranks_first():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, float("nan"), 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    vals, idx = topk_last_dim(x, 3)
    assert idx.tolist() == [[5, 1, 2], [0, 1, 2]]
    assert vals[0, 0].isnan() and vals[0, 1:].tolist() == [3.0, 3.0]


@pytest.mark.parametrize(("n", "k"), [(8191, 32), (100, 16), (40, 40)])
def test_ties_rank_like_a_stable_sort(n, k):
    """Rows long enough for the bound (thousands, a length that is no multiple of the block count) and rows too
    short for it (every element a candidate: the toy's dictionaries): among equal values (-0 and +0 included) the
    lower index wins, exactly as a stable sort of -x orders them."""
    x = torch.randint(0, 20, (16, n)).float() - 19  # ~5 % zeros a row: the top k are ties
    x[:, ::2] = torch.where(x[:, ::2] == 0, -0.0, x[:, ::2])  # of both signs (a bias of -0 keeps them so)
    x[3, n // 2] = float("nan")  # a NaN row takes the heap and must agree too
    vals, idx = topk_last_dim(x, k, torch.full((n,), -0.0))
    # (+ 0: -0 becomes +0, which torch's sort of long rows would otherwise rank apart)
    want = torch.argsort(-x.nan_to_num(nan=float("inf")) + 0, dim=-1, stable=True)[:, :k]
    assert torch.equal(idx, want)
    assert torch.equal(vals[:, 1:], x.gather(-1, want)[:, 1:])


def test_masked_rows_with_few_finite_values():
    """The AuxK use: most of the row is -inf; the finite entries come first, then -inf entries."""
    x = torch.full((3, 4096), float("-inf"))
    x[0, [5, 900, 4000]] = torch.tensor([0.5, -2.0, 3.0])
    x[1, ::2] = torch.randn(2048)
    vals, idx = topk_last_dim(x, 64)
    assert vals[0, :3].tolist() == [3.0, 0.5, -2.0] and idx[0, :3].tolist() == [4000, 5, 900]
    assert torch.isneginf(vals[0, 3:]).all() and torch.isneginf(vals[2]).all()
    assert torch.equal(vals[1], x[1].topk(64).values)


def test_large_rows_of_pre_activation_like_data():
    """Block sizes and the bound on realistic shapes: many rows, k ≪ n, a heavy tail."""
    x = torch.randn(512, 64) @ torch.randn(64, 16384) + torch.randn(16384)
    for k in (16, 32, 64, 200):
        vals, idx = topk_last_dim(x, k)
        assert torch.equal(vals, x.topk(k).values)
        assert torch.equal(x.gather(-1, idx), vals)


def _dense_latent_sum(sel, w, X, d_sae):
    onehot = torch.zeros(*sel.shape, d_sae, dtype=X.dtype).scatter_(-1, sel[..., None], 1.0)  # [M, B, K, F]
    weights = (onehot * w[..., None]).sum(2)  # [M, B, F]
    return weights.mT @ X, weights.sum(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 on CPU: the gather_sum kernel
@pytest.mark.parametrize("expanded", [False, True])
def test_latent_sum_matches_a_dense_matmul(expanded, dtype):
    torch.set_default_dtype(dtype)
    try:
        M, B, K, d, F = 3, 50, 6, 7, 40
        sel = torch.stack([torch.randperm(F)[:K] for _ in range(M * B)]).view(M, B, K)
        sel[0, :, 0] = 5  # a latent every token chose
        w = torch.randn(M, B, K)
        X = torch.randn(1, B, d).expand(M, B, d) if expanded else torch.randn(M, B, d)
        ref = _dense_latent_sum(sel, w, X, F)
        out = latent_sum(sel, w, X, F)
        for got, want in zip(out, ref, strict=True):
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-12 if dtype == torch.float64 else 1e-5)
    finally:
        torch.set_default_dtype(torch.float32)


def test_falls_back_to_torch_topk_when_asked(monkeypatch):
    x = torch.randn(4, 100)
    monkeypatch.setenv("SPARSE_CODING_NO_KERNEL", "1")
    kernels.cpu_kernel_available.cache_clear()
    try:
        assert not cpu_kernel_available()
        assert torch.equal(topk_last_dim(x, 5)[0], x.topk(5).values)
    finally:
        kernels.cpu_kernel_available.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_slice", [False, True])
def test_bias_is_added_on_the_fly(per_slice, dtype):
    x = torch.randn(3, 40, 2048).to(dtype)
    bias = (torch.randn(3, 2048) if per_slice else torch.randn(2048)).to(dtype)
    vals, idx = topk_last_dim(x, 16, bias)
    ref = x + (bias[:, None, :] if per_slice else bias)
    assert torch.equal(vals, ref.topk(16).values)
    assert torch.equal(ref.gather(-1, idx), vals)


def test_rounded_sums_tie_break_by_index():
    """2048 + 1 rounds to 2048 in float16: a tie, which the lower index wins, as for torch.topk(x + bias)."""
    x, bias = torch.tensor([2048.0, 2048.0], dtype=torch.half), torch.tensor([0.0, 1.0], dtype=torch.half)
    assert topk_last_dim(x, 1, bias)[1].tolist() == [0]


def test_edge_shapes_and_bad_bias():
    vals, idx = topk_last_dim(torch.randn(0, 5, 8), 2, torch.randn(0, 8))
    assert vals.shape == idx.shape == (0, 5, 2)
    with pytest.raises(ValueError, match="bias must be"):
        topk_last_dim(torch.randn(6), 2, torch.randn(2, 3))
    with pytest.raises(ValueError, match="bias must be"):
        topk_last_dim(torch.randn(4, 5, 8), 2, torch.randn(1, 8))


def test_a_bias_that_needs_its_gradient_gets_it():
    x, bias = torch.randn(3, 600), torch.randn(600, requires_grad=True)
    vals, _ = topk_last_dim(x, 4, bias)
    vals.sum().backward()
    assert bias.grad is not None and bias.grad.sum() == 12


def test_a_stale_build_lock_does_not_hang_the_load(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's lock file behind; an old one is cleared, not waited on. (In a
    fresh process: a second build of the kernel cannot be loaded beside the first. It starts from a copy of this
    process's build, so ninja finds it up to date instead of compiling for ~15 s.)"""
    if not cpu_kernel_available():
        pytest.skip("the CPU kernels are not built here")
    ours = build_directory()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = build_directory()
    shutil.copytree(ours, build, ignore=shutil.ignore_patterns("lock"))
    lock = build / "lock"
    lock.touch()
    os.utime(lock, (0, 0))
    code = "from sparse_coding.saes import kernels; assert kernels.cpu_kernel_available()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)  # a wait on the lock never ends
    assert not lock.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_kernels_match_torch_across_latent_blocks(dtype):
    """The fused JumpReLU and gated passes of dense_cpu.cpp against the same formulas in torch, on a stack wide
    enough for several blocks of latents (the last one partial), so each block's offsets are exercised."""
    if not cpu_kernel_available():
        pytest.skip("the CPU kernels are not built here")
    ops = torch.ops.sparse_coding
    M, B, F = 2, 9, 600
    pre, g0, g_codes = (torch.randn(M, B, F, dtype=dtype) for _ in range(3))
    theta, b_gate, b_mag, l1_weight = (torch.randn(M, F, dtype=dtype) for _ in range(4))
    exp_r = torch.rand(M, F, dtype=dtype) + 0.5
    close = {"rtol": 1e-5, "atol": 1e-5}

    codes = torch.empty_like(pre)
    fires = ops.jumprelu_forward(pre, theta, codes)
    on = pre > theta[:, None]
    assert torch.equal(codes, pre * on) and torch.equal(fires, on.sum(1))

    g = g0.clone()
    window_g, window_n, g_sum = ops.jumprelu_backward(pre, theta, g, 0.3)
    window = (pre - theta[:, None]).abs() < 0.3
    torch.testing.assert_close(window_g, (g0 * window).sum(1), **close)
    assert torch.equal(window_n, window.sum(1).to(dtype))
    assert torch.equal(g, g0 * on)
    torch.testing.assert_close(g_sum, (g0 * on).sum(1), **close)

    gate, codes = torch.empty_like(pre), torch.empty_like(pre)
    gate_sum, fires = ops.gated_forward(pre, b_gate, exp_r, b_mag, gate, codes)
    pi_gate, pi_mag = pre + b_gate[:, None], pre * exp_r[:, None] + b_mag[:, None]
    assert torch.equal(gate, pi_gate.relu()) and torch.equal(codes, (pi_gate > 0) * pi_mag.relu())
    torch.testing.assert_close(gate_sum, pi_gate.relu().sum(1), **close)
    assert torch.equal(fires, (codes > 0).sum(1))

    g = g0.clone()
    r_sum, mag_sum, gate_grad_sum = ops.gated_backward(pre, b_gate, exp_r, b_mag, g_codes, g, l1_weight)
    d_mag = g_codes * ((pi_gate > 0) & (pi_mag > 0))
    d_gate = (g0 + l1_weight[:, None]) * (pi_gate > 0)
    torch.testing.assert_close(g, d_gate + exp_r[:, None] * d_mag, **close)
    torch.testing.assert_close(r_sum, (d_mag * pre).sum(1), **close)
    torch.testing.assert_close(mag_sum, d_mag.sum(1), **close)
    torch.testing.assert_close(gate_grad_sum, d_gate.sum(1), **close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nested_squared_error_kernel_matches_torch(dtype):
    """Matryoshka's per-prefix errors: the compiled pass and its in-place backward against cumsum and autograd,
    at a width that is no multiple of the kernel's eight running sums."""
    if not cpu_kernel_available():
        pytest.skip("the CPU kernels are not built here")
    ops = torch.ops.sparse_coding
    M, B, G, d = 2, 5, 3, 37
    P, r = torch.randn(M, B, G, d, dtype=dtype, requires_grad=True), torch.randn(M, B, d, dtype=dtype)
    E = torch.empty(M, B, G, d, dtype=dtype)
    sq = ops.nested_sq_err_forward(P.detach(), r, E)
    want_E = P.cumsum(2) + r[:, :, None]
    want_sq = want_E.pow(2).sum(-1)
    torch.testing.assert_close(E, want_E.detach())
    torch.testing.assert_close(sq, want_sq.detach())
    g_sq = torch.randn(M, B, G, dtype=dtype)
    (want_sq * g_sq).sum().backward()
    ops.nested_sq_err_backward(E, g_sq)
    torch.testing.assert_close(E, P.grad)


@pytest.mark.parametrize("n", [512, 100])  # rows long enough for the bound, and too short for it
@pytest.mark.parametrize("per_slice", [False, True])
def test_a_bf16_input_with_a_float32_bias_selects_as_its_widened_sum(per_slice, n):
    """A native bf16 matmul's product with an fp32 encoder bias: the elements of x.float() + bias, ranked and
    returned in float32, as torch.topk of that sum gives them (ties to the lower index)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, n, generator=g).bfloat16()
    bias = torch.randn(3, n, generator=g) if per_slice else torch.randn(n, generator=g)
    vals, idx = topk_last_dim(x, 16, bias)
    ref = x.float() + (bias[:, None, :] if per_slice else bias)
    assert vals.dtype == torch.float32
    assert torch.equal(vals, ref.topk(16).values) and torch.equal(ref.gather(-1, idx), vals)


@pytest.mark.parametrize("rows_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [512, 37])  # 37: no multiple of the kernels' 16 lanes (the scalar tail)
def test_sparse_decoder_kernels_match_embedding_bag(rows_dtype, d):
    """gather_sum against embedding_bag's forward and gather_dot against the gradient autograd gives its
    per-sample weights, on bags of different sizes (one empty), from float32 or bf16 rows (widened)."""
    if not cpu_kernel_available():
        pytest.skip("the CPU kernels are not built here")
    ops = torch.ops.sparse_coding
    g = torch.Generator().manual_seed(0)
    table = torch.randn(300, d, generator=g).to(rows_dtype)
    sizes = torch.tensor([3, 0, 7, 1, 32, 5])
    idx = torch.randint(0, 300, (int(sizes.sum()),), generator=g)
    starts = sizes.cumsum(0) - sizes
    w = torch.randn(len(idx), generator=g, requires_grad=True)
    ref = torch.nn.functional.embedding_bag(idx, table.float(), starts, per_sample_weights=w, mode="sum")
    grad = torch.randn(len(sizes), d, generator=g)
    (ref * grad).sum().backward()
    torch.testing.assert_close(ops.gather_sum(table, idx, starts, w.detach()), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.gather_dot(grad, table, idx, starts), w.grad, rtol=1e-5, atol=1e-5)
    assert (ops.gather_sum(table, idx, starts, w.detach())[1] == 0).all()  # the empty bag


def test_by_latent_is_a_stable_counting_sort():
    """CSR by latent: each latent's columns and weights in entry order, as a stable argsort of the latents gives."""
    if not cpu_kernel_available():
        pytest.skip("the CPU kernels are not built here")
    latents = torch.randint(0, 50, (1000,))
    latents[:3] = 49  # the last latent, whose entries end the order
    cols, w = torch.randint(0, 99, (1000,)), torch.randn(1000, dtype=torch.float64)
    crow, cols_by, w_by = torch.ops.sparse_coding.by_latent(latents, 60, cols, w)  # latents 50..59 chosen by none
    order = torch.argsort(latents, stable=True)
    assert torch.equal(cols_by, cols[order]) and torch.equal(w_by, w[order])
    counts = torch.bincount(latents, minlength=60)
    assert torch.equal(crow, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    with pytest.raises(RuntimeError, match="out of"):
        torch.ops.sparse_coding.by_latent(torch.tensor([60]), 60, torch.tensor([0]), torch.tensor([1.0]))
