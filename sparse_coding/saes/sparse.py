"""The sparse training path of the TopK family (topk, batchtopk, matryoshka), and of relu once its codes are
sparse: the selected codes are kept as entries, never as a dense [B, d_sae] tensor, and every gradient touches only
them.

Two layouts of the selected entries (values with their indices), both with a leading model axis:
- per row, [M, B, K]: K latent indices for each token, as TopK chooses them;
- flat, [M, N]: indices r·d_sae + j into the [B, d_sae] slab, in index order (so grouped by token), as a batch-wide
  selection (BatchTopK) gives them; N is the same for every token of the batch only on average.

A step then costs one dense matmul (the encoder forward), the selection and O(entries · d_in) work: the decoder is
a weighted sum of the chosen rows per token (gather_sum; embedding_bag off CPU), the codes' gradient a dot product
per entry (gather_dot), and both weight gradients are per-latent sums over the same entries (kernels.latent_sum).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_coding.saes.base import BufferCache
from sparse_coding.saes.kernels import fuses_bias, gathers, latent_sum, topk_last_dim
from sparse_coding.saes.precision import FP32, Precision


def split_flat(idx: Tensor, d_sae: int) -> tuple[Tensor, Tensor]:
    """Flat indices [M, N] → (rows, latents) [M, N]."""
    return torch.div(idx, d_sae, rounding_mode="floor"), idx % d_sae


def sparse_decode(
    vals: Tensor,
    idx: Tensor,
    W_dec: Tensor,
    bags: Tensor | None = None,
    n_bags: int = 0,
    precision: Precision = FP32,
) -> Tensor:
    """Σ of vals · W_dec[latent] per bag, no bias. W_dec: [M, d_sae, d_in].

    Per row: vals, idx [M, B, K] → [M, B, d_in], one bag per token. Flat: vals, latent indices idx [M, N] and
    bags [M, N] (non-decreasing along each model's entries) → [M, n_bags, d_in]; an empty bag gives 0.
    On a CPU with the kernels built, float32 entries go through gather_sum/gather_dot (topk_cpu.cpp), which read
    the decoder's rows in bf16 under a bf16 precision (the rounding a dense matmul's operand gets there; half the
    bytes; sums in float32); elsewhere embedding_bag gives the output and the gradient of vals, in W_dec's dtype.
    The decoder's gradient comes from latent_sum over the same entries (a fifth of embedding_bag's own dense
    scatter backward here)."""
    M, d_sae, d_in = W_dec.shape
    offsets = (torch.arange(M, device=idx.device) * d_sae).view(M, *[1] * (idx.dim() - 1))
    flat_idx = (idx + offsets).reshape(-1)
    if bags is None:
        B, K = idx.shape[1:]
        starts, n = torch.arange(0, M * B * K, K, device=idx.device), M * B
    else:
        flat_bags = (bags + (torch.arange(M, device=idx.device) * n_bags)[:, None]).reshape(-1)
        counts = torch.bincount(flat_bags, minlength=M * n_bags)
        starts, n = counts.cumsum(0) - counts, M * n_bags
    table = W_dec.detach().reshape(M * d_sae, d_in)
    if gathers(table) and vals.dtype == torch.float32:
        rows = table.to(torch.bfloat16) if precision.name == "bf16" else table
        return _KernelDecode.apply(vals, W_dec, rows, flat_idx, starts, idx, bags).view(M, -1, d_in)
    out = F.embedding_bag(flat_idx, table, starts, per_sample_weights=vals.reshape(-1), mode="sum")
    return _DecoderGrad.apply(out.view(M, n // M, d_in), vals.detach(), idx, bags, W_dec)


class _DecoderGrad(torch.autograd.Function):
    """Passes embedding_bag's output through and gives W_dec its gradient, Σ over the entries of each latent of
    vals · g_out[bag]."""

    @staticmethod
    def forward(ctx, out, vals, idx, bags, W_dec):  # type: ignore[override]
        ctx.save_for_backward(vals, idx, bags)
        ctx.d_sae = W_dec.shape[1]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g_out):  # type: ignore[override]
        vals, idx, bags = ctx.saved_tensors
        return g_out, None, None, None, latent_sum(idx, vals, g_out, ctx.d_sae, rows=bags)[0]


class _KernelDecode(torch.autograd.Function):
    """The CPU kernels' decoder: gather_sum forward; backward, the gradient of vals by gather_dot (one dot product
    per entry, against the rows the forward read) and W_dec's by latent_sum, as _DecoderGrad."""

    @staticmethod
    def forward(ctx, vals, W_dec, rows, flat_idx, starts, idx, bags):  # type: ignore[override]
        ctx.save_for_backward(vals, rows, flat_idx, starts, idx, bags)
        ctx.d_sae = W_dec.shape[1]
        return torch.ops.sparse_coding.gather_sum(rows, flat_idx, starts, vals.reshape(-1))

    @staticmethod
    def backward(ctx, g_out):  # type: ignore[override]
        vals, rows, flat_idx, starts, idx, bags = ctx.saved_tensors
        M = idx.shape[0]
        g_vals = torch.ops.sparse_coding.gather_dot(g_out, rows, flat_idx, starts).view_as(vals)
        g_W = latent_sum(idx, vals, g_out.view(M, -1, g_out.shape[-1]), ctx.d_sae, rows=bags)[0]
        return g_vals, g_W, None, None, None, None, None


