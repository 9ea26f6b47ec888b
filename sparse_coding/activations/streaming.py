"""Training straight from the model (`run.py --activations stream`): text → token rows → the model's activations at
a hook → a bounded shuffle buffer in memory → training batches. Nothing is written to disk, so a run of any length
needs no store; memory is the model plus the buffer, whatever the corpus's size.

The buffer (`--buffer_tokens` B) is refilled half at a time, so consecutive batches mix many contexts, as SAELens'
mixing buffer does: refill r runs the model over the next B/2 tokens of text (token rows in model batches, the
excluded special tokens' positions left out) and shuffles the activations; the training batches of period r are
cut from a pool of the newer half of refill r−1 and the older half of refill r, shuffled again. So every activation
is used once, and batches hold activations from 2·B/2 tokens' worth of contexts. At most about 1¼·B activations are
in memory at once (the pool, the half kept for the next period, and a refill being computed); a pool's ragged end,
under one batch, is skipped.

Held out: the first `n_eval_chunks × chunk_size_tokens` tokens of the text, computed once, never trained on, scored
as a store's held-out chunks are. Training reads the text after them and starts it again after them (a new epoch)
when it runs out.

Resume: the state is the period, the batch offset in its pool and the text position (document, offset into its
ids, epoch) at the start of refill r−1. A resumed run reads the text from there, recomputes refills r−1 and r (two
refills of model forward passes) and continues with the same batches. No random state is carried: every shuffle is
seeded by (seed, refill or period index). Under torchrun each process computes its share of each refill's rows and
the activations are gathered, so every process holds the same buffer (each then takes what its --parallel mode
needs, as from a store).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparse_coding.activations.batches import HeldOut
from sparse_coding.activations.store import DTYPES
from sparse_coding.data.text import TokenStream, iter_documents
from sparse_coding.errors import ConfigError, DatasetError, ModelError
from sparse_coding.training.distributed import DistInfo, gather_rows

Position = tuple[int, int, int]  # (epoch, document, offset into its token ids)


@dataclass
class TextRows:
    """The text as token rows from any position on, wrapping to `restart` (a new epoch) when it runs out.

    open_at(document, offset) gives a TokenStream over the documents from that one on, its first `offset` ids
    dropped."""

    open_at: Callable[[int, int], TokenStream]
    restart: tuple[int, int]  # where each new epoch starts (after the held-out rows)
    position: Position = (0, 0, 0)

    def __post_init__(self) -> None:
        self._stream = self.open_at(*self.position[1:])

    def seek(self, position: Position) -> None:
        self.position = position
        self._stream = self.open_at(*position[1:])

    def take(self, n_rows: int, step: int) -> Tensor:
        """Gives the next n_rows rows [n_rows, T], read `step` rows at a time (so where an epoch ends depends only
        on where the read started), starting a new epoch where the text runs out."""
        parts, left = [], n_rows
        while left:
            rows = self._stream.take(min(step, left))
            if rows is None:  # the text's end: the next epoch starts again after the held-out rows
                if self._stream.position == self.restart:
                    raise DatasetError(
                        f"the text holds fewer than {min(step, left)} rows beyond the held-out ones; give more text"
                    )
                self.seek((self.position[0] + 1, *self.restart))
                continue
            parts.append(rows)
            left -= len(rows)
            self.position = (self.position[0], *self._stream.position)
        return torch.cat(parts)


class StreamSource:
    """Training batches from the model's activations over the text (the module docstring's buffer), resumable.

    compute(token rows [b, T]) → the rows' training activations [n_kept, width] in the buffer's dtype."""

    def __init__(
        self,
        text: TextRows,
        compute: Callable[[Tensor], Tensor],
        refill_rows: int,
        model_batch_size: int,
        seed: int,
        info: DistInfo,
    ):
        self.text, self.compute, self.refill_rows, self.model_batch_size = text, compute, refill_rows, model_batch_size
        self.seed, self.info = seed, info
        self.period, self.offset = -1, 0
        self.pool: Tensor | None = None
        self._late: Tensor | None = None  # the newer half of the last refill: the next period's older part
        self._before: dict[int, Position] = {}  # the text position before each of the last two refills

    def _refill(self, r: int) -> tuple[Tensor, Tensor]:
        """Reads refill r's rows, computes this process's share of their activations and gathers every share; gives
        them split at random (seeded by r) into an older and a newer half."""
        self._before = {k: v for k, v in self._before.items() if k >= r - 1}
        self._before[r] = self.text.position
        rows = self.text.take(self.refill_rows, self.model_batch_size)
        acts = shared_forward(rows, self.compute, self.model_batch_size, self.info)
        if not torch.isfinite(acts.sum(dtype=torch.float32)):
            raise ModelError(f"the model gave NaN or infinite activations in the text after {self._before[r]}")
        order = _permutation(len(acts), self.seed * 1_000_003 + r, acts.device)
        half = len(acts) // 2
        return acts[order[:half]], acts[order[half:]]

    def _enter(self, period: int) -> None:
        """Makes period's pool: the kept half of the last refill and the older half of a new one, shuffled. The
        spent pool goes first and nothing is held twice, so memory stays under ~1¼ buffers."""
        self.pool = None
        older, newer = self._refill(period)
        kept = self._late if self._late is not None else older[:0]
        self.pool = _shuffled(kept, older, self.seed * 7_919 + period)
        self._late, self.period, self.offset = newer, period, 0

    def next_batch(self, batch_size: int) -> Tensor:
        if self.pool is None or self.offset + batch_size > len(self.pool):
            self._enter(self.period + 1)
            assert self.pool is not None
            if batch_size > len(self.pool):
                raise ConfigError(
                    f"batch_size {batch_size} exceeds the {len(self.pool)} activations of a shuffle period; "
                    "raise --buffer_tokens"
                )
        batch = self.pool[self.offset : self.offset + batch_size]
        self.offset += batch_size
        return batch.float()

    def get_state(self) -> dict[str, Tensor]:
        """The period, the offset in its pool, and the text position before the refill its pool starts from."""
        if self.period < 0:
            start = self.text.position
        else:
            start = self._before[self.period - 1] if self.period > 0 else self._before[0]
        return {"stream": torch.tensor([self.period, self.offset, *start])}

    def set_state(self, state: dict[str, Tensor]) -> None:
        period, offset, epoch, doc, at = (int(v) for v in state["stream"].tolist())
        self.text.seek((epoch, doc, at))
        self.pool, self._late, self._before = None, None, {}
        self.period, self.offset = period, offset
        if period < 0:
            return
        if period > 0:  # refill period − 1 again, for the newer half this period's pool starts with
            self._late = self._refill(period - 1)[1]
        self._enter(period)
        self.offset = offset


def _permutation(n: int, seed: int, device: torch.device) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)


def _shuffled(a: Tensor, b: Tensor, seed: int) -> Tensor:
    """cat([a, b]) in a seeded random order, written straight into place (no concatenated copy on the way)."""
    n = len(a) + len(b)
    order = _permutation(n, seed, a.device)
    where = torch.empty_like(order)
    where[order] = torch.arange(n, device=a.device)  # where each row of cat([a, b]) goes
    out = a.new_empty(n, *a.shape[1:])
    out[where[: len(a)]] = a
    out[where[len(a) :]] = b
    return out


def shared_forward(rows: Tensor, compute: Callable[[Tensor], Tensor], batch: int, info: DistInfo) -> Tensor:
    """compute over token rows [n, T] in model batches, each process taking its contiguous share of the rows; gives
    every share's result, in row order, on every process."""
    n, world, rank = len(rows), info.world, info.rank
    mine = rows[rank * n // world : (rank + 1) * n // world]
    parts = [compute(mine[k : k + batch]) for k in range(0, len(mine), batch)]
    return gather_rows(torch.cat(parts), info)


def activation_rows(
    lm: Any, hook: str, target_hook: str | None, excluded: list[int], dtype: torch.dtype
) -> Callable[[Tensor], Tensor]:
    """Gives compute(token rows [b, T]) → the training activations of their kept positions, [n, d] (a transcoder's
    [n, d + d_out]: input and target side by side, as training_rows gives a store's), in dtype."""
    hooks = [hook] + ([target_hook] if target_hook else [])
    excluded_ids = torch.tensor(sorted(excluded), dtype=torch.long)

    def compute(tokens: Tensor) -> Tensor:
        try:
            acts = lm.activations(tokens, hooks)
        except (ValueError, RuntimeError, IndexError) as e:  # from inside the model: said once, not as a traceback
            raise ModelError(f"the model failed on the text: {type(e).__name__}: {e}") from None
        kept = ~torch.isin(tokens, excluded_ids)
        parts = [acts[h][kept.to(acts[h].device)].to(dtype) for h in hooks]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    return compute


@dataclass
class StreamedActivations:
    """A hook's activations computed as training goes, as one sweep uses them: the held-out rows at the text's start
    and a StreamSource over the text after them. cfg: run.py's config (text, context, exclusions, buffer)."""

    lm: Any  # models.language_model.LanguageModel
    hook: str
    target_hook: str | None
    cfg: Any
    info: DistInfo

    def __post_init__(self) -> None:
        cfg, tok = self.cfg, self.lm.tokenizer
        self.separator = tok.separator(cfg.doc_separator)
        excluded = tok.excluded_ids(cfg.exclude_tokens)
        hooks = [self.hook] + ([self.target_hook] if self.target_hook else [])
        widths = {h: a.shape[-1] for h, a in self.lm.activations(torch.zeros(1, 2, dtype=torch.long), hooks).items()}
        self.d, self.d_out = widths[self.hook], widths[self.target_hook] if self.target_hook else None
        self.manifest = {  # what a store's manifest would say (SAE metadata, CE/KL's excluded tokens)
            "model": self.lm.name,
            "hook_name": self.hook,
            "target_hook": self.target_hook,
            "context_length": cfg.max_length,
            "dataset": cfg.dataset_name,
            "tokenizer": tok.name,
            "separator": self.separator[0],
            "excluded_tokens": sorted(excluded.values()),
        }
        self.folder = None  # nothing on disk
        self.compute = activation_rows(self.lm, self.hook, self.target_hook, self.manifest["excluded_tokens"],
                                       DTYPES[cfg.activation_dtype])  # fmt: skip
        self.n_eval_rows = cfg.n_eval_chunks * cfg.rows_per_chunk

    def open_at(self, doc: int, offset: int) -> TokenStream:
        cfg = self.cfg
        docs = iter_documents(cfg.dataset_name, cfg.text_field, cfg.dataset_split, cfg.max_docs, skip=doc)
        return TokenStream(docs, self.lm.tokenizer.encode_batch, self.separator[1], cfg.max_length, cfg.dataset_name,
                           start=(doc, offset))  # fmt: skip

    def _eval_rows(self) -> tuple[Tensor, tuple[int, int]]:
        stream = self.open_at(0, 0)
        rows = stream.take(self.n_eval_rows)
        if rows is None:
            raise DatasetError(
                f"the text gives fewer than the {self.n_eval_rows} rows held out for evaluation "
                "(n_eval_chunks × chunk_size_tokens / max_length); give more text or hold out less"
            )
        return rows, stream.position

    def held_out(self, device: torch.device) -> HeldOut:
        rows, _ = self._eval_rows()
        x = shared_forward(rows, self.compute, self.cfg.model_batch_size, self.info).to(device)
        return HeldOut(x, rows, rows.numel())

    def batches(self, seed: int, device: torch.device, mix_chunks: int) -> StreamSource:
        _, after = self._eval_rows()  # training reads the text after the held-out rows, in every epoch
        refill_rows = max(1, self.cfg.buffer_tokens // 2 // self.cfg.max_length)
        text = TextRows(self.open_at, after, (0, *after))
        return StreamSource(text, self.compute, refill_rows, self.cfg.model_batch_size, seed, self.info)
