"""The activation store: equal to the model, resumable, refusing mismatches and damage; special tokens kept out;
several hooks from one pass equal to one hook at a time; transcoder pairs."""

import json

import pytest
import torch
from lm_fixtures import sentences

from sparse_coding.activations.store import ActivationDataset, StoreSpec, cache_activations, chunk_name
from sparse_coding.data.text import TensorRows, TokenStream
from sparse_coding.errors import DatasetError, StoreError
from sparse_coding.models.language_model import load_language_model


def _spec(folder, hook="h", target=None, **fields):
    return StoreSpec(folder, {"dtype": "fp32", **fields}, hook, target)


def _compute(t):
    g = torch.Generator().manual_seed(int(t.sum()))
    return {"h": torch.randn(*t.shape, 4, generator=g) * (1 + t[..., None].float())}


def _cache(folder, tokens, n_chunks, compute=_compute, excluded=(), **fields):
    spec = _spec(folder, **{"model": "m", **fields})
    return cache_activations([spec], TensorRows(tokens), compute, n_chunks, 10, 3, excluded, progress=False)[0]


@pytest.mark.parametrize("family", ["hf", "tl"])
def test_stored_activations_equal_the_model(tmp_path, hf_folder, tl_model, family):
    lm = load_language_model(str(hf_folder), torch.device("cpu")) if family == "hf" else tl_model
    hook = lm.hook_for(1, "mlp")
    stream = TokenStream(sentences(200), lm.tokenizer.encode_batch, lm.tokenizer.separator()[1], 16)
    [data] = cache_activations(
        [_spec(tmp_path, hook)], stream, lambda t: lm.activations(t, [hook]), 2, 8, 3, progress=False
    )
    for i in range(2):
        chunk = data.load_chunk(i)
        direct = lm.activations(chunk.tokens.long(), [hook])[hook].flatten(0, 1)
        assert chunk.kept.all() and torch.allclose(chunk.activations, direct, atol=1e-5)


def test_no_stored_row_comes_from_an_excluded_token(tmp_path, hf_folder):
    lm = load_language_model(str(hf_folder), torch.device("cpu"))
    hook = lm.hook_for(1, "residual")
    excluded = list(lm.tokenizer.excluded_ids("default").values())
    assert excluded  # <|endoftext|>, the separator between the documents
    stream = TokenStream(sentences(200), lm.tokenizer.encode_batch, lm.tokenizer.separator()[1], 16)
    [data] = cache_activations(
        [_spec(tmp_path, hook)], stream, lambda t: lm.activations(t, [hook]), 2, 8, 3, excluded, progress=False
    )
    for i in range(2):
        chunk = data.load_chunk(i)
        special = torch.isin(chunk.tokens.long(), torch.tensor(excluded))
        assert special.any() and torch.equal(chunk.kept, ~special)
        direct = lm.activations(chunk.tokens.long(), [hook])[hook]
        assert torch.allclose(chunk.activations, direct[~special], atol=1e-5)  # the kept positions, in order


def test_several_hooks_in_one_pass_are_byte_identical_to_one_at_a_time(tmp_path, hf_folder):
    lm = load_language_model(str(hf_folder), torch.device("cpu"))
    hooks = [lm.hook_for(0, "mlp"), lm.hook_for(1, "residual"), lm.hook_for(1, "attn")]
    sep = lm.tokenizer.separator()[1]

    def store(folder, hook_list):
        stream = TokenStream(sentences(200), lm.tokenizer.encode_batch, sep, 16)
        specs = [_spec(folder / h, h) for h in hook_list]
        return cache_activations(specs, stream, lambda t: lm.activations(t, hook_list), 3, 8, 3, [sep], progress=False)

    store(tmp_path / "together", hooks)
    for h in hooks:
        store(tmp_path / "alone", [h])
        for i in range(3):
            assert (tmp_path / "together" / h / chunk_name(i)).read_bytes() == (
                tmp_path / "alone" / h / chunk_name(i)
            ).read_bytes(), (h, i)


