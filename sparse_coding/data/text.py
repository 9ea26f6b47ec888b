"""Text in, token rows out, as a stream: documents are read one at a time (hub data sets with
`datasets.load_dataset(..., streaming=True)`, local .jsonl/.json/.txt/.parquet files or folders of them),
tokenized in batches, joined with a separator token and cut into rows of max_length tokens on demand. Memory
holds one batch of documents and the rows asked for, whatever the corpus's size, and reading stops once
enough rows exist. The bytes-per-token ratio of what was read is kept, so losses convert to bits per byte.

Local files must be UTF-8; a file that is not, or a malformed line or record, stops the run with one error
naming the file (and line). A .txt file is one document, read whole; a .json file holding one JSON array is
parsed whole; .jsonl and .parquet files are read record by record.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_coding.errors import DatasetError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
TOKENIZE_BATCH = 256  # documents per call of the (Rust, multi-threaded) batch tokenizer


def local_files(path: Path) -> list[Path]:
    """Gives the readable files at a local path (a file, or a folder searched recursively), sorted."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    bad = [p for p in files if p.suffix not in LOCAL_SUFFIXES]
    if bad:
        raise DatasetError(f"{bad[0]} is not a supported text file (use {', '.join(LOCAL_SUFFIXES)})")
    if not files:
        raise DatasetError(f"no {'/'.join(LOCAL_SUFFIXES)} files under {path}")
    return files


def iter_documents(
    name: str, text_field: str = "text", split: str = "train", max_docs: int = 0, skip: int = 0
) -> Iterator[str]:
    """Yields the non-empty documents of a hub data set (by name) or of local files (by path), in order, at most
    max_docs of them (0: all), after the first `skip` (read and dropped: a resumed stream's way back to its place)."""
    path = Path(name).expanduser()
    if path.exists():
        docs = (doc for f in local_files(path) for doc in _read_file(f, text_field))
    elif name.startswith((".", "/", "~")) or name.endswith(LOCAL_SUFFIXES):
        raise DatasetError(f"dataset {name!r} not found")
    else:
        docs = _read_hub(name, text_field, split)
    docs = (d for d in docs if d)
    return islice(docs, skip, max_docs or None)


def _read_file(f: Path, field: str) -> Iterator[str]:
    if f.suffix == ".txt":
        yield _utf8(f.read_bytes(), str(f))
    elif f.suffix == ".parquet":
        yield from _read_parquet(f, field)
    elif f.suffix == ".json" and _starts_with(f, b"["):
        try:
            records = json.loads(_utf8(f.read_bytes(), str(f)))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{f} is not valid JSON: {e}") from None
        for i, record in enumerate(records):
            yield _text(record, field, f"{f} record {i}")
    else:  # JSON Lines (.jsonl, or a .json file of one object per line)
        with f.open("rb") as lines:
            for n, line in enumerate(lines, 1):
                if line.strip():
                    where = f"{f} line {n}"
                    try:
                        record = json.loads(_utf8(line, where))
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{where} is not valid JSON: {e}") from None
                    yield _text(record, field, where)


def _starts_with(f: Path, prefix: bytes) -> bool:
    with f.open("rb") as fh:
        return fh.read(4096).lstrip().startswith(prefix)


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); re-encode it as UTF-8") from None


