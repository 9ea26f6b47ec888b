"""Activation datasets on disk: a folder with manifest.json and chunk_00000.safetensors, chunk_00001, ...

Each chunk holds `rows_per_chunk` whole context rows: "tokens" [rows, T], "kept" [rows, T] (bool: the positions
whose activations are stored; those of excluded special tokens are not) and "activations" [n_kept, d] in the
stored dtype, row-major over (row, position). A transcoder's store adds "targets" [n_kept, d_out]: the hooked
module's output at the same positions, its input being "activations".

A chunk is written under a temporary name and renamed when complete, and the manifest's count of complete chunks
is updated after it, so a killed run never leaves a half chunk that looks whole; rerunning recomputes from the
first missing chunk. Model batches are aligned to chunk starts, so a resumed run computes exactly the same
numbers (byte-identical chunks) as an unbroken one. Several stores (one per hook) fill from one forward pass.

A folder of your own activation files (own_files.py) has a manifest too, whose chunks are slices of those files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm import tqdm

from sparse_coding.errors import StoreError
from sparse_coding.files import load_tensors, read_json, save_tensors, write_json

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MANIFEST = "manifest.json"
# The manifest fields that define what the activations are; a stored dataset is reused only if all match.
IDENTITY_FIELDS = (
    "model",
    "model_dtype",
    "hook_name",
    "target_hook",
    "d",
    "d_out",
    "dtype",
    "context_length",
    "tokens_per_chunk",
    "dataset",
    "text_field",
    "split",
    "tokenizer",
    "separator",
    "excluded_tokens",
)


def chunk_name(i: int) -> str:
    return f"chunk_{i:05d}.safetensors"


@dataclass
class Chunk:
    activations: Tensor  # [n, d]
    tokens: Tensor | None = None  # [rows, T]; your own files: [n] (one per row) or None
    kept: Tensor | None = None  # [rows, T] bool: where each activation row comes from, in order
    targets: Tensor | None = None  # [n, d_out]: a transcoder's target (the module's output)


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

    @property
    def d_out(self) -> int | None:
        """The width of a transcoder's targets; None for a plain store."""
        return self.manifest.get("d_out")

    @property
    def from_files(self) -> bool:
        """Whether this is a folder of your own activation files (no model, no text)."""
        return self.manifest.get("source") == "files"

    def load_chunk(self, i: int, device: torch.device | str = "cpu") -> Chunk:
        """Gives chunk i, checked: shapes as the manifest says, and no NaN or infinite activations."""
        if self.from_files:
            from sparse_coding.activations.own_files import read_chunk

            chunk = read_chunk(self.folder, self.manifest, i)
        else:
            chunk = self._read_own_chunk(i, device)
        if not torch.isfinite(chunk.activations.sum(dtype=torch.float32)):  # NaN and inf reach the sum
            where = f"chunk {i} of {self.folder}" if self.from_files else str(self.folder / chunk_name(i))
            raise StoreError(f"{where} holds NaN or infinite activations; nothing can train on it")
        return chunk

    def _read_own_chunk(self, i: int, device: torch.device | str) -> Chunk:
        path = self.folder / chunk_name(i)
        try:
            t = load_tensors(path, device=device)
            acts, tokens = t["activations"], t["tokens"]
        except (SafetensorError, OSError, KeyError, RuntimeError) as e:
            raise StoreError(f"chunk {path} is unreadable ({e}); delete it and rerun to recompute it") from e
        kept = t.get("kept", torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device))  # older stores
        rows, T = self.manifest["rows_per_chunk"], self.manifest["context_length"]
        targets = t.get("targets")
        shapes_ok = tokens.shape == (rows, T) and kept.shape == (rows, T) and acts.shape == (int(kept.sum()), self.d)
        if not shapes_ok or (self.d_out is not None and (targets is None or targets.shape != (len(acts), self.d_out))):
            raise StoreError(f"chunk {path} has the wrong shape; delete it and rerun to recompute it")
        return Chunk(acts, tokens, kept, targets)


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


class RowSource(Protocol):
    """Token rows on demand (data.text.TokenStream): the next n rows [n, T], or None when there are no more."""

    def take(self, n_rows: int) -> Tensor | None: ...


@dataclass
class StoreSpec:
    """One store to fill: its folder, the manifest fields saying what it holds, and the hook it reads
    (target_hook: a transcoder's store also keeps that hook's value as the target)."""

    folder: Path
    fields: dict[str, Any]  # written into a new manifest; those in IDENTITY_FIELDS must match a stored one
    hook: str
    target_hook: str | None = None