def top_dead(pre: Tensor, dead: Tensor, k_aux: int, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """pre (+ bias): [M, B, d_sae], dead: [M, d_sae] → the k_aux largest pre-activations among each model's
    dead latents (ReLU'd; 0 at latent 0 where a model has fewer than k_aux), sorted, and their latent indices,
    [M, B, k_aux]. Gathers the dead columns first, so a handful of dead latents costs a handful of columns, not a
    pass over all of pre."""
    M, B, F_ = pre.shape
    n_dead = dead.sum(-1)
    D = min(max(int(n_dead.max()), k_aux), F_)  # a shard may hold fewer dead latents than the whole asks for
    vals = pre.new_zeros(M, B, k_aux, dtype=torch.promote_types(pre.dtype, torch.float32))
    idx = torch.zeros(M, B, k_aux, dtype=torch.long, device=pre.device)
    if int(n_dead.max()) == 0:
        return vals, idx
    cols = torch.argsort((~dead).to(torch.uint8), dim=-1, stable=True)[:, :D]  # dead latents first, in order
    sub = pre.gather(-1, cols[:, None, :].expand(M, B, D)).float()  # (a bf16 product's columns, widened)
    if bias is not None:
        sub += bias.gather(-1, cols)[:, None, :]
    sub.masked_fill_((torch.arange(D, device=pre.device) >= n_dead[:, None])[:, None, :], float("-inf"))
    k = min(k_aux, D)
    top, pos = topk_last_dim(sub, k)  # sorted, as TopKSAE.select
    vals[..., :k] = top.relu()
    idx[..., :k] = cols.gather(-1, pos.reshape(M, -1)).view(M, B, k)
    return vals, idx


class SparseEncode(torch.autograd.Function):
    """Encoder forward (one dense matmul into a reused buffer, then `sae.select`; optionally the AuxK top-k over
    dead latents from the same pre-activations) with a backward that touches only the selected entries.

    x: [B, d_in] shared by the M models, or [M, B, d_in] one each (a cross-layer transcoder's layers) → vals, idx in
    either layout (see the module docstring), aux_vals, aux_idx [M, B, k_aux].
    b_center: the bias subtracted from x (the SAE's center_bias()). pre: the pre-activations [M, B, d_sae], bias
    included, where the caller has computed them already (relu chooses its path from them); the encoder forward is
    then skipped. On a shard of the latents the selections are the global ones (saes/shard.py)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_center, sae: Any, dead: Tensor | None, k_aux: int, pre: Tensor | None = None):  # type: ignore[override]
        cache: BufferCache = sae._cache
        M, B, F_ = W_enc.shape[0], x.shape[-2], W_enc.shape[1]
        xs = x if x.dim() == 3 else x.unsqueeze(0)
        xc = xs - b_center[:, None, :] if sae.centers_input else xs.expand(M, -1, -1)
        bias = None
        if pre is None and sae.selects_bf16 and fuses_bias(xc):  # native bf16 on a CPU: the product as it comes
            buffer = cache.get("pre_bf16", (M, B, F_), b_enc, torch.bfloat16)
            pre = sae.precision.cpu_bf16_product(xc, W_enc.mT, buffer)
            bias = None if pre is None else b_enc
        if pre is None:
            pre = cache.get("pre", (M, B, F_), b_enc)  # fp32 whatever x's dtype (a bf16 store's, say)
            # Where the selection adds b_enc on the fly (CPU), pre skips it: one pass less over [M, B, d_sae].
            bias = b_enc if fuses_bias(pre) else None
            if bias is None:
                sae.precision.baddbmm(b_enc[:, None, :], xc, W_enc.mT, out=pre)
            else:
                sae.precision.bmm(xc, W_enc.mT, out=pre)
        vals, idx = sae.select(pre, bias)
        if dead is not None:
            aux_vals, aux_idx = top_dead(pre, dead, k_aux, bias)
            if sae.shard is not None:
                aux_vals, aux_idx = sae.shard.topk_rows(aux_vals, aux_idx, k_aux)
        else:
            aux_vals = x.new_zeros(M, B, 0)
            aux_idx = torch.zeros(M, B, 0, dtype=torch.long, device=x.device)
        ctx.center = sae.centers_input
        ctx.save_for_backward(xc, W_enc, vals, idx, aux_vals, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):  # type: ignore[override]
        xc, W_enc, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        M, B, F_ = xc.shape[0], xc.shape[1], W_enc.shape[1]
        has_aux = g_aux is not None and aux_idx.shape[-1] > 0
        g = g_vals * (vals > 0)
        # W_enc.grad[m, j] = Σ over entries that chose j of g · xc[token]; b_enc.grad[m, j] = Σ g.
        if idx.dim() == 3:  # per row: the AuxK entries join each token's own
            if has_aux:
                g = torch.cat([g, g_aux * (aux_vals > 0)], dim=-1)
                idx = torch.cat([idx, aux_idx], dim=-1)
            g_W_enc, g_b_enc = latent_sum(idx, g, xc, F_)
        else:
            rows, lat = split_flat(idx, F_)
            if has_aux:
                aux_rows = torch.arange(B, device=xc.device).repeat_interleave(aux_idx.shape[-1]).expand(M, -1)
                g = torch.cat([g, (g_aux * (aux_vals > 0)).reshape(M, -1)], dim=-1)
                lat = torch.cat([lat, aux_idx.reshape(M, -1)], dim=-1)
                rows = torch.cat([rows, aux_rows], dim=-1)
            g_W_enc, g_b_enc = latent_sum(lat, g, xc, F_, rows=rows)
        g_b_center = -torch.bmm(g_b_enc[:, None, :], W_enc)[:, 0, :] if ctx.center else None
        return None, g_W_enc, g_b_enc, g_b_center, None, None, None, None
