"""Latent sharding (`--parallel latents`): one stack's latents split evenly over the ranks of a process group, so
an SAE whose weights, gradients and Adam state do not fit one process trains on several.

Rank r holds latents [r·d_sae/N, (r+1)·d_sae/N): its rows of W_enc, b_enc, W_dec and of every other per-latent
tensor (an architecture's `latent_tensors`: thresholds, gate parameters, dead-latent counters), and so their Adam
state. b_dec (and a skip transcoder's W_skip) are replicated and stay identical on every rank.

The math follows Megatron's column-then-row parallel pair:
- the encoder reads b_dec through `replicate` (identity forward; backward, the all-reduce of its gradient): each
  rank's latents give only their share of b_dec's gradient through the encoder;
- each rank decodes its own latents and `reduce` sums the partial outputs (all-reduce forward; identity backward:
  every rank then computes the same loss, whose gradient reaches each partial output whole); sums over latents
  (L1, L0, a pre-act term) are partial and reduced the same way;
- TopK selects the exact global top-k (`topk_rows`): each rank's own top k of each token, all-gathered, the top k of
  those candidates, each rank keeping its own; BatchTopK (`batch_topk`) the same with its k·B candidates per rank
  and the batch's global threshold, ties going to the lower index as in one process.
Everything after a reduce runs identically on every rank, so the replicated parameters get identical gradients
and stay in step with no broadcast. gloo on CPU, NCCL on CUDA; every collective is torch.distributed's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class _Reduce(torch.autograd.Function):
    """Sum over ranks forward; the gradient passes through whole (each rank's loss is the same function of the
    sum)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return g, None


class _Replicate(torch.autograd.Function):
    """Identity forward; the gradient is summed over ranks (each rank's latents see only their share of it)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


@dataclass(frozen=True)
class LatentShard:
    """This rank's share of a dictionary of d_sae latents: [start, stop)."""

    rank: int
    world: int
    d_sae: int
    group: Any = None  # the process group (None: the default one)

    def __post_init__(self) -> None:
        if self.d_sae % self.world:
            raise ValueError(f"d_sae {self.d_sae} does not split evenly over {self.world} processes")

    @property
    def size(self) -> int:
        return self.d_sae // self.world

    @property
    def start(self) -> int:
        return self.rank * self.size

    @property
    def stop(self) -> int:
        return self.start + self.size

    # --- collectives ----------------------------------------------------------------------------------------
    def reduce(self, t: Tensor) -> Tensor:
        """The sum over ranks of partial results t (differentiable: see _Reduce)."""
        return _Reduce.apply(t, self.group)

    def replicate(self, t: Tensor) -> Tensor:
        """t, whose gradient is summed over ranks in the backward pass (see _Replicate)."""
        return _Replicate.apply(t, self.group)

    def all_reduce_(self, t: Tensor, op: Any = dist.ReduceOp.SUM) -> Tensor:
        """Reduces t in place over ranks, no gradient; gives it."""
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        """Every rank's t (same shape everywhere), stacked in rank order: [world, *t.shape]."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def gather_to_main(self, t: Tensor, dim: int) -> Tensor | None:
        """Every rank's t concatenated along dim, on rank 0 (None elsewhere): how a stack is put back together."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(t, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def take(self, exported: dict[str, Tensor]) -> dict[str, Tensor]:
        """Gives this shard's part of one SAE's exported weights (SAELens layout: W_enc [d_in, d_sae], W_dec and
        every per-latent vector [d_sae, ...]; b_dec and W_skip whole), to continue a saved SAE on shards."""

        def part(name: str, t: Tensor) -> Tensor:
            if name == "W_enc":
                return t[:, self.start : self.stop]
            if name in ("b_dec", "W_skip") or t.dim() == 0 or t.shape[0] != self.d_sae:
                return t
            return t[self.start : self.stop]

        return {name: part(name, t) for name, t in exported.items()}

    # --- the exact global selections of the TopK family ---------------------------------------------------------
    def topk_rows(self, vals: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """vals, idx [M, B, kl]: each token's kl largest pre-activations on this rank and their local latents, sorted
        → the k largest over every rank, sorted, [M, B, k]: the value and local latent where the latent is this
        rank's, else value 0 at latent 0 (an entry that adds nothing, fires nothing and gets no gradient)."""
        M, B, kl = vals.shape
        cand_v = self.all_gather(vals).permute(1, 2, 0, 3).reshape(M, B, self.world * kl)
        cand_i = self.all_gather(idx + self.start).permute(1, 2, 0, 3).reshape(M, B, self.world * kl)
        top_v, pos = cand_v.topk(k, dim=-1, sorted=True)
        top_i = cand_i.gather(-1, pos)
        mine = (top_i >= self.start) & (top_i < self.stop)
        return torch.where(mine, top_v, 0.0), torch.where(mine, top_i - self.start, 0)

    def batch_topk(self, vals: Tensor, idx: Tensor, counts: list[int], n_rows: int) -> tuple[Tensor, Tensor]:
        """vals, idx [M, n]: model m's counts[m] largest entries of this rank's [n_rows, size] slab (flat local
        indices r·size + j, in index order, padded past counts[m]) → model m's counts[m] largest over every rank's
        slab (ties to the lower global index r·d_sae + j, as in one process), this rank's in index order and padded
        with value 0 at the last index, [M, max over models of this rank's share]."""
        M, n = vals.shape
        local = torch.tensor([min(c, n_rows * self.size) for c in counts], device=vals.device)  # entries per rank
        rows, lat = idx // self.size, idx % self.size
        cand_v = self.all_gather(vals)  # [world, M, n]
        cand_i = self.all_gather(rows * self.d_sae + lat + self.start)
        real = torch.arange(n, device=vals.device) < local[:, None]  # [M, n]: not padding
        chosen = torch.zeros(M, n, dtype=torch.bool, device=vals.device)
        for m, count in enumerate(counts):  # one selection per model: their counts differ
            v = cand_v[:, m].masked_fill(~real[m], float("-inf")).reshape(-1)
            pick = _largest_lowest_index(v, cand_i[:, m].reshape(-1), count)
            chosen[m] = pick.view(self.world, n)[self.rank]
        keep = chosen.sum(-1)
        width = int(keep.max())
        slot = chosen.cumsum(-1) - 1
        out_v = vals.new_zeros(M, width)
        out_i = torch.full((M, width), n_rows * self.size - 1, dtype=idx.dtype, device=idx.device)
        m_idx, e_idx = chosen.nonzero(as_tuple=True)
        out_v[m_idx, slot[m_idx, e_idx]] = vals[m_idx, e_idx]
        out_i[m_idx, slot[m_idx, e_idx]] = idx[m_idx, e_idx]
        return out_v, out_i


def _largest_lowest_index(v: Tensor, index: Tensor, count: int) -> Tensor:
    """Gives the mask of the `count` largest entries of v, equal values going to the lower `index`."""
    threshold = v.topk(count, sorted=False).values.min()
    above, tied = v > threshold, v == threshold
    need = count - int(above.sum())
    if int(tied.sum()) == need:  # the usual case: no tie at the threshold
        return above | tied
    tied_at = tied.nonzero().flatten()
    keep = tied_at[index[tied_at].argsort()[:need]]
    return above.index_fill(0, keep, True)
