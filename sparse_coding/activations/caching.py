"""Filling the activation stores: text → token rows (streamed) → the model's activations at one or more hooks
(one forward pass for all) → one store per hook. A store made with the same model, hook, data and shape is
reused; a half-made one is finished."""

from __future__ import annotations

import hashlib
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_coding.activations.store import (
    DTYPES,
    MANIFEST,
    ActivationDataset,
    StoreSpec,
    cache_activations,
    check_compatible,
    first_missing_chunk,
)
from sparse_coding.config import Config, option
from sparse_coding.data.text import TokenStream, iter_documents
from sparse_coding.errors import ConfigError, ModelError, StoreError
from sparse_coding.files import read_json
from sparse_coding.locks import store_lock
from sparse_coding.models.language_model import JOIN, LAYER_LOCS, MODEL_DTYPES, LanguageModel
from sparse_coding.models.tokenizer import EXCLUDE_DEFAULT, parse_exclude_tokens

DEFAULT_MODEL = "checkpoints/tiny"  # made by `make tiny` (train_tiny.py)
DEFAULT_DATASET = "data/pydocs/train.jsonl"  # the offline corpus `make corpus` prepares (the tiny model's own)


@dataclass
class CacheConfig(Config):
    """Which activations to store: the model, the hook(s), the text and the store's shape."""

    model_name: str = option(
        DEFAULT_MODEL, "TransformerLens/HF hub name, local HF folder, or nanoGPT checkpoint folder"
    )
    diff_model: str = option(
        "", "model diffing: a second model (same tokenizer and width); one crosscoder reads both at the hook"
    )
    model_dtype: str = option("fp32", "dtype of the model's forward pass when caching", choices=tuple(MODEL_DTYPES))
    layer: int = option(1, "the layer whose activations are stored", ge=0)
    layer_loc: str = option(
        "mlp",
        "where in the layer: mlp (hidden neurons), mlp_out, residual, attn, attn_z (the heads' outputs before the "
        "output projection)",
        choices=LAYER_LOCS,
    )
    hook_name: str = option("", "explicit hook: a module path (AutoModel's names), ':input' for its input")
    layers: list[int] | None = option(None, "several layers at --layer_loc: one store and one sweep each", ge=0)
    hook_names: list[str] | None = option(None, "several hooks from one forward pass: one store and one sweep each")
    transcode: bool = option(False, "store a module's input and output as pairs and train transcoders (MLP default)")
    dataset_name: str = option(DEFAULT_DATASET, "hub name, or a local .jsonl/.json/.txt/.parquet file or folder")
    text_field: str = option("text", "the field of each record that holds its text")
    dataset_split: str = option("train", "the split of a hub dataset")
    max_docs: int = option(0, "read at most this many documents (0: all)", ge=0)
    doc_separator: str = option("", "token placed between documents; empty: EOS, else SEP ([SEP], </s>), else BOS")
    exclude_tokens: str = option(
        EXCLUDE_DEFAULT,
        "special tokens whose positions are not stored: 'default' (all the tokenizer defines), 'none', "
        "or a list such as bos,eos,pad,sep,cls",
    )
    max_length: int = option(128, "tokens per context row", gt=0)
    n_chunks: int = option(6, "chunks of activations to store", gt=0)
    chunk_size_tokens: int = option(32_768, "tokens per chunk, a multiple of max_length", gt=0)
    activation_dtype: str = option("fp32", "dtype of the stored activations", choices=tuple(DTYPES))
    model_batch_size: int = option(32, "context rows per forward pass when caching", gt=0)
    activations_dir: str = option(
        "",
        "the store's folder (a parent of one per hook with several); empty: data/activations/<model>__<hook>__...; "
        "a folder of your own .safetensors/.npy files is indexed and trained on",
    )

    def check(self) -> None:
        super().check()
        if self.chunk_size_tokens % self.max_length:
            raise ConfigError(
                f"chunk_size_tokens ({self.chunk_size_tokens}) must be a multiple of max_length ({self.max_length})"
            )
        parse_exclude_tokens(self.exclude_tokens)
        given = [name for name in ("hook_name", "hook_names", "layers") if getattr(self, name)]
        if len(given) > 1:
            raise ConfigError(f"give one of --hook_name, --hook_names, --layers, not {' and '.join(given)}")
        if self.transcode and self.layer_loc not in ("mlp", "mlp_out") and not (self.hook_name or self.hook_names):
            raise ConfigError(
                "--transcode maps a layer's MLP input to its output: use --layer_loc mlp or mlp_out, "
                "or name the module to replace with --hook_name"
            )

    @property
    def rows_per_chunk(self) -> int:
        return self.chunk_size_tokens // self.max_length

    def cross_layer(self) -> bool:
        """Whether one dictionary reads several layers at once (a CLT or crosscoder: run.py's config says, from
        --arch)."""
        return False

    def layer_transcoder(self) -> bool:
        """Whether that dictionary reads each layer's MLP input and writes MLP outputs (a CLT)."""
        return False


