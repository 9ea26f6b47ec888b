"""Training batches from stored activation chunks, shuffled across chunks and resumable; and what a sweep takes from
a store: its held-out chunks and its training batches (StoredActivations; streaming.py's StreamedActivations is the
same for activations computed as training goes)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_coding.activations.store import ActivationDataset, Chunk
from sparse_coding.errors import StoreError


def training_rows(chunk: Chunk) -> Tensor:
    """Gives a chunk's rows as the trainer takes them: [n, d], or a transcoder's [n, d + d_out] (input and
    target side by side, so one shuffle keeps the pairs together)."""
    if chunk.targets is None:
        return chunk.activations
    return torch.cat([chunk.activations, chunk.targets.to(chunk.activations.dtype)], dim=1)


class ChunkSource:
    """Training batches drawn from a set of chunks (their `training_rows`), shuffled across chunks: each epoch
    visits the chunks in a seeded random order, `mix_chunks` at a time; the rows of those chunks are pooled and
    shuffled, then cut into batches. The position (epoch, group, offset) is the whole state, so a resumed run
    sees the same batches. The next group loads in a background thread while the current one trains."""

    def __init__(
        self, data: ActivationDataset, chunk_ids: list[int], seed: int, device: torch.device, mix_chunks: int = 2
    ):
        if not chunk_ids:
            raise StoreError("no activation chunks left for training")
        self.data, self.chunk_ids, self.seed, self.device = data, chunk_ids, seed, device
        self.mix = max(1, min(mix_chunks, len(chunk_ids)))
        self.epoch = self.group = self.offset = 0
        self._pool: Tensor | None = None
        self._pool_key: tuple[int, int] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1)
        self._prefetch: tuple[tuple[int, int], Future[Tensor]] | None = None

    def _groups(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = [self.chunk_ids[i] for i in torch.randperm(len(self.chunk_ids), generator=g).tolist()]
        return [order[i : i + self.mix] for i in range(0, len(order), self.mix)]

    def _load_group(self, epoch: int, group: int) -> Tensor:
        ids = self._groups(epoch)[group]
        pool = torch.cat([training_rows(self.data.load_chunk(i)) for i in ids])
        g = torch.Generator().manual_seed(self.seed * 7_919 + epoch * 104_729 + group)
        return pool[torch.randperm(pool.shape[0], generator=g)].to(self.device, non_blocking=True)

    def _next_key(self, epoch: int, group: int) -> tuple[int, int]:
        return (epoch, group + 1) if group + 1 < len(self._groups(epoch)) else (epoch + 1, 0)

    def _ensure_pool(self) -> Tensor:
        key = (self.epoch, self.group)
        if self._pool_key != key:
            if self._prefetch is not None and self._prefetch[0] == key:
                self._pool = self._prefetch[1].result()
            else:
                self._pool = self._load_group(*key)
            self._pool_key = key
            nxt = self._next_key(*key)
            self._prefetch = (nxt, self._executor.submit(self._load_group, *nxt))
        assert self._pool is not None
        return self._pool

    def next_batch(self, batch_size: int) -> Tensor:
        pool = self._ensure_pool()
        if self.offset + batch_size > pool.shape[0]:  # the group's ragged end is skipped, not mixed with the next
            self.epoch, self.group = self._next_key(self.epoch, self.group)
            self.offset = 0
            pool = self._ensure_pool()
            if batch_size > pool.shape[0]:
                raise StoreError(f"batch_size {batch_size} exceeds the {pool.shape[0]} rows of a chunk group")
        batch = pool[self.offset : self.offset + batch_size]
        self.offset += batch_size
        return batch.float()

    def get_state(self) -> dict[str, Tensor]:
        return {"position": torch.tensor([self.epoch, self.group, self.offset])}

    def set_state(self, state: dict[str, Tensor]) -> None:
        self.epoch, self.group, self.offset = (int(v) for v in state["position"].tolist())


@dataclass
class HeldOut:
    """A sweep's held-out data: rows x [N, width] as the trainer takes them, the token rows they come from [R, T]
    (None for your own files without context rows) and the token positions they span, excluded special tokens
    included (as SAELens' token_stats count them)."""

    x: Tensor
    tokens: Tensor | None
    positions: int


@dataclass
class StoredActivations:
    """A store as one sweep uses it: its first n_chunks chunks, the last n_eval of them held out."""

    data: ActivationDataset
    n_chunks: int
    n_eval: int

    @property
    def d(self) -> int:
        return self.data.d

    @property
    def d_out(self) -> int | None:
        return self.data.d_out

    @property
    def manifest(self) -> dict[str, Any]:
        return self.data.manifest

    @property
    def folder(self) -> Path | None:
        return self.data.folder

    def held_out(self, device: torch.device) -> HeldOut:
        chunks = [self.data.load_chunk(i) for i in range(self.n_chunks - self.n_eval, self.n_chunks)]
        x = torch.cat([training_rows(c) for c in chunks]).to(device)
        with_rows = all(c.tokens is not None and c.tokens.dim() == 2 for c in chunks)
        tokens = torch.cat([c.tokens for c in chunks]).long() if with_rows else None  # type: ignore[misc]
        positions = sum(c.tokens.numel() if c.tokens is not None and c.tokens.dim() == 2 else len(c.activations)
                        for c in chunks)  # fmt: skip
        return HeldOut(x, tokens, positions)

    def batches(self, seed: int, device: torch.device, mix_chunks: int) -> ChunkSource:
        return ChunkSource(self.data, list(range(self.n_chunks - self.n_eval)), seed, device, mix_chunks)
