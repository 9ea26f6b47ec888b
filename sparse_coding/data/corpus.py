"""Text corpora for the tiny transformer: documents -> tokenizer -> train/val token files under data/.

A prepared corpus is a folder holding
    train.safetensors, val.safetensors   one tensor "tokens" each (uint16 when the vocabulary fits, else int32),
                                         every document followed by <|endoftext|>
    tokenizer.json                       a Hugging Face `tokenizers` file
    meta.json                            source, vocab_size, eot_token_id, token and document counts

Sources:
- offline default: the reStructuredText sources of the Python documentation, from the Debian package
  python3-doc (PSF licence; ~11 MB of English prose with code examples), with a byte-level BPE trained on it;
- any folder of text files (tests use a generated one);
- online: a hub dataset such as "openwebtext" or "monology/pile-uncopyrighted" through `datasets.load_dataset`,
  tokenized with the GPT-2 tokenizer (needs the Hugging Face hub).
The token files are safetensors written by streaming, so even OpenWebText's 9B tokens never sit in memory, and
`open_tokens` maps them from disk.
"""

from __future__ import annotations

import glob
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sparse_coding.errors import UserError

EOT_TOKEN = "<|endoftext|>"
META_FILE, TOKENIZER_FILE = "meta.json", "tokenizer.json"
SPLITS = ("train", "val")
DEBIAN_PACKAGE = "python3-doc"
DEBIAN_DOCS_GLOB = "/usr/share/doc/python3*/html/_sources"
DEFAULT_CORPUS_DIR = "data/pydocs"
_ST_DTYPES = {np.dtype(np.uint16): "U16", np.dtype(np.int32): "I32"}


def token_path(data_dir: str | Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.safetensors"


# ---- token files: safetensors written by streaming, read by memory map ----


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def write_tokens(path: str | Path, chunks: Iterable[np.ndarray], total: int, dtype: np.dtype) -> Path:
    """Writes the concatenated chunks as the safetensors tensor "tokens" [total], under a temporary name then
    renamed, so a killed preparation never leaves a file that looks whole."""
    path = Path(path)
    header = json.dumps(
        {"tokens": {"dtype": _ST_DTYPES[dtype], "shape": [total], "data_offsets": [0, total * dtype.itemsize]}}
    )
    header += " " * (-len(header) % 8)  # safetensors pads the header so the data is 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    written = 0
    with open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header.encode())
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
            written += len(chunk)
    if written != total:
        tmp.unlink()
        raise RuntimeError(f"wrote {written} tokens to {path}, expected {total}")
    os.replace(tmp, path)
    return path


def open_tokens(path: str | Path) -> np.memmap:
    """Maps the "tokens" tensor of a safetensors file [n_tokens] without reading it into memory."""
    path = Path(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))["tokens"]
    dtype = {v: k for k, v in _ST_DTYPES.items()}[info["dtype"]]
    start = 8 + n + info["data_offsets"][0]
    return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=tuple(info["shape"]))


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """Gives meta.json of a prepared corpus; a UserError says how to prepare one when it is missing."""
    data_dir = Path(data_dir)
    missing = [p.name for p in (data_dir / META_FILE, *(token_path(data_dir, s) for s in SPLITS)) if not p.is_file()]
    if missing:
        raise UserError(
            f"no prepared corpus in {str(data_dir)!r} (missing {', '.join(missing)}); run `make corpus` "
            "or scripts/prepare_corpus.py"
        )
    return json.loads((data_dir / META_FILE).read_text())


# ---- documents ----


def find_text_files(root: str | Path, patterns: Sequence[str] = ("*.txt", "*.md", "*.rst")) -> list[Path]:
    """Gives the text files under root, sorted so that every machine builds the same corpus."""
    root = Path(root)
    return sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file()})


def debian_docs_dir() -> Path:
    """Gives the folder of Python documentation sources that the Debian package python3-doc installs."""
    found = sorted({Path(p).resolve() for p in glob.glob(DEBIAN_DOCS_GLOB)})  # python3/ links to python3.X/
    if not found:
        raise UserError(
            f"the Debian package {DEBIAN_PACKAGE} is not installed (no {DEBIAN_DOCS_GLOB}); run `make corpus` "
            f"or `apt-get install -y {DEBIAN_PACKAGE}`"
        )
    return found[-1]


