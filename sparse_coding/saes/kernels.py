"""The compiled CPU kernels and the sparse primitives of the TopK family.

- top-k of each row (topk_cpu.cpp; torch.topk elsewhere) and of a whole [B, d_sae] slab (BatchTopK);
- the sparse decoder's gathers (topk_cpu.cpp: gather_sum, a token's weighted sum of a few decoder rows, and
  gather_dot, its gradient, a dot product per entry; embedding_bag elsewhere), and per-latent sums over the entries
  that chose each latent (latent_sum: gather_sum over each latent's rows on CPU, a CSR matmul on CUDA);
- the fused elementwise passes of the dense JumpReLU and gated steps (dense_cpu.cpp; torch ops elsewhere).

On 2 CPU cores at d_sae 8192, batch 4096, k 32, torch.topk took ~41 ms of a ~290 ms training step, the kernel
~12 ms; embedding_bag's gradient of its weights ~8-11 ms (one BLAS dot call per entry), gather_dot ~3.5; MKL's CSR
matmul ~5 ms a per-latent sum, gather_sum ~3. `make setup` builds them (~30 s) into ~/.cache/sparse_coding/ (or
$TORCH_EXTENSIONS_DIR), in a folder per torch and Python version so two environments never load each other's
build; otherwise the first use builds them. Where they cannot be built (no C++ compiler) the torch versions are
used, with one warning.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

# CSR matmul is all we use of torch's sparse support, and it is stable for that; the beta notice is noise.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

_SOURCES = [Path(__file__).with_name(name) for name in ("topk_cpu.cpp", "dense_cpu.cpp")]


def build_directory() -> Path:
    """Where the kernels are built: one folder per torch and Python version (a build links against one torch)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "sparse_coding"
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return Path(root) / tag / "sparse_coding_kernels"


