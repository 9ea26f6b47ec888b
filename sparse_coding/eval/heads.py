"""Per-head attribution of dictionaries on attention heads' outputs (--layer_loc attn_z).

There the activation is every head's output side by side, [..., n_heads · d_head] (head-major; a crosscoder over
several layers: layer-major, then head). A latent's decoder row splits into one block of d_head columns per head;
its attribution to head h is that block's share of the row's squared norm, ‖W_dec[i, h]‖² / ‖W_dec[i]‖² — the share
of the latent's write (its energy) that head h's output carries. Shares of a latent sum to 1 (0 for a zero row).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def head_shares(decoder: Tensor, n_heads: int, n_blocks: int = 1) -> Tensor:
    """decoder [F, n_blocks · n_heads · d_head] → each latent's share per head, [F, n_blocks · n_heads]."""
    F_, width = decoder.shape
    if width % (n_blocks * n_heads):
        raise ValueError(f"a decoder of width {width} is not {n_blocks} × {n_heads} heads of one width")
    sq = decoder.detach().float().reshape(F_, n_blocks * n_heads, -1).pow(2).sum(-1)
    return sq / sq.sum(-1, keepdim=True).clamp_min(1e-30)


def head_summary(shares: Tensor) -> dict[str, Any]:
    """The results row's view of shares [F, heads]: the mean over latents of their largest head share (1: every
    latent reads one head; 1/heads: spread evenly), the share of latents with ≥ 90 % in one head, and how many
    latents each head is the largest part of."""
    top = shares.max(dim=-1)
    return {
        "head_top_share_mean": round(float(top.values.mean()), 6),
        "head_single_share": round(float((top.values >= 0.9).float().mean()), 6),
        "latents_per_head": torch.bincount(top.indices, minlength=shares.shape[1]).tolist(),
    }
