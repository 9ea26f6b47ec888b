"""Text loading, model hooks and the activation store, on locally made models and text."""

import json
import math

import pytest
import torch
from lm_fixtures import make_hf_gpt2, make_hooked_transformer, sentences

from sparse_coding.activations import ActivationDataset, StoreError, cache_activations, chunk_name
from sparse_coding.lm import ModelError, Tokenizer, TransformerLensModel, load_language_model, next_token_ce
from sparse_coding.text import DatasetError, chunk_and_tokenize, load_texts


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return make_hf_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def tl_model():
    model, tok = make_hooked_transformer()
    return TransformerLensModel(model, Tokenizer.from_hf(tok, "tiny-bpe"), "tiny-tl")


def test_hf_hooks_equal_the_models_own_activations(hf_folder):
    lm = load_language_model(str(hf_folder), torch.device("cpu"))
    assert lm.hook_for(1, "residual") == "transformer.h.1"
    assert lm.hook_for(1, "mlp") == "transformer.h.1.mlp.act"
    assert lm.hook_for(0, "mlp_out") == "transformer.h.0.mlp"
    assert lm.hook_for(0, "attn") == "transformer.h.0.attn"
    tokens = torch.randint(0, 300, (3, 10))
    with torch.no_grad():
        hidden = lm.model(input_ids=tokens, output_hidden_states=True).hidden_states
    assert torch.allclose(lm.activations(tokens, "transformer.h.0"), hidden[1], atol=1e-6)
    assert lm.activations(tokens, "transformer.h.1.mlp.act").shape == (3, 10, 128)
    with pytest.raises(ModelError, match="out of range"):
        lm.hook_for(2, "mlp")
    with pytest.raises(ModelError, match="no module"):
        lm.check_hook("transformer.h.0.nope")


def test_hf_forward_stops_after_the_hook(hf_folder):
    lm = load_language_model(str(hf_folder), torch.device("cpu"))
    ran = []
    handle = lm.model.transformer.h[1].register_forward_hook(lambda *a: ran.append(1))
    lm.activations(torch.zeros(1, 4, dtype=torch.long), "transformer.h.0.mlp.act")
    handle.remove()
    assert ran == []


def test_transformer_lens_hooks(tl_model):
    assert tl_model.hook_for(1, "mlp") == "blocks.1.mlp.hook_post"
    tokens = torch.randint(0, 300, (2, 12))
    _, cache = tl_model.model.run_with_cache(tokens)
    for hook in ("blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.1.hook_attn_out"):
        assert torch.allclose(tl_model.activations(tokens, hook), cache[hook], atol=1e-6)
    with pytest.raises(ModelError, match="no hook"):
        tl_model.check_hook("blocks.0.hook_nope")


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


def test_chunk_and_tokenize_joins_with_eos_and_drops_the_tail():
    encode = lambda texts: [[ord(c) for c in t] for t in texts]  # noqa: E731 - one token per character
    rows = chunk_and_tokenize(["abc", "de", "fghij"], encode, eos_id=0, max_length=4)
    # 13 tokens: abc·de·fghij· → three rows of 4, the last EOS dropped
    assert rows.tokens.tolist() == [[97, 98, 99, 0], [100, 101, 0, 102], [103, 104, 105, 106]]
    assert rows.n_docs == 3 and rows.n_bytes == round(10 * 12 / 13)
    assert rows.bits_per_byte(2.0) == pytest.approx(2.0 / math.log(2) / (rows.n_bytes / 12))
    assert chunk_and_tokenize(["abcdefgh"] * 5, encode, 0, 4, max_rows=2).tokens.shape == (2, 4)
    with pytest.raises(DatasetError, match="fewer than one row"):
        chunk_and_tokenize(["ab"], encode, 0, 8)


@pytest.mark.parametrize("kind", ["jsonl", "json", "txt", "parquet", "folder"])
def test_local_text_files_load(tmp_path, kind):
    docs = ["first doc here", "second doc", "third"]
    if kind == "jsonl":
        (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        path = tmp_path / "d.jsonl"
    elif kind == "json":
        (tmp_path / "d.json").write_text(json.dumps([{"text": d} for d in docs]))
        path = tmp_path / "d.json"
    elif kind == "txt":
        for i, d in enumerate(docs):
            (tmp_path / f"{i}.txt").write_text(d)
        path = tmp_path
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
        path = tmp_path / "d.parquet"
    else:
        (tmp_path / "a.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n")
        (tmp_path / "b.txt").write_text(docs[1])
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "c.txt").write_text(docs[2])
        path = tmp_path
    assert load_texts(str(path)) == docs


def test_text_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_texts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "e.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DatasetError, match="no text field 'text'"):
        load_texts(str(tmp_path / "e.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no"):
        load_texts(str(tmp_path / "empty"))


def test_hub_names_go_through_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": ["hub doc"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_texts("NeelNanda/pile-10k") == ["hub doc"]
    assert calls == [("NeelNanda/pile-10k", "train")]


def test_unreachable_hub_is_one_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    # Offline mode as a user without network gets it, without waiting for connection time-outs.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError, match="cannot load dataset 'nobody/no-such-set' from the hub"):
        load_texts("nobody/no-such-set")


def test_next_token_ce_by_hand():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 100.0  # position 0 predicts token 2 with certainty
    tokens = torch.tensor([[0, 2, 1]])
    # positions 0 → 2 (loss 0), 1 → 1 (uniform: log 4)
    assert next_token_ce(logits, tokens).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() / 2, abs=1e-5)


def test_a_deleted_chunk_is_recomputed(tmp_path):
    tokens = torch.randint(0, 50, (40, 8))
    ident = {"model": "m", "dtype": "fp32"}
    cache_activations(tmp_path, ident, tokens, _compute, 4, 10, 3, progress=False)
    before = (tmp_path / chunk_name(1)).read_bytes()
    (tmp_path / chunk_name(1)).unlink()  # what the user does after "delete it and rerun"
    data = cache_activations(tmp_path, ident, tokens, _compute, 4, 10, 3, progress=False)
    assert (tmp_path / chunk_name(1)).read_bytes() == before and data.n_chunks == 4