def cache_activations(
    stores: Sequence[StoreSpec],
    rows: RowSource,
    compute: Callable[[Tensor], dict[str, Tensor]],
    n_chunks: int,
    rows_per_chunk: int,
    model_batch_size: int,
    excluded: Sequence[int] = (),
    extra: Callable[[], dict[str, Any]] | None = None,
    progress: bool = True,
) -> list[ActivationDataset]:
    """Makes sure every store holds n_chunks complete chunks, resuming each where it stopped; one forward pass
    per model batch serves them all. compute: token rows [b, T] → {hook: activations [b, T, d]}; positions
    whose token is in `excluded` are not stored; extra() gives manifest fields that describe the text read so
    far (bytes per token, documents)."""
    manifests = [_open_for_writing(s, rows_per_chunk) for s in stores]
    done = [first_missing_chunk(s.folder, int(m["n_chunks"])) for s, m in zip(stores, manifests, strict=True)]
    excluded_ids = torch.tensor(sorted(excluded), dtype=torch.long)
    bar = tqdm(total=n_chunks, initial=min(done), desc="caching activations", unit="chunk", disable=not progress)
    for i in range(n_chunks):
        chunk_rows = rows.take(rows_per_chunk)
        if chunk_rows is None:
            raise StoreError(
                f"the data gives only {i} chunks of {rows_per_chunk} rows; {n_chunks} asked "
                "(use fewer --n_chunks, smaller --chunk_size_tokens or more text)"
            )
        todo = [j for j, d in enumerate(done) if d <= i]
        if not todo:  # stored already: the text must still give the rows it was made from
            _check_same_rows(stores[0].folder / chunk_name(i), chunk_rows)
            continue
        hooks = list(dict.fromkeys(h for j in todo for h in (stores[j].hook, stores[j].target_hook) if h))
        parts = [compute(chunk_rows[k : k + model_batch_size]) for k in range(0, rows_per_chunk, model_batch_size)]
        acts = {h: torch.cat([p[h] for p in parts]) for h in hooks}
        kept = ~torch.isin(chunk_rows, excluded_ids)
        for j in todo:
            _write_chunk(stores[j], manifests[j], i, chunk_rows, kept, acts, extra)
        bar.update(1)
    bar.close()
    return [ActivationDataset(s.folder, m) for s, m in zip(stores, manifests, strict=True)]


def _open_for_writing(spec: StoreSpec, rows_per_chunk: int) -> dict[str, Any]:
    """Gives the store's manifest: the stored one, checked against what is asked, or a new one (written with
    the first chunk, so text that cannot be read leaves nothing behind)."""
    if (spec.folder / MANIFEST).is_file():
        manifest = read_json(spec.folder / MANIFEST)
        check_compatible(manifest, spec.fields, spec.folder)
        return manifest
    return {**spec.fields, "rows_per_chunk": rows_per_chunk, "n_chunks": 0}


def _check_same_rows(path: Path, rows: Tensor) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.get_tensor("tokens")
    except (SafetensorError, OSError) as e:
        raise StoreError(f"chunk {path} is unreadable ({e}); delete it and rerun to recompute it") from e
    if not torch.equal(stored.long(), rows):
        raise StoreError(
            f"the text now tokenizes differently from the rows stored in {path.parent}; use another --activations_dir"
        )


def _write_chunk(
    spec: StoreSpec,
    manifest: dict[str, Any],
    i: int,
    rows: Tensor,
    kept: Tensor,
    acts: dict[str, Tensor],
    extra: Callable[[], dict[str, Any]] | None,
) -> None:
    """Writes chunk i of one store (its kept positions only), then counts it in the manifest."""
    dtype = DTYPES[manifest["dtype"]]
    flat = kept.flatten()
    tensors = {"activations": acts[spec.hook].flatten(0, 1)[flat], "tokens": rows.to(torch.int32), "kept": kept}
    if spec.target_hook is not None:
        tensors["targets"] = acts[spec.target_hook].flatten(0, 1)[flat]
    for name in ("activations", "targets"):
        if name in tensors and not torch.isfinite(tensors[name].sum()):  # NaN and inf propagate into the sum
            raise StoreError(f"the model gave NaN or infinite activations in chunk {i}; nothing was written for it")
    if not (spec.folder / MANIFEST).is_file():  # a new store: its manifest first, so it is one even if this fails
        spec.folder.mkdir(parents=True, exist_ok=True)
        write_json(spec.folder / MANIFEST, manifest)
    save_tensors(
        spec.folder / chunk_name(i), {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    )
    manifest.setdefault("context_length", rows.shape[1])
    manifest.setdefault("d", tensors["activations"].shape[1])
    manifest["n_chunks"] = i + 1
    manifest.update(extra() if extra else {})
    write_json(spec.folder / MANIFEST, manifest)
