"""The streaming buffer (activations/streaming.py) on text whose every token is distinct, with a stand-in for the
model: each activation is used once per epoch, batches mix contexts, epochs restart after the held-out rows, and a
source restored from any state hands out exactly the batches the original would have."""

from __future__ import annotations

import json

import torch

from sparse_coding.activations.streaming import StreamSource, TextRows
from sparse_coding.data.text import TokenStream, iter_documents
from sparse_coding.training.distributed import DistInfo

T, SEP = 8, 0


def _corpus(tmp_path, n_docs=120):
    """Documents of consecutive numbers: token id = the number, so every token of the text is distinct."""
    g = torch.Generator().manual_seed(0)
    docs, n = [], 1
    for k in torch.randint(3, 30, (n_docs,), generator=g).tolist():
        docs.append(" ".join(str(i) for i in range(n, n + k)))
        n += k
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, n - 1


def _source(path, held_rows=4, refill_rows=10, seed=0):
    def open_at(doc, offset):
        docs = iter_documents(str(path), skip=doc)
        return TokenStream(docs, lambda b: [[int(w) for w in d.split()] for d in b], SEP, T, start=(doc, offset))

    head = open_at(0, 0)
    head.take(held_rows)
    after = head.position

    def compute(tokens):  # a stand-in model: the token id and the position in its row, separators left out
        kept = tokens != SEP
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        return torch.stack([tokens[kept].float(), pos[kept].float()], dim=1)

    text = TextRows(open_at, after, (0, *after))
    return StreamSource(text, compute, refill_rows, model_batch_size=3, seed=seed, info=DistInfo())


def test_each_activation_once_per_epoch_and_epochs_restart_after_the_held_out_rows(tmp_path):
    path, n_tokens = _corpus(tmp_path)
    src = _source(path)
    seen = torch.cat([src.next_batch(16)[:, 0] for _ in range(400)]).long()
    assert src.text.position[0] >= 2  # two epochs and more
    first = seen[: n_tokens // 2]
    assert len(first.unique()) == len(first)  # no activation twice within the first epoch
    head = TokenStream(iter_documents(str(path)), lambda b: [[int(w) for w in d.split()] for d in b], SEP, T)
    held_out = set(head.take(4).flatten().tolist()) - {SEP}
    assert len(held_out) > 3 * T and not held_out & set(seen.tolist())  # the held-out rows never come back
    assert int(seen.max()) <= n_tokens


def test_batches_mix_many_contexts(tmp_path):
    path, _ = _corpus(tmp_path)
    src = _source(path, refill_rows=20)
    batch = src.next_batch(16)[:, 0]
    rows = {int(t) // T for t in batch}  # neighbouring tokens share a row; a shuffled batch spreads over many
    assert len(rows) >= 10


def test_a_source_restored_from_any_state_continues_with_the_same_batches(tmp_path):
    path, _ = _corpus(tmp_path)
    src = _source(path, seed=3)
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        for _ in range(int(torch.randint(1, 12, (), generator=g))):
            src.next_batch(8)
        state = {k: v.clone() for k, v in src.get_state().items()}
        copy = _source(path, seed=3)
        copy.set_state(state)
        for _ in range(15):  # across periods, refills and epoch ends
            assert torch.equal(src.next_batch(8), copy.next_batch(8))
