"""The TopK primitives: the compiled CPU top-k against torch.topk (same values, indices that hold them, ties and
NaN handled), its fallback, and the per-latent sums against a dense one-hot matmul."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_coding.saes import kernels
from sparse_coding.saes.kernels import cpu_kernel_available, latent_sum, topk_last_dim


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


@pytest.mark.parametrize("expanded", [False, True])
def test_latent_sum_matches_a_dense_matmul(expanded):
    torch.set_default_dtype(torch.float64)
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
            assert torch.allclose(got, want, atol=1e-12)
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


def test_a_stale_build_lock_does_not_hang_the_load(tmp_path):
    """A build killed mid-way leaves torch's lock file behind; an old one is cleared, not waited on. (In a
    fresh process: a second build of the kernel cannot be loaded beside the first.)"""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = "from sparse_coding.saes import kernels; print(kernels.build_directory())"
    build = Path(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip())
    build.mkdir(parents=True)
    lock = build / "lock"
    lock.touch()
    os.utime(lock, (0, 0))
    code = "from sparse_coding.saes import kernels; assert kernels.cpu_kernel_available()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    assert not lock.exists()