@functools.cache
def cpu_kernel_available() -> bool:
    """Builds (or loads the cached build of) the CPU kernels; False where that fails or SPARSE_CODING_NO_KERNEL=1."""
    if os.environ.get("SPARSE_CODING_NO_KERNEL") == "1":
        return False
    try:
        from torch.utils.cpp_extension import load

        build = build_directory()
        build.mkdir(parents=True, exist_ok=True)
        lock = build / "lock"  # torch waits forever on the lock of a build that was killed; a build takes ~15 s
        if lock.exists() and time.time() - lock.stat().st_mtime > 600:
            lock.unlink(missing_ok=True)
        load(
            name="sparse_coding_kernels",
            sources=[str(p) for p in _SOURCES],
            build_directory=str(build),
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no ninja, a read-only cache: all mean "use torch's own ops"
        warnings.warn(f"the CPU kernels could not be built, using torch ops (slower): {e}", stacklevel=2)
        return False
    return True


def fuses_bias(x: Tensor) -> bool:
    """True where topk_last_dim adds its bias on the fly (the CPU kernel): the caller can skip adding it."""
    return x.device.type == "cpu" and not _needs_grad(x) and cpu_kernel_available()


def gathers(table: Tensor) -> bool:
    """True where gather_sum/gather_dot serve a float32 or bf16 table on this device (CPU, the kernels built)."""
    return table.device.type == "cpu" and table.dtype in (torch.float32, torch.bfloat16) and cpu_kernel_available()


def compiled(x: Tensor) -> bool:
    """True where the fused kernels of dense_cpu.cpp serve x (CPU, float32 or float64, the kernels built)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and cpu_kernel_available()


def _needs_grad(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def topk_last_dim(x: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gives (values, indices) of the k largest entries of x + bias along the last dimension, sorted
    descending; bias is [n] or [x.shape[0], n] (one row per slice of a stack). On CPU equal values come out
    in index order, so the result is deterministic."""
    shapes = [x.shape[-1:]] + ([(x.shape[0], x.shape[-1])] if x.dim() >= 2 else [])
    if bias is not None and tuple(bias.shape) not in [tuple(s) for s in shapes]:
        raise ValueError(f"bias must be [{x.shape[-1]}] or [{x.shape[0]}, {x.shape[-1]}], got {list(bias.shape)}")
    if fuses_bias(x) and not _needs_grad(bias):  # the kernel has no backward
        return torch.ops.sparse_coding.topk_last_dim(x, k, bias)
    if bias is not None:
        x = x + (bias if bias.dim() == 1 else bias.view(bias.shape[0], *[1] * (x.dim() - 2), -1))
    return x.topk(k, dim=-1, sorted=True)


def batch_topk(x: Tensor, counts: list[int], bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x: [M, R, F] (+ bias [M, F], per column) → (values, flat indices) [M, max(counts)]: model m's counts[m]
    largest entries of its whole [R, F] slab, in index order (flat index r·F + j), padded past counts[m] with
    value 0 at index R·F − 1 (which keeps each row in index order). On CPU ties go to the lower index. A bf16 x
    with a float32 bias (a native bf16 product) gives float32 values, those of x.float() + bias."""
    M, R, F = x.shape
    widening = x.dtype == torch.bfloat16 and bias is not None and bias.dtype == torch.float32
    if fuses_bias(x) and not _needs_grad(bias) and (x.dtype in (torch.float32, torch.float64) or widening):
        return torch.ops.sparse_coding.batch_topk(x, counts, bias)
    flat = (x if bias is None else x + bias[:, None, :]).reshape(M, R * F)
    values = flat.new_zeros(M, max(counts))
    indices = torch.full((M, max(counts)), R * F - 1, dtype=torch.long, device=x.device)
    for m, n in enumerate(counts):  # one selection per model: their counts differ
        v, i = flat[m].topk(n, sorted=False)
        i, order = i.sort()
        values[m, :n], indices[m, :n] = v[order], i
    return values, indices


def latent_sum(sel: Tensor, w: Tensor, X: Tensor, d_sae: int, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """sel (int64), w: [M, N], X: [M, R, d], rows (int64) [M, N] → (out [M, d_sae, d], w_sum [M, d_sae]) with
    out[m, j] = Σ over entries n where sel[m, n] = j of w[m, n] · X[m, rows[m, n]], and w_sum the same sum of w.
    Without rows, sel and w are [M, R, K]: K entries for each row of X, in order. Each latent sums its entries
    in entry order (a stable sort): on CPU the result is deterministic."""
    M, R = X.shape[:2]
    if rows is None:
        K = sel.shape[-1]
        rows = torch.arange(R, device=sel.device).repeat_interleave(K).expand(M, -1)
    latents = (sel.reshape(M, -1) + (torch.arange(M, device=sel.device) * d_sae)[:, None]).reshape(-1)
    cols = (rows + (torch.arange(M, device=sel.device) * R)[:, None]).reshape(-1)
    flat = w.reshape(-1)
    if latents.device.type == "cpu" and cpu_kernel_available():  # a counting sort
        crow, cols_by, w_by = torch.ops.sparse_coding.by_latent(latents, M * d_sae, cols, flat)
    else:
        order = torch.argsort(latents, stable=True)
        crow = torch.zeros(M * d_sae + 1, dtype=torch.long, device=sel.device)
        crow[1:] = torch.bincount(latents, minlength=M * d_sae).cumsum(0)
        cols_by, w_by = cols[order], flat[order]
    if gathers(X) and w.dtype == torch.float32:  # each latent's bag of rows: the sparse decoder's gather_sum
        out = torch.ops.sparse_coding.gather_sum(X.reshape(M * R, -1), cols_by, crow[:-1], w_by).view(M, d_sae, -1)
    else:
        by_latent = torch.sparse_csr_tensor(crow, cols_by, w_by, (M * d_sae, M * R), check_invariants=False)
        # into an uninitialised output (beta 0 ignores it): `by_latent @ X` zero-fills its output first, ~1 ms a call
        out = torch.addmm(X.new_empty(M * d_sae, X.shape[-1]), by_latent, X.reshape(M * R, -1), beta=0)
        out = out.view(M, d_sae, -1)
    w_sum = torch.zeros(M * d_sae, dtype=w.dtype, device=w.device).index_add_(0, latents, flat).view(M, d_sae)
    return out, w_sum
