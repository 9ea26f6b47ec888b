"""Text as a stream: every local format, early stops, the rows it packs, and one clear error per bad file."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sparse_coding.data.text import TokenStream, iter_documents
from sparse_coding.errors import DatasetError

DOCS = ["one two", "three", "", "four five six"]


def _encode(texts):
    return [[len(w) for w in t.split()] for t in texts]


def test_every_local_format_gives_the_same_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d, "n": 1}) + "\n" for d in DOCS) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"text": d} for d in DOCS]))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("a whole file", encoding="utf-8")
    kept = [d for d in DOCS if d]
    for name in ("a.jsonl", "b.json", "c.parquet"):
        assert list(iter_documents(str(tmp_path / name))) == kept, name
    assert list(iter_documents(str(tmp_path))) == [*kept, *kept, *kept, "a whole file"]  # a folder, sorted
    assert list(iter_documents(str(tmp_path), max_docs=4)) == [*kept, kept[0]]


def test_rows_are_the_documents_joined_by_the_separator_and_cut(tmp_path):
    stream = TokenStream(["aa b", "ccc", "dddd ee f"], _encode, separator_id=0, max_length=3)
    assert torch.equal(stream.take(2), torch.tensor([[2, 1, 0], [3, 0, 4]]))
    assert torch.equal(stream.take(1), torch.tensor([[2, 1, 0]]))
    assert stream.take(1) is None  # the ragged tail is not a row
    assert (stream.n_docs, stream.n_tokens, stream.n_bytes) == (3, 9, 4 + 3 + 9)
    assert stream.bytes_per_token == pytest.approx(16 / 9)


def test_reading_stops_once_enough_rows_exist():
    pulled = []

    def docs():
        for i in range(100_000):
            pulled.append(i)
            yield "w " * 10

    stream = TokenStream(docs(), _encode, separator_id=0, max_length=8)
    stream.take(4)
    assert len(pulled) <= 256 + 1  # one batch of the tokenizer, not the corpus


def test_a_corpus_without_documents_says_so(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    stream = TokenStream(iter_documents(str(tmp_path / "empty.jsonl")), _encode, 0, 4, name="empty.jsonl")
    with pytest.raises(DatasetError, match="holds no text"):
        stream.take(1)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("latin1.jsonl", json.dumps({"text": "ok"}).encode() + b'\n{"text": "caf\xe9"}\n', "line 2 is not UTF-8"),
        ("latin1.txt", b"caf\xe9", "latin1.txt is not UTF-8"),
        ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
        ("field.jsonl", b'{"body": "ok"}\n', "no text field 'text' \\(fields: body\\)"),
        ("number.jsonl", b'{"text": 3}\n', "is int, not text"),
        ("list.jsonl", b'["text"]\n', "not an object"),
        ("surrogate.jsonl", b'{"text": "\\ud800"}\n', "not valid Unicode"),
        ("array.json", b'[{"text": "a"}, {"text": ', "array.json is not valid JSON"),
        ("bad.parquet", b"not parquet", "cannot read"),
    ],
)
def test_a_bad_file_is_one_error_naming_it(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DatasetError, match=message) as e:
        list(iter_documents(str(tmp_path / name)))
    assert str(tmp_path / name) in str(e.value)


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        iter_documents(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DatasetError, match="not a supported"):
        iter_documents(str(tmp_path / "x.csv"))


def test_the_hub_reader_streams(tmp_path):
    """The hub path (datasets.load_dataset(..., streaming=True)) run on a local data folder, as the hub would
    serve it: records in order, empty ones skipped by iter_documents, a missing field named."""
    from sparse_coding.data.text import _read_hub

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert [d for d in _read_hub(str(tmp_path), "text", "train") if d] == [d for d in DOCS if d]
    with pytest.raises(DatasetError, match="no text field 'body'"):
        next(_read_hub(str(tmp_path), "body", "train"))


def test_a_stream_made_at_its_position_continues_exactly(tmp_path):
    """Wherever a stream stands (mid-document, at a boundary, across tokenizer batches), a new stream over the
    documents from `position`'s document on, starting at its offset, hands out the same rows."""
    rng = torch.Generator().manual_seed(0)
    docs = [" ".join("w" * int(n) for n in torch.randint(1, 5, (int(k),), generator=rng)) for k in
            torch.randint(1, 40, (700,), generator=rng)]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    whole = TokenStream(iter_documents(str(tmp_path / "d.jsonl")), _encode, separator_id=0, max_length=7)
    sizes = torch.randint(1, 60, (40,), generator=rng).tolist()
    for n in sizes:
        doc, offset = whole.position
        resumed = TokenStream(iter_documents(str(tmp_path / "d.jsonl"), skip=doc), _encode, 0, 7, start=(doc, offset))
        a, b = whole.take(n), resumed.take(n)
        if a is None:
            assert b is None
            break
        assert torch.equal(a, b), (doc, offset)
        assert resumed.position == whole.position
    assert whole.position[0] > 256  # the walk crossed tokenizer batches
