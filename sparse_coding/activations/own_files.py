"""A folder of your own activations: plain `.safetensors` or `.npy` files of shape [N, d], made by any code,
trained on like a store of ours.

    DIR/part_000.npy            float array [N, d]            (optional DIR/part_000.tokens.npy: ints [N])
    DIR/part_001.safetensors    "activations" [N, d] (or its only tensor), optional "tokens" [N]

Every file is checked once, in blocks, when the folder is first indexed: rank 2, a float dtype, at least one
row, the same d as the others, and no NaN or infinite value; a file that fails stops the run with one line
naming it. The folder is then indexed in place: manifest.json lists the files (with size and modification time,
so a changed folder is indexed again) and cuts them into chunks of `rows_per_chunk` rows, slices of the files
that are read on demand. Nothing else in the folder is ever written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from sparse_coding.activations.store import MANIFEST, ActivationDataset, Chunk, chunk_name
from sparse_coding.errors import StoreError
from sparse_coding.files import read_json, write_json

SUFFIXES = (".safetensors", ".npy")
TOKENS_SUFFIX = ".tokens.npy"  # a .npy file's tokens beside it
FLOATS = {"float16", "bfloat16", "float32", "float64"}
_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}  # safetensors' names
CHECK_ROWS = 65_536  # rows read at a time while checking a file for NaN and inf


def is_own_folder(folder: Path) -> bool:
    """Whether folder holds your own activation files: indexed before, or activation files and no store of ours."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        return read_json(manifest).get("source") == "files"
    return folder.is_dir() and bool(_activation_files(folder)) and not (folder / chunk_name(0)).exists()


def _activation_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES and not p.name.endswith(TOKENS_SUFFIX)
    )


def index_folder(folder: Path, rows_per_chunk: int) -> ActivationDataset:
    """Gives the folder as an activation dataset, checking and indexing its files (once; again if they changed)."""
    files = _activation_files(folder)
    if not files:
        raise StoreError(f"{folder} holds no .safetensors or .npy activation files")
    listing = [_file_stamp(f) for f in files]
    if (folder / MANIFEST).is_file():
        manifest = read_json(folder / MANIFEST)
        stamps = [f["stamp"] for f in manifest.get("files", [])]
        if stamps == listing and manifest["rows_per_chunk"] == rows_per_chunk:  # indexed already, unchanged
            return ActivationDataset(folder, manifest)
    entries = [_check_file(f) for f in files]
    widths = {e["d"] for e in entries}
    if len(widths) > 1:
        first = entries[0]
        odd = next(e for e in entries if e["d"] != first["d"])
        raise StoreError(
            f"{folder / odd['name']} has d={odd['d']} but {folder / first['name']} has d={first['d']}: "
            "every file of a folder must hold activations of the same width"
        )
    for entry, stamp in zip(entries, listing, strict=True):
        entry["stamp"] = stamp
    chunks = [
        [i, start, min(start + rows_per_chunk, e["rows"])]
        for i, e in enumerate(entries)
        for start in range(0, e["rows"], rows_per_chunk)
    ]
    manifest = {
        "source": "files",
        "d": entries[0]["d"],
        "rows_per_chunk": rows_per_chunk,
        "n_chunks": len(chunks),
        "n_rows": sum(e["rows"] for e in entries),
        "files": entries,
        "chunks": chunks,
    }
    write_json(folder / MANIFEST, manifest)
    print(f"indexed {len(files)} activation files in {folder}: {manifest['n_rows']} rows, d={manifest['d']}")
    return ActivationDataset(folder, manifest)


def _file_stamp(f: Path) -> list[Any]:
    st = f.stat()
    return [f.name, st.st_size, st.st_mtime_ns]