@dataclass(frozen=True)
class Target:
    """What one sweep trains on: a hook's activations, or for a transcoder a module's input (`hook`) and its
    output (`target_hook`). `name` keys the results: the hook, or the module a transcoder replaces."""

    hook: str
    target_hook: str | None = None
    layer: int | None = None  # when given by --layer(s)
    layers: tuple[int, ...] = ()  # a cross-layer dictionary's layers (its hooks are them joined with '+')
    heads: int = 0  # attention heads per layer at an attn_z hook (their outputs side by side); 0 elsewhere

    @property
    def name(self) -> str:
        return self.target_hook or self.hook


def resolve_targets(cfg: CacheConfig, lm: LanguageModel) -> list[Target]:
    """Gives the sweeps' targets from --hook_name(s) or --layer(s) and --layer_loc, by their canonical names."""
    heads = (lm.n_heads() or 0) if cfg.layer_loc == "attn_z" else 0
    if cfg.cross_layer() and not cfg.diff_model:  # one sweep over every layer's hooks, joined in layer order
        if not cfg.layers:
            cfg.layers = list(range(lm.n_layers()))  # all of them (what circuit-tracer expects); config.json says so
        if not cfg.layer_transcoder():  # a crosscoder: the hooks at --layer_loc
            hook = JOIN.join(lm.hook_for(layer, cfg.layer_loc) for layer in cfg.layers)
            return [Target(hook, layers=tuple(cfg.layers), heads=heads)]
        pairs = [lm.mlp_transcode_hooks(layer) for layer in cfg.layers]  # a CLT: each MLP's input and output
        return [Target(JOIN.join(i for i, _ in pairs), JOIN.join(o for _, o in pairs), layers=tuple(cfg.layers))]
    hooks = cfg.hook_names or ([cfg.hook_name] if cfg.hook_name else None)
    if hooks is not None:
        if cfg.transcode:
            return [Target(*lm.transcode_hooks(h)) for h in hooks]
        return [Target(lm.resolve_hook(h)) for h in hooks]
    layers = cfg.layers or [cfg.layer]
    if cfg.transcode:
        return [Target(*lm.mlp_transcode_hooks(layer), layer=layer) for layer in layers]
    return [Target(lm.hook_for(layer, cfg.layer_loc), layer=layer, heads=heads) for layer in layers]


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")[-60:] or "x"


def _hook_slug(target: Target) -> str:
    """A target's part of a store's folder name; hooks joined for a cross-layer dictionary by the layer count, the
    first input hook and a digest of them all (their last 60 characters alone would not tell layer sets apart)."""
    if JOIN not in target.hook:
        return _slug(target.hook + (f"__to__{target.target_hook}" if target.target_hook else ""))
    digest = hashlib.blake2b(f"{target.hook}>{target.target_hook}".encode(), digest_size=4).hexdigest()
    return f"{len(target.hook.split(JOIN))}layers-{_slug(target.hook.split(JOIN)[0])[-40:]}-{digest}"


def activations_folder(cfg: CacheConfig, lm_name: str, target: Target, several: bool) -> Path:
    """Gives a target's store folder: --activations_dir (or a subfolder per hook of it when there are several),
    else one named after what it holds under data/activations/."""
    if cfg.activations_dir:
        return Path(cfg.activations_dir) / _hook_slug(target) if several else Path(cfg.activations_dir)
    shape = f"T{cfg.max_length}_c{cfg.chunk_size_tokens}_{cfg.activation_dtype}_x-{cfg.exclude_tokens}"
    if cfg.model_dtype != "fp32":
        shape += f"_{cfg.model_dtype}"
    parts = [_slug(lm_name), _hook_slug(target), _slug(cfg.dataset_name), _slug(shape)]
    return Path("data/activations") / "__".join(parts)