def _text(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DatasetError(f"{where} is a JSON {type(record).__name__}, not an object with a {field!r} field")
    if field not in record:
        raise DatasetError(f"{where} has no text field {field!r} (fields: {', '.join(record) or 'none'})")
    value = record[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {field!r} is {type(value).__name__}, not text")
    try:
        value.encode("utf-8")  # JSON escapes can make lone surrogates, which no tokenizer takes
    except UnicodeEncodeError as e:
        raise DatasetError(f"{where}: field {field!r} is not valid Unicode ({e.reason})") from None
    return value


def _read_parquet(f: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
        if field not in pf.schema_arrow.names:
            raise DatasetError(f"{f} has no text field {field!r} (fields: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                yield _text({field: value}, field, str(f))
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"cannot read {f}: {type(e).__name__}: {e}") from None


def _read_hub(name: str, field: str, split: str) -> Iterator[str]:
    import datasets  # slow to import; only needed when a hub data set is read

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
        for record in ds:
            yield _text(record, field, f"dataset {name!r}")
    except DatasetError:
        raise
    except Exception as e:  # the hub, the network or the name: say which data set and why, in one line
        raise DatasetError(f"cannot read dataset {name!r} from the hub: {type(e).__name__}: {e}") from e


class TokenStream:
    """Documents → token ids with the separator after each document → rows of max_length tokens, on demand.

    Tokenizes TOKENIZE_BATCH documents at a time and holds only what is not yet handed out, so memory does not
    grow with the corpus. Counts what it has read: documents, their UTF-8 bytes and the tokens they gave. Knows its
    place (`position`: the document the next id comes from, and how far into its ids), so a stream made from the
    documents after that one (`iter_documents(..., skip=doc)`) with `offset` continues exactly where it stood."""

    def __init__(
        self,
        docs: Iterable[str],
        encode_batch: Callable[[list[str]], Sequence[Sequence[int]]],
        separator_id: int,
        max_length: int,
        name: str = "the text",
        start: tuple[int, int] = (0, 0),
    ):
        """name: the data set's name, for the error when it holds no document at all. start: (document, offset) of
        the first id when docs begin at that document (a resumed stream): its first `offset` ids are dropped."""
        if max_length <= 0:
            raise ValueError("max_length must be positive")
        self._docs, self._encode, self.name = iter(docs), encode_batch, name
        self.separator_id, self.max_length = separator_id, max_length
        self._buffer: list[int] = []
        self._start = start[1]  # ids before it are handed out
        self._doc_starts: list[int] = []  # where each document still in the buffer begins in it
        self._first_doc = start[0]  # the index of the first of them in the whole text
        self.n_docs, self.n_bytes, self.n_tokens, self.n_rows = start[0], 0, 0, 0

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, self.n_tokens)

    @property
    def position(self) -> tuple[int, int]:
        """(document, offset): the next id handed out is the offset-th of that document's ids (separator last)."""
        if not self._doc_starts or self._start >= len(self._buffer):
            return self.n_docs, self._start - len(self._buffer)
        i = bisect_right(self._doc_starts, self._start) - 1
        return self._first_doc + i, self._start - self._doc_starts[i]

    def _read_batch(self) -> bool:
        docs = list(islice(self._docs, TOKENIZE_BATCH))
        if not docs:
            return False
        if self._doc_starts and self._start >= len(self._buffer):  # everything handed out
            self._start -= len(self._buffer)
            self._buffer, self._doc_starts = [], []
        elif self._doc_starts:  # keep the document the next id comes from, and what follows it
            done = bisect_right(self._doc_starts, self._start) - 1
            self._first_doc += done
            drop = self._doc_starts[done]
            del self._buffer[:drop]
            self._doc_starts = [p - drop for p in self._doc_starts[done:]]
            self._start -= drop
        if not self._doc_starts:
            self._first_doc = self.n_docs
        for doc, ids in zip(docs, self._encode(docs), strict=True):
            self._doc_starts.append(len(self._buffer))
            self._buffer.extend(ids)
            self._buffer.append(self.separator_id)
            self.n_tokens += len(ids) + 1
            self.n_bytes += len(doc.encode("utf-8"))
        self.n_docs += len(docs)
        return True

    def take(self, n_rows: int) -> Tensor | None:
        """Gives the next n_rows rows [n_rows, max_length] (int64), or None when the text runs out first."""
        need = n_rows * self.max_length
        while len(self._buffer) - self._start < need:
            if not self._read_batch():
                if self.n_docs == 0:
                    raise DatasetError(f"dataset {self.name!r} holds no text")
                return None
        rows = torch.tensor(self._buffer[self._start : self._start + need], dtype=torch.long)
        self._start += need
        self.n_rows += n_rows
        return rows.view(n_rows, self.max_length)


class TensorRows:
    """Rows already tokenized, [N, T], handed out as a TokenStream hands them (for benches and tests)."""

    def __init__(self, tokens: Tensor):
        self.tokens, self.at = tokens, 0

    def take(self, n_rows: int) -> Tensor | None:
        if self.at + n_rows > len(self.tokens):
            return None
        self.at += n_rows
        return self.tokens[self.at - n_rows : self.at]
