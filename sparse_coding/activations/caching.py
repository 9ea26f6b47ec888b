"""Filling the activation store: text → token rows → the model's activations at a hook → chunks on disk.
A store made with the same model, hook, data and shape is reused; a half-made one is finished."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_coding.activations.store import (
    DTYPES,
    MANIFEST,
    ActivationDataset,
    cache_activations,
    check_compatible,
    first_missing_chunk,
)
from sparse_coding.config import Config, option
from sparse_coding.data.text import chunk_and_tokenize, load_texts
from sparse_coding.errors import ConfigError, ModelError, StoreError
from sparse_coding.files import read_json
from sparse_coding.models.language_model import LAYER_LOCS, LanguageModel

DEFAULT_MODEL = "checkpoints/tiny"  # made by `make tiny` (train_tiny.py)
DEFAULT_DATASET = "data/pydocs/train.jsonl"  # the offline corpus `make corpus` prepares (the tiny model's own)


@dataclass
class CacheConfig(Config):
    """Which activations to store: the model, the hook, the text and the store's shape."""

    model_name: str = option(
        DEFAULT_MODEL, "TransformerLens/HF hub name, local HF folder, or nanoGPT checkpoint folder"
    )
    layer: int = option(1, "the layer whose activations are stored", ge=0)
    layer_loc: str = option(
        "mlp", "where in the layer: mlp (hidden neurons), mlp_out, residual, attn", choices=LAYER_LOCS
    )
    hook_name: str = option("", "explicit hook / module path; overrides layer and layer_loc")
    dataset_name: str = option(DEFAULT_DATASET, "hub name, or a local .jsonl/.json/.txt/.parquet file or folder")
    text_field: str = option("text", "the field of each record that holds its text")
    dataset_split: str = option("train", "the split of a hub dataset")
    max_docs: int = option(0, "read at most this many documents (0: all)", ge=0)
    max_length: int = option(128, "tokens per context row", gt=0)
    n_chunks: int = option(6, "chunks of activations to store", gt=0)
    chunk_size_tokens: int = option(32_768, "tokens per chunk, a multiple of max_length", gt=0)
    activation_dtype: str = option("fp32", "dtype of the stored activations", choices=tuple(DTYPES))
    model_batch_size: int = option(32, "context rows per forward pass when caching", gt=0)
    activations_dir: str = option("", "the store's folder; empty: data/activations/<model>__<hook>__<data>__<shape>")

    def check(self) -> None:
        super().check()
        if self.chunk_size_tokens % self.max_length:
            raise ConfigError(
                f"chunk_size_tokens ({self.chunk_size_tokens}) must be a multiple of max_length ({self.max_length})"
            )

    @property
    def rows_per_chunk(self) -> int:
        return self.chunk_size_tokens // self.max_length


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")[-60:] or "x"


def activation_identity(cfg: CacheConfig, lm: LanguageModel, hook: str, d: int) -> dict[str, Any]:
    """Gives the manifest fields that say what the stored activations are."""
    return {
        "model": lm.name,
        "hook_name": hook,
        "d": d,
        "dtype": cfg.activation_dtype,
        "context_length": cfg.max_length,
        "tokens_per_chunk": cfg.chunk_size_tokens,
        "dataset": cfg.dataset_name,
        "text_field": cfg.text_field,
        "split": cfg.dataset_split,
        "tokenizer": lm.tokenizer.name,
    }


def activations_folder(cfg: CacheConfig, lm: LanguageModel, hook: str) -> Path:
    if cfg.activations_dir:
        return Path(cfg.activations_dir)
    shape = f"T{cfg.max_length}_c{cfg.chunk_size_tokens}_{cfg.activation_dtype}"
    return Path("data/activations") / "__".join([_slug(lm.name), _slug(hook), _slug(cfg.dataset_name), shape])


def hook_width(lm: LanguageModel, hook: str) -> int:
    """Gives d, the width of the activations at the hook (one forward pass on two tokens)."""
    return lm.activations(torch.zeros(1, 2, dtype=torch.long), hook).shape[-1]


def check_disk(cfg: CacheConfig, folder: Path, d: int, done: int) -> None:
    """Raises StoreError when the chunks still to be written would not fit on the store's disk."""
    per_chunk = cfg.chunk_size_tokens * (d * DTYPES[cfg.activation_dtype].itemsize + 8)  # activations + tokens
    need = (cfg.n_chunks - done) * per_chunk
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise StoreError(
            f"the activation store needs {need / 2**30:.1f} GiB more in {folder} but its disk has {free / 2**30:.1f} "
            "GiB free; use fewer --n_chunks, a smaller --chunk_size_tokens or another --activations_dir"
        )


def prepare_activations(cfg: CacheConfig, lm: LanguageModel, hook: str, progress: bool) -> ActivationDataset:
    """Gives the stored activations for this model, hook and data, computing (or finishing) them if needed."""
    d = hook_width(lm, hook)
    identity = activation_identity(cfg, lm, hook, d)
    folder = activations_folder(cfg, lm, hook)
    done = 0
    if (folder / MANIFEST).is_file():
        stored = read_json(folder / MANIFEST)
        check_compatible(stored, identity, folder)
        done = first_missing_chunk(folder, cfg.n_chunks)
        if done == cfg.n_chunks:
            print(f"reusing stored activations in {folder}")
            return ActivationDataset(folder, stored)
    check_disk(cfg, folder, d, done)
    texts = load_texts(cfg.dataset_name, cfg.text_field, cfg.dataset_split, cfg.max_docs)
    rows = chunk_and_tokenize(
        texts,
        lm.tokenizer.encode_batch,
        lm.tokenizer.eos_id,
        cfg.max_length,
        max_rows=cfg.n_chunks * cfg.rows_per_chunk,
    )
    extra = {
        "bytes_per_token": rows.bytes_per_token,
        "n_docs": rows.n_docs,
        "layer": cfg.layer,
        "layer_loc": cfg.layer_loc if not cfg.hook_name else None,
    }

    def compute(tokens: Tensor) -> Tensor:
        try:
            return lm.activations(tokens, hook).float().cpu()
        except (ValueError, RuntimeError, IndexError) as e:  # from inside the model: said once, not as a traceback
            raise ModelError(f"the model failed while caching activations: {type(e).__name__}: {e}") from None

    data = cache_activations(
        folder, identity, rows.tokens, compute, cfg.n_chunks, cfg.rows_per_chunk, cfg.model_batch_size, extra, progress
    )
    print(f"activations stored in {folder}")
    return data