def store_specs(cfg: CacheConfig, lm: LanguageModel, targets: list[Target]) -> list[StoreSpec]:
    """Gives each target's store: its folder and the manifest fields saying what it holds."""
    hooks = list(dict.fromkeys(h for t in targets for h in (t.hook, t.target_hook) if h))
    widths = {h: a.shape[-1] for h, a in lm.activations(torch.zeros(1, 2, dtype=torch.long), hooks).items()}
    separator = lm.tokenizer.separator(cfg.doc_separator)
    excluded = lm.tokenizer.excluded_ids(cfg.exclude_tokens)
    specs = []
    for t in targets:
        fields = {
            "model": lm.name,
            "model_dtype": cfg.model_dtype,
            "hook_name": t.hook,
            "target_hook": t.target_hook,
            "d": widths[t.hook],
            "d_out": widths[t.target_hook] if t.target_hook else None,
            "dtype": cfg.activation_dtype,
            "context_length": cfg.max_length,
            "tokens_per_chunk": cfg.chunk_size_tokens,
            "dataset": cfg.dataset_name,
            "text_field": cfg.text_field,
            "split": cfg.dataset_split,
            "tokenizer": lm.tokenizer.name,
            "separator": separator[0],
            "excluded_tokens": sorted(excluded.values()),
            "excluded_token_strings": excluded,
            "layer": t.layer,
            **({"layers": list(t.layers)} if t.layers else {}),
            "layer_loc": cfg.layer_loc if t.layer is not None and not t.target_hook else None,
        }
        folder = activations_folder(cfg, lm.name, t, len(targets) > 1)
        specs.append(StoreSpec(folder, fields, t.hook, t.target_hook))
    return specs


def check_disk(cfg: CacheConfig, specs: list[StoreSpec]) -> None:
    """Raises StoreError when the chunks still to be written would not fit on the stores' disk."""
    need = 0
    for s in specs:
        width = s.fields["d"] + (s.fields["d_out"] or 0)
        per_chunk = cfg.chunk_size_tokens * (width * DTYPES[cfg.activation_dtype].itemsize + 5)  # + tokens, kept
        need += (cfg.n_chunks - first_missing_chunk(s.folder, cfg.n_chunks)) * per_chunk
    folder = specs[0].folder
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if need > free:
        raise StoreError(
            f"the activation store needs {need / 2**30:.1f} GiB more in {folder} but its disk has {free / 2**30:.1f} "
            "GiB free; use fewer --n_chunks, a smaller --chunk_size_tokens or another --activations_dir"
        )


def prepare_activations(
    cfg: CacheConfig, lm: LanguageModel, specs: list[StoreSpec], progress: bool
) -> list[ActivationDataset]:
    """Gives the stored activations of every store, computing (or finishing) them from one stream of text and
    one forward pass per model batch."""
    stored = [_complete_store(s, cfg.n_chunks) for s in specs]
    if all(stored):
        for s in specs:
            print(f"reusing stored activations in {s.folder}")
        return stored  # type: ignore[return-value]
    check_disk(cfg, specs)
    docs = iter_documents(cfg.dataset_name, cfg.text_field, cfg.dataset_split, cfg.max_docs)
    separator_id = lm.tokenizer.separator(cfg.doc_separator)[1]
    stream = TokenStream(docs, lm.tokenizer.encode_batch, separator_id, cfg.max_length, cfg.dataset_name)

    def compute(tokens: Tensor) -> dict[str, Tensor]:
        try:
            acts = lm.activations(tokens, [h for s in specs for h in (s.hook, s.target_hook) if h])
        except (ValueError, RuntimeError, IndexError) as e:  # from inside the model: said once, not as a traceback
            raise ModelError(f"the model failed while caching activations: {type(e).__name__}: {e}") from None
        return {h: a.float().cpu() for h, a in acts.items()}

    def text_read() -> dict[str, Any]:
        return {"bytes_per_token": stream.bytes_per_token, "n_docs": stream.n_docs}

    with ExitStack() as held:  # one writer per store: a second process is refused, naming this one
        for s in specs:
            held.enter_context(store_lock(s.folder))
        data = cache_activations(
            specs,
            stream,
            compute,
            cfg.n_chunks,
            cfg.rows_per_chunk,
            cfg.model_batch_size,
            sorted(specs[0].fields["excluded_tokens"]),
            text_read,
            progress,
        )
    for s in specs:
        print(f"activations stored in {s.folder}")
    return data


def _complete_store(spec: StoreSpec, n_chunks: int) -> ActivationDataset | None:
    """Gives the store if it already holds n_chunks complete chunks of what the spec asks for."""
    if not (spec.folder / MANIFEST).is_file():
        return None
    stored = read_json(spec.folder / MANIFEST)
    check_compatible(stored, spec.fields, spec.folder)
    if first_missing_chunk(spec.folder, n_chunks) < n_chunks or int(stored["n_chunks"]) < n_chunks:
        return None
    return ActivationDataset(spec.folder, stored)
