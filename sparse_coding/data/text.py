"""Text in, token rows out: hub data sets through `datasets.load_dataset`, local .jsonl/.json/.txt/.parquet files
or folders of them, GPT-style chunk-and-tokenize (documents joined by EOS, cut into fixed rows, ragged tail
dropped), with the bytes-per-token ratio kept so losses convert to bits per byte."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sparse_coding.errors import DatasetError

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def local_files(path: Path) -> list[Path]:
    """Gives the readable files at a local path (a file, or a folder searched recursively), sorted."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    bad = [p for p in files if p.suffix not in LOCAL_SUFFIXES]
    if bad:
        raise DatasetError(f"{bad[0]} is not a supported text file (use {', '.join(sorted(LOCAL_SUFFIXES))})")
    if not files:
        raise DatasetError(f"no {'/'.join(sorted(LOCAL_SUFFIXES))} files under {path}")
    return files


def load_texts(name: str, text_field: str = "text", split: str = "train", max_docs: int = 0) -> list[str]:
    """Gives the documents of a hub data set (by name) or of local files (by path), in order."""
    import datasets  # slow to import; only needed when text is actually read

    path = Path(name).expanduser()
    if path.exists():
        texts: list[str] = []
        for f in local_files(path):
            if f.suffix == ".txt":  # one document per file
                texts.append(f.read_text(encoding="utf-8", errors="replace"))
                continue
            if f.stat().st_size == 0:
                continue
            try:
                ds = datasets.load_dataset(LOCAL_SUFFIXES[f.suffix], data_files=str(f), split="train")
                texts.extend(_column(ds, text_field, str(f)))  # text is decoded here: bad UTF-8 surfaces now
            except DatasetError:
                raise
            except Exception as e:  # malformed JSON/parquet or bad UTF-8 surface as many exception types
                raise DatasetError(f"cannot read {f}: {type(e).__name__}: {e}") from None
    elif name.startswith((".", "/", "~")) or name.endswith(tuple(LOCAL_SUFFIXES)):
        raise DatasetError(f"dataset {name!r} not found")
    else:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # the hub, the network or the name: say which data set and why, in one line
            raise DatasetError(f"cannot load dataset {name!r} from the hub: {type(e).__name__}: {e}") from e
        texts = _column(ds, text_field, name)
    texts = [t for t in texts if t]
    if max_docs:
        texts = texts[:max_docs]
    if not texts:
        raise DatasetError(f"dataset {name!r} holds no text")
    return texts


def _column(ds: object, field: str, where: str) -> list[str]:
    names = getattr(ds, "column_names", [])
    if field not in names:
        raise DatasetError(f"{where} has no text field {field!r} (fields: {', '.join(names) or 'none'})")
    return [str(t) for t in ds[field]]  # type: ignore[index]


@dataclass
class TokenRows:
    tokens: Tensor  # [n_rows, max_length] int64
    n_bytes: int  # UTF-8 bytes of the text the kept rows came from (pro rata for the dropped tail)
    n_docs: int

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, self.tokens.numel())

    def bits_per_byte(self, loss_nats_per_token: float) -> float:
        """Converts a loss in nats per token to bits per byte of the underlying text."""
        return loss_nats_per_token / math.log(2) / self.bytes_per_token


def chunk_and_tokenize(
    texts: Sequence[str],
    encode_batch: Callable[[list[str]], Iterable[Sequence[int]]],
    eos_id: int,
    max_length: int,
    max_rows: int = 0,
) -> TokenRows:
    """Joins the documents with EOS between them and cuts the stream into rows of max_length tokens
    (the ragged tail is dropped); stops once max_rows rows exist when max_rows > 0."""
    if max_length <= 0:
        raise ValueError("max_length must be positive")
    stream: list[int] = []
    n_bytes = n_docs = 0
    batch = 256
    for start in range(0, len(texts), batch):
        docs = list(texts[start : start + batch])
        for doc, ids in zip(docs, encode_batch(docs), strict=True):
            stream.extend(ids)
            stream.append(eos_id)
            n_bytes += len(doc.encode("utf-8"))
            n_docs += 1
        if max_rows and len(stream) >= max_rows * max_length:
            break
    n_rows = len(stream) // max_length
    if max_rows:
        n_rows = min(n_rows, max_rows)
    if n_rows == 0:
        raise DatasetError(f"the text gives {len(stream)} tokens, fewer than one row of max_length={max_length}")
    kept = n_rows * max_length
    tokens = torch.tensor(stream[:kept], dtype=torch.long).view(n_rows, max_length)
    return TokenRows(tokens=tokens, n_bytes=round(n_bytes * kept / len(stream)), n_docs=n_docs)
