"""Sweeps over several processes (`torchrun --nproc_per_node=N run.py ...`, one machine or several).

Three ways to split the work, all reading the same activation chunks in the same order on every rank:
- "models": each rank trains its share of the sweep's SAEs (grid points m ≡ rank mod N, every dictionary size of
  a grid point on the same rank so MMCS with the larger dictionary stays local). Every rank first builds the whole
  sweep from the same seed, then keeps its slice, so each SAE starts, and trains, exactly as in one process.
- "data": every rank holds every SAE and trains it on its 1/N slice of each batch; gradients are averaged across
  ranks (DDP-style), which equals one process on the whole batch for mean-over-batch losses (relu's MSE + L1).
  For TopK it is an approximation: FVU is normalised by each slice's own variance, and dead latents (AuxK) are
  judged on each rank's own tokens; BatchTopK selects the top k·B/N of each rank's slice and each rank keeps its
  own threshold estimate (rank 0's is the one evaluated and saved); JumpReLU's FVU is normalised per slice as
  TopK's is; gated's loss, a mean over the batch like relu's, splits exactly.
- "latents": every rank holds 1/N of every SAE's latents (saes/shard.py) and sees the whole batch; the result is
  the one-process result up to float summation order, for every architecture. For SAEs whose weights, gradients
  and Adam state do not fit one process. Evaluation and saving put each stack back together on rank 0
  (`gather_stack`): rank 0 then holds the weights of one whole stack, without optimizer state.
gloo on CPU, nccl on CUDA. Metadata crosses ranks as JSON in uint8 tensors (nothing is pickled).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sparse_coding.saes import SAE
from sparse_coding.saes.base import uninitialised
from sparse_coding.saes.shard import LatentShard


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Joins the torchrun process group when launched by torchrun; gives (info, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return info, device


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leaves the process group (call it in a `finally`). On the way out of a run that went well every rank first
    waits for the others: a rank that tore gloo down while a peer was still finishing died of SIGABRT now and then
    ("terminate called without an active exception"); after an error no rank waits for peers that may never come."""
    if info.active and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(t: Tensor, info: DistInfo) -> Tensor:
    """Sums t in place across ranks (nothing to do in one process); gives it."""
    if info.active:
        dist.all_reduce(t)
    return t


def gather_json(obj: Any, info: DistInfo, device: torch.device) -> list[Any]:
    """Gives every rank's `obj` (JSON-serialisable) on every rank, in rank order."""
    if not info.active:
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(info.world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(info.world)]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[: int(s.item())].tolist()).decode()) for p, s in zip(parts, sizes, strict=True)]


def gather_rows(t: Tensor, info: DistInfo) -> Tensor:
    """Every rank's rows t [n_rank, ...] (n may differ between ranks), concatenated in rank order, on every rank."""
    if not info.active:
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(info.world)]
    dist.all_gather(sizes, torch.tensor([len(t)], device=t.device))
    longest = int(max(s.item() for s in sizes))
    padded = t.new_zeros(longest, *t.shape[1:])
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(info.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def my_models(n_models: int, info: DistInfo) -> list[int]:
    """The grid points this rank trains in 'models' mode."""
    return list(range(info.rank, n_models, info.world))


def slice_stack(stack: SAE, models: list[int]) -> SAE:
    """Gives a stack holding only `models` of `stack`, with their parameters, buffers and hyperparameters."""
    with uninitialised():
        part = type(stack)(stack.d_in, stack.d_sae, [stack.hparams(m) for m in models], **stack.stack_options())
    index = torch.tensor(models, device=stack.b_dec.device)
    part.load_state_dict({k: v.index_select(0, index) for k, v in stack.state_dict().items()})
    part.precision = stack.precision
    return part.to(stack.b_dec.device)


def latent_shard(d_sae: int, info: DistInfo) -> LatentShard:
    """This rank's share of a dictionary of d_sae latents ('latents' mode)."""
    return LatentShard(info.rank, info.world, d_sae)


def gather_stack(stack: SAE) -> SAE | None:
    """Puts a latent-sharded stack back together on rank 0 (None on the other ranks, which must call it too): the
    whole stack, unsharded, as one process would have trained it. One tensor at a time, weights and buffers only."""
    shard = stack.shard
    if shard is None:
        return stack
    axes = {name: stack.latent_axis(name) for name in stack.state_dict()}
    state = {
        name: t if axes[name] is None else shard.gather_to_main(t, dim=axes[name])  # type: ignore[arg-type]
        for name, t in stack.state_dict().items()
    }
    if shard.rank != 0:
        return None
    options = {k: v for k, v in stack.stack_options().items() if k != "shard"}
    with uninitialised():
        whole = type(stack)(stack.d_in, stack.d_sae, [stack.hparams(m) for m in range(stack.n_models)], **options)
    whole.load_state_dict(state)
    whole.precision, whole.sparsity_scale = stack.precision, stack.sparsity_scale
    return whole.to(stack.b_dec.device)


def average_tensors(tensors: list[Tensor], info: DistInfo) -> None:
    """All-reduces and averages tensors in place across ranks ('data' mode): one flat buffer, one collective."""
    if not info.active or not tensors:
        return
    flat = all_sum(torch.cat([t.reshape(-1) for t in tensors]), info)
    flat /= info.world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class RankSlice:
    """A batch source whose batches are this rank's 1/N slice of the global batch ('data' mode)."""

    def __init__(self, source: Any, info: DistInfo):
        self.source, self.info = source, info

    def next_batch(self, batch_size: int) -> Tensor:
        x = self.source.next_batch(batch_size)
        per = batch_size // self.info.world
        return x[self.info.rank * per : (self.info.rank + 1) * per]

    def get_state(self) -> dict[str, Tensor]:
        return self.source.get_state()

    def set_state(self, state: dict[str, Tensor]) -> None:
        self.source.set_state(state)
