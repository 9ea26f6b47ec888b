"""The activation store: equal to the model, resumable, refusing mismatches and damage."""

import json

import pytest
import torch
from lm_fixtures import sentences

from sparse_coding.activations.store import ActivationDataset, cache_activations, chunk_name
from sparse_coding.data.text import chunk_and_tokenize
from sparse_coding.errors import StoreError
from sparse_coding.models.language_model import (
    load_language_model,
)


@pytest.mark.parametrize("family", ["hf", "tl"])
def test_stored_activations_equal_the_model(tmp_path, hf_folder, tl_model, family):
    lm = load_language_model(str(hf_folder), torch.device("cpu")) if family == "hf" else tl_model
    hook = lm.hook_for(1, "mlp")
    rows = chunk_and_tokenize(sentences(200), lm.tokenizer.encode_batch, lm.tokenizer.eos_id, 16)
    data = cache_activations(
        tmp_path, {"dtype": "fp32"}, rows.tokens, lambda t: lm.activations(t, hook), 2, 8, 3, progress=False
    )
    for i in range(2):
        acts, tokens = data.load_chunk(i)
        assert torch.equal(tokens.long(), rows.tokens[i * 8 : (i + 1) * 8])
        direct = lm.activations(tokens.long(), hook).flatten(0, 1)
        assert torch.allclose(acts, direct, atol=1e-5)


def _compute(t):
    g = torch.Generator().manual_seed(int(t.sum()))
    return torch.randn(*t.shape, 4, generator=g) * (1 + t[..., None].float())


def test_killed_caching_resumes_to_byte_identical_chunks(tmp_path):
    tokens = torch.randint(0, 50, (40, 8))
    ident = {"model": "m", "dtype": "fp16"}
    cache_activations(tmp_path / "a", ident, tokens, _compute, 4, 10, 3, progress=False)
    cache_activations(tmp_path / "b", ident, tokens, _compute, 2, 10, 3, progress=False)  # "killed" after 2
    (tmp_path / "b" / f".{chunk_name(2)}.tmp123").write_bytes(b"half a chunk")  # what a kill mid-write leaves
    data = cache_activations(tmp_path / "b", ident, tokens, _compute, 4, 10, 3, progress=False)
    assert data.n_chunks == 4
    for i in range(4):
        assert (tmp_path / "a" / chunk_name(i)).read_bytes() == (tmp_path / "b" / chunk_name(i)).read_bytes()
    assert data.load_chunk(0)[0].dtype == torch.float16


def test_store_refuses_mismatch_nan_and_corruption(tmp_path):
    tokens = torch.randint(0, 50, (20, 8))
    cache_activations(tmp_path, {"model": "m", "dtype": "fp32"}, tokens, _compute, 1, 10, 5, progress=False)
    with pytest.raises(StoreError, match="other settings"):
        cache_activations(tmp_path, {"model": "other", "dtype": "fp32"}, tokens, _compute, 2, 10, 5, progress=False)
    with pytest.raises(StoreError, match="NaN"):
        cache_activations(
            tmp_path,
            {"model": "m", "dtype": "fp32"},
            tokens,
            lambda t: _compute(t) * float("nan"),
            2,
            10,
            5,
            progress=False,
        )
    assert not (tmp_path / chunk_name(1)).exists()
    assert json.loads((tmp_path / "manifest.json").read_text())["n_chunks"] == 1
    (tmp_path / chunk_name(0)).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="unreadable"):
        ActivationDataset.open(tmp_path).load_chunk(0)
    with pytest.raises(StoreError, match="chunks"):
        cache_activations(tmp_path / "x", {"dtype": "fp32"}, tokens, _compute, 3, 10, 5, progress=False)


def test_a_deleted_chunk_is_recomputed(tmp_path):
    tokens = torch.randint(0, 50, (40, 8))
    ident = {"model": "m", "dtype": "fp32"}
    cache_activations(tmp_path, ident, tokens, _compute, 4, 10, 3, progress=False)
    before = (tmp_path / chunk_name(1)).read_bytes()
    (tmp_path / chunk_name(1)).unlink()  # what the user does after "delete it and rerun"
    data = cache_activations(tmp_path, ident, tokens, _compute, 4, 10, 3, progress=False)
    assert (tmp_path / chunk_name(1)).read_bytes() == before and data.n_chunks == 4