_RST_ROLE = re.compile(r":[a-z:]+:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")
_RST_LABEL = re.compile(r"^\.\. _[^:]*:\s*$|^\.\. (index|highlight|sectionauthor|versionadded|moduleauthor)::.*$")
_RST_RULE = re.compile(r"^([=*\-~^#+])\1{3,}\s*$")


def clean_rst(text: str) -> str:
    """Gives reStructuredText with the markup a reader does not see removed (roles, labels, heading rules)."""
    lines = []
    for line in text.splitlines():
        if _RST_LABEL.match(line) or _RST_RULE.match(line):
            continue
        lines.append(_RST_ROLE.sub(r"\1", line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def split_documents(names: Sequence[str], val_fraction: float) -> list[str]:
    """Gives "train" or "val" for each document, by a hash of its name: stable, and no document is in both."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    splits = ["val" if zlib.crc32(n.encode()) % 10_000 < val_fraction * 10_000 else "train" for n in names]
    if len(names) >= 2 and "val" not in splits:  # tiny corpora: make sure both splits exist
        splits[-1] = "val"
    if len(names) >= 2 and "train" not in splits:
        splits[0] = "train"
    return splits


# ---- tokenizer ----


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Gives a byte-level BPE `tokenizers.Tokenizer` (GPT-2 style, <|endoftext|> as id 0) trained on texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _encode_all(tokenizer, texts: Sequence[str], eot_id: int, batch: int = 256) -> Iterator[np.ndarray]:
    for i in range(0, len(texts), batch):
        for enc in tokenizer.encode_batch(list(texts[i : i + batch])):  # Rust, all cores
            yield np.asarray([*enc.ids, eot_id], dtype=np.int64)


def _write_splits(
    out_dir: Path, docs: dict[str, list[np.ndarray]], vocab_size: int, meta: dict[str, Any], tokenizer
) -> dict[str, Any]:
    dtype = token_dtype(vocab_size)
    counts = {s: int(sum(len(d) for d in docs[s])) for s in SPLITS}
    for s in SPLITS:
        if counts[s] == 0:
            raise UserError(f"the {s} split is empty: give more documents")
        write_tokens(token_path(out_dir, s), docs[s], counts[s], dtype)
    tokenizer.save(str(out_dir / TOKENIZER_FILE))
    meta = {
        **meta,
        "vocab_size": vocab_size,
        "eot_token_id": int(tokenizer.token_to_id(EOT_TOKEN)),
        "dtype": dtype.name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "train_documents": len(docs["train"]),
        "val_documents": len(docs["val"]),
        "tokenizer": TOKENIZER_FILE,
    }
    return _write_meta(out_dir, meta)


def _write_jsonl(path: Path, texts: Sequence[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    os.replace(tmp, path)


def _write_meta(out_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    tmp = out_dir / f".{META_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out_dir / META_FILE)  # last: a folder with meta.json is complete
    return meta


def prepare_text_corpus(
    files: Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    source: str = "",
    rst: bool = False,
) -> dict[str, Any]:
    """Splits text files into train/val documents, trains a byte-level BPE on train, writes the token files.

    Gives meta.json's contents. `rst=True` strips reStructuredText markup first.
    """
    if not files:
        raise UserError(f"no text files found for the corpus {source!r}")
    if vocab_size < 257 + 1:
        raise UserError(f"vocab_size must be at least 258 (256 bytes + <|endoftext|> + one merge), got {vocab_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(f) for f in files]
    root = Path(os.path.commonpath([str(p.resolve()) for p in paths])) if len(paths) > 1 else paths[0].parent
    names = [str(p.resolve().relative_to(root.resolve())) for p in paths]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in tqdm(paths, desc="reading", leave=False)]
    if rst:
        texts = [clean_rst(t) for t in texts]
    splits = split_documents(names, val_fraction)
    by_split = {s: [t for t, sp in zip(texts, splits, strict=True) if sp == s and t.strip()] for s in SPLITS}
    print(f"training a {vocab_size}-token byte-level BPE on {len(by_split['train'])} documents")
    tokenizer = train_bpe_tokenizer(by_split["train"], vocab_size)
    eot_id = tokenizer.token_to_id(EOT_TOKEN)
    docs = {s: list(_encode_all(tokenizer, by_split[s], eot_id)) for s in SPLITS}
    for s in SPLITS:  # the cleaned text too, one JSON document a line: run.py's offline default data set
        _write_jsonl(out_dir / f"{s}.jsonl", by_split[s])
    meta = {"source": source or str(root), "tokenizer_kind": "byte-level BPE trained on the train split"}
    return _write_splits(out_dir, docs, tokenizer.get_vocab_size(), meta, tokenizer)


def prepare_debian_corpus(out_dir: str | Path, vocab_size: int = 4096, val_fraction: float = 0.05) -> dict[str, Any]:
    """The offline default: the Python documentation sources from the Debian package python3-doc."""
    docs_dir = debian_docs_dir()
    files = find_text_files(docs_dir, ("*.txt",))
    return prepare_text_corpus(
        files, out_dir, vocab_size, val_fraction, source=f"debian:{DEBIAN_PACKAGE} ({docs_dir})", rst=True
    )


def prepare_hub_corpus(
    dataset: str = "openwebtext",
    out_dir: str | Path = "data/openwebtext",
    tokenizer_name: str = "gpt2",
    val_fraction: float = 0.0005,
    num_proc: int = 8,
    max_documents: int = 0,
    text_field: str = "text",
) -> dict[str, Any]:
    """Tokenizes a hub dataset (e.g. "openwebtext", "monology/pile-uncopyrighted") with a hub tokenizer (GPT-2).

    As nanoGPT's openwebtext/prepare.py: split off a small validation set, tokenize with the tokenizer's
    end-of-text token after every document, stream into the token files. `max_documents` > 0 streams only the
    first documents instead of downloading everything (the Pile is 800 GB).
    """
    from datasets import Dataset, load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    eot_id = tokenizer.eos_token_id
    if eot_id is None:
        raise UserError(f"tokenizer {tokenizer_name!r} has no end-of-text token")
    if max_documents > 0:
        stream = load_dataset(dataset, split="train", streaming=True)
        ds = Dataset.from_list([{text_field: r[text_field]} for r in stream.take(max_documents)])
    else:
        ds = load_dataset(dataset, split="train", num_proc=num_proc)
    split = ds.train_test_split(test_size=val_fraction, seed=2357, shuffle=True)
    split["val"] = split.pop("test")

    def encode(batch: dict[str, list[str]]) -> dict[str, list]:
        ids = [[*x, eot_id] for x in tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]]
        return {"ids": ids, "len": [len(x) for x in ids]}

    tokenized = split.map(
        encode, batched=True, remove_columns=split["train"].column_names, num_proc=min(num_proc, len(ds)) or None
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    meta: dict[str, Any] = {"source": f"hub:{dataset}", "tokenizer_kind": f"hub:{tokenizer_name}"}
    for s in SPLITS:
        part = tokenized[s]
        total = int(np.sum(part["len"], dtype=np.int64))
        n_shards = max(1, len(part) // 4096)
        shards = (
            np.concatenate(part.shard(num_shards=n_shards, index=i, contiguous=True).with_format("numpy")["ids"])
            for i in range(n_shards)
        )
        write_tokens(token_path(out_dir, s), tqdm(shards, desc=f"writing {s}"), total, dtype)
        meta[f"{s}_tokens"], meta[f"{s}_documents"] = total, len(part)
    tokenizer.backend_tokenizer.save(str(out_dir / TOKENIZER_FILE))
    meta.update(vocab_size=vocab_size, eot_token_id=int(eot_id), dtype=dtype.name, tokenizer=TOKENIZER_FILE)
    return _write_meta(out_dir, meta)
