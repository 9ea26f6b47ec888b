"""Activation datasets on disk: a folder with manifest.json, tokens.safetensors and chunk_00000.safetensors, ...

Each chunk holds `rows_per_chunk` whole context rows: "activations" [rows·T, d] in the stored dtype and "tokens"
[rows, T]. A chunk is written under a temporary name and renamed when complete, and the manifest's count of
complete chunks is updated after it, so a killed run never leaves a half chunk that looks whole; rerunning
recomputes from the first missing chunk. Model batches are aligned to chunk starts, so a resumed run computes
exactly the same numbers (byte-identical chunks) as an unbroken one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor
from tqdm import tqdm

from sparse_coding.errors import StoreError
from sparse_coding.files import load_tensors, read_json, save_tensors, write_json

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MANIFEST = "manifest.json"
# The manifest fields that define what the activations are; a stored dataset is reused only if all match.
IDENTITY_FIELDS = (
    "model",
    "hook_name",
    "d",
    "dtype",
    "context_length",
    "tokens_per_chunk",
    "dataset",
    "text_field",
    "split",
    "tokenizer",
)


def chunk_name(i: int) -> str:
    return f"chunk_{i:05d}.safetensors"


@dataclass
class ActivationDataset:
    folder: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> ActivationDataset:
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise StoreError(f"{folder} holds no activation dataset ({MANIFEST} missing)")
        return cls(folder, read_json(folder / MANIFEST))

    @property
    def n_chunks(self) -> int:
        return int(self.manifest["n_chunks"])

    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    def load_chunk(self, i: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Gives chunk i as (activations [rows·T, d], tokens [rows, T])."""
        path = self.folder / chunk_name(i)
        try:
            t = load_tensors(path, device=device)
            acts, tokens = t["activations"], t["tokens"]
        except (SafetensorError, OSError, KeyError, RuntimeError) as e:
            raise StoreError(f"chunk {path} is unreadable ({e}); delete it and rerun to recompute it") from e
        rows, T = self.manifest["rows_per_chunk"], self.manifest["context_length"]
        if acts.shape != (rows * T, self.d) or tokens.shape != (rows, T):
            raise StoreError(f"chunk {path} has the wrong shape; delete it and rerun to recompute it")
        if not torch.isfinite(acts.sum(dtype=torch.float32)):  # NaN and inf reach the sum: one read, no mask
            raise StoreError(f"chunk {path} holds NaN or infinite activations; nothing can be trained on it")
        return acts, tokens


def first_missing_chunk(folder: Path, n: int) -> int:
    """Gives the index of the first of chunks 0..n-1 missing from folder (n if none): where caching resumes."""
    return next((i for i in range(n) if not (folder / chunk_name(i)).is_file()), n)


def check_compatible(stored: dict[str, Any], wanted: dict[str, Any], folder: Path) -> None:
    diffs = [
        f"{k}: stored {stored.get(k)!r}, asked {wanted[k]!r}"
        for k in IDENTITY_FIELDS
        if k in wanted and stored.get(k) != wanted[k]
    ]
    if diffs:
        raise StoreError(
            f"the activations in {folder} were made with other settings ({'; '.join(diffs)}); "
            "use another --activations_dir or delete that folder"
        )


def cache_activations(
    folder: Path,
    identity: dict[str, Any],
    tokens: Tensor,
    compute: Callable[[Tensor], Tensor],
    n_chunks: int,
    rows_per_chunk: int,
    model_batch_size: int,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> ActivationDataset:
    """Makes sure `folder` holds n_chunks complete chunks of compute(tokens) activations, resuming where it
    stopped. tokens: [N, T]; compute: [b, T] token rows → [b, T, d] activations."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[identity["dtype"]]
    available = tokens.shape[0] // rows_per_chunk
    if n_chunks > available:
        raise StoreError(
            f"the data gives {tokens.shape[0]} rows = {available} chunks of {rows_per_chunk} rows; "
            f"{n_chunks} asked (use fewer --n_chunks, smaller --chunk_size_tokens or more text)"
        )
    if (folder / MANIFEST).is_file():
        manifest = read_json(folder / MANIFEST)
        check_compatible(manifest, {**identity, "context_length": tokens.shape[1]}, folder)
        done = first_missing_chunk(folder, int(manifest["n_chunks"]))
    else:
        manifest = {
            **identity,
            "context_length": tokens.shape[1],
            "rows_per_chunk": rows_per_chunk,
            "n_chunks": 0,
            **(extra or {}),
        }
        done = 0
    used = tokens[: max(n_chunks, done) * rows_per_chunk]
    if not (folder / "tokens.safetensors").is_file() or done == 0:
        save_tensors(folder / "tokens.safetensors", {"tokens": used.to(torch.int32)})
    elif n_chunks > done:  # the stored rows must be the ones these chunks continue
        stored = load_tensors(folder / "tokens.safetensors")["tokens"]
        if not torch.equal(stored[: done * rows_per_chunk].long(), tokens[: done * rows_per_chunk]):
            raise StoreError(
                f"the text now tokenizes differently from the rows stored in {folder}; use another --activations_dir"
            )
        save_tensors(folder / "tokens.safetensors", {"tokens": used.to(torch.int32)})
    manifest["n_chunks"] = done
    write_json(folder / MANIFEST, manifest)
    for i in tqdm(
        range(done, n_chunks),
        desc="caching activations",
        unit="chunk",
        disable=not progress,
        initial=done,
        total=n_chunks,
    ):
        rows = tokens[i * rows_per_chunk : (i + 1) * rows_per_chunk]
        parts = [compute(rows[j : j + model_batch_size]) for j in range(0, rows.shape[0], model_batch_size)]
        acts = torch.cat(parts).flatten(0, 1)
        if not torch.isfinite(acts.sum()):  # NaN and inf propagate into the sum: one read, no mask tensor
            raise StoreError(f"the model gave NaN or infinite activations in chunk {i}; nothing was written for it")
        save_tensors(folder / chunk_name(i), {"activations": acts.to(dtype), "tokens": rows.to(torch.int32)})
        manifest.setdefault("d", acts.shape[1])
        manifest["n_chunks"] = i + 1
        write_json(folder / MANIFEST, manifest)
    return ActivationDataset(folder, manifest)