def test_transcoder_pairs(tmp_path, hf_folder):
    lm = load_language_model(str(hf_folder), torch.device("cpu"))
    x_hook, y_hook = lm.mlp_transcode_hooks(1)
    assert (x_hook, y_hook) == ("h.1.mlp:input", "h.1.mlp")
    stream = TokenStream(sentences(200), lm.tokenizer.encode_batch, lm.tokenizer.separator()[1], 16)
    spec = StoreSpec(tmp_path, {"dtype": "fp32", "d_out": 32}, x_hook, y_hook)
    [data] = cache_activations([spec], stream, lambda t: lm.activations(t, [x_hook, y_hook]), 1, 8, 3, progress=False)
    chunk = data.load_chunk(0)
    mlp = lm.base.h[1].mlp
    with torch.no_grad():
        assert torch.allclose(mlp(chunk.activations), chunk.targets, atol=1e-5)  # targets = the module's output


def test_killed_caching_resumes_to_byte_identical_chunks(tmp_path):
    tokens = torch.randint(0, 50, (40, 8))
    _cache(tmp_path / "a", tokens, 4, excluded=[3], dtype="fp16")
    _cache(tmp_path / "b", tokens, 2, excluded=[3], dtype="fp16")  # "killed" after 2
    (tmp_path / "b" / f".{chunk_name(2)}.tmp123").write_bytes(b"half a chunk")  # what a kill mid-write leaves
    data = _cache(tmp_path / "b", tokens, 4, excluded=[3], dtype="fp16")
    assert data.n_chunks == 4
    for i in range(4):
        assert (tmp_path / "a" / chunk_name(i)).read_bytes() == (tmp_path / "b" / chunk_name(i)).read_bytes()
    assert data.load_chunk(0).activations.dtype == torch.float16
    other = tokens.clone()
    other[0, 0] += 1
    with pytest.raises(StoreError, match="tokenizes differently"):
        _cache(tmp_path / "b", other, 5, excluded=[3], dtype="fp16")


def test_store_refuses_mismatch_nan_and_corruption(tmp_path):
    tokens = torch.randint(0, 50, (20, 8))
    _cache(tmp_path, tokens, 1)
    with pytest.raises(StoreError, match="other settings"):
        _cache(tmp_path, tokens, 2, model="other")
    with pytest.raises(StoreError, match="NaN"):
        _cache(tmp_path, tokens, 2, compute=lambda t: {"h": _compute(t)["h"] * float("nan")})
    assert not (tmp_path / chunk_name(1)).exists()
    assert json.loads((tmp_path / "manifest.json").read_text())["n_chunks"] == 1
    (tmp_path / chunk_name(0)).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="unreadable"):
        ActivationDataset.open(tmp_path).load_chunk(0)
    with pytest.raises(StoreError, match="only 2 chunks"):
        _cache(tmp_path / "x", tokens, 3)


def test_a_deleted_chunk_is_recomputed(tmp_path):
    tokens = torch.randint(0, 50, (40, 8))
    _cache(tmp_path, tokens, 4)
    before = (tmp_path / chunk_name(1)).read_bytes()
    (tmp_path / chunk_name(1)).unlink()  # what the user does after "delete it and rerun"
    data = _cache(tmp_path, tokens, 4)
    assert (tmp_path / chunk_name(1)).read_bytes() == before and data.n_chunks == 4


def test_text_that_cannot_be_read_leaves_no_store_behind(tmp_path):
    class Unreadable:
        def take(self, n_rows):
            raise DatasetError("corpus.jsonl line 1 is not UTF-8 text")

    with pytest.raises(DatasetError, match="not UTF-8"):
        cache_activations([_spec(tmp_path / "store")], Unreadable(), _compute, 2, 10, 3, progress=False)
    assert not (tmp_path / "store").exists()