def _check_file(f: Path) -> dict[str, Any]:
    """Checks one file (shape, dtype, rows, values, tokens) and gives its manifest entry."""
    tensor, shape, dtype = _describe(f)
    if len(shape) != 2:
        raise StoreError(f"{f} holds an array of shape {list(shape)}; activations must be [N, d] (rank 2)")
    if dtype not in FLOATS:
        raise StoreError(f"{f} holds {dtype} values; activations must be float16, bfloat16, float32 or float64")
    if shape[0] == 0 or shape[1] == 0:
        raise StoreError(f"{f} holds no activations (shape {list(shape)})")
    for start, block in _blocks(f, tensor, shape[0]):
        bad = ~torch.isfinite(block)
        if bad.any():
            row = start + int(bad.any(dim=1).nonzero()[0])
            raise StoreError(f"{f} holds NaN or infinite values (first at row {row}); nothing can train on them")
    tokens = _tokens_name(f)
    if tokens is not None:
        t = _read_tokens(f, tokens)
        if t.dim() != 1 or len(t) != shape[0] or t.is_floating_point():
            raise StoreError(f"the tokens of {f} must be integers [N] with N={shape[0]}, got {t.dtype} {list(t.shape)}")
    return {"name": f.name, "tensor": tensor, "rows": int(shape[0]), "d": int(shape[1]), "tokens": tokens}


def _describe(f: Path) -> tuple[str | None, tuple[int, ...], str]:
    """Gives (tensor name in a safetensors file, shape, dtype name) without reading the values."""
    if f.suffix == ".npy":
        arr = _npy(f)
        return None, tuple(arr.shape), str(arr.dtype)
    try:
        with safe_open(str(f), framework="pt") as st:
            names = list(st.keys())
            name = "activations" if "activations" in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise StoreError(f"{f} holds tensors {', '.join(names) or 'none'}; name the activations 'activations'")
            sl = st.get_slice(name)
            return name, tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())
    except (SafetensorError, OSError) as e:
        raise StoreError(f"{f} is not a readable safetensors file ({e})") from None


def _npy(f: Path) -> np.ndarray:
    try:
        return np.load(f, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise StoreError(f"{f} is not a readable .npy array ({e})") from None


def _tokens_name(f: Path) -> str | None:
    """Gives where a file's tokens are: "tokens" inside a safetensors file, a sibling .tokens.npy, or None."""
    if f.suffix == ".npy":
        sibling = f.with_name(f.name[: -len(".npy")] + TOKENS_SUFFIX)
        return sibling.name if sibling.is_file() else None
    with safe_open(str(f), framework="pt") as st:
        names = st.keys()
    return "tokens" if "tokens" in names else None


def _read_tokens(f: Path, name: str, start: int = 0, stop: int | None = None) -> Tensor:
    if name.endswith(TOKENS_SUFFIX):
        return torch.from_numpy(np.array(_npy(f.parent / name)[start:stop]))
    with safe_open(str(f), framework="pt") as st:
        sl = st.get_slice(name)
        return sl[start : sl.get_shape()[0] if stop is None else stop]


def read_rows(f: Path, tensor: str | None, start: int, stop: int) -> Tensor:
    """Gives rows start..stop of a file's activations, as float32 for float64 files, else as stored."""
    if tensor is None:
        rows = torch.from_numpy(np.array(_npy(f)[start:stop]))
    else:
        with safe_open(str(f), framework="pt") as st:
            rows = st.get_slice(tensor)[start:stop]
    return rows.float() if rows.dtype == torch.float64 else rows


def _blocks(f: Path, tensor: str | None, n: int) -> Iterator[tuple[int, Tensor]]:
    for start in range(0, n, CHECK_ROWS):
        yield start, read_rows(f, tensor, start, min(n, start + CHECK_ROWS)).float()


def read_chunk(folder: Path, manifest: dict[str, Any], i: int) -> Chunk:
    """Gives chunk i of an indexed folder: a slice of one file (and of its tokens, if it has them)."""
    file_index, start, stop = manifest["chunks"][i]
    entry = manifest["files"][file_index]
    f = folder / entry["name"]
    try:
        acts = read_rows(f, entry["tensor"], start, stop)
        tokens = _read_tokens(f, entry["tokens"], start, stop) if entry["tokens"] else None
    except (SafetensorError, OSError, ValueError) as e:
        raise StoreError(f"{f} is unreadable ({e}); it changed after it was indexed?") from None
    if acts.shape != (stop - start, manifest["d"]):
        raise StoreError(f"{f} changed after it was indexed; rerun to index the folder again")
    return Chunk(acts, tokens)
