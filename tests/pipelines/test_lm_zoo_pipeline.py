"""run.py end to end on what issue 12 added: encoder families (CE null, or masked-token CE with an MLM head),
headless checkpoints, several hooks in one run, a folder of your own activations (and its bad files), and
transcoders on our nanoGPT's MLP that SAELens loads."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_fixtures import make_nanogpt, write_corpus
from model_zoo import save_family

import run

ROOT = Path(__file__).resolve().parents[2]
CE_FIELDS = ("ce_loss_recovered", "kl", "ce_loss_clean", "ce_loss_zero_ablation", "ce_loss_spliced")
QUICK = ["--preset", "smoke", "--n_steps", "10", "--l1_exp_low", "-1", "--checkpoint_every", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _run(model, corpus, out, *extra):
    run.main([*QUICK, "--model_name", str(model), "--dataset_name", str(corpus), "--out", str(out), *extra])
    return json.loads((out / "results.json").read_text())


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("family,with_head", [("bert", False), ("t5", True), ("gpt2", False), ("llama", False)])
def test_no_trained_head_means_no_ce_numbers(tmp_path, corpus, family, with_head):
    """Encoder families (a headless BERT, the encoder of a whole T5) run end to end; a checkpoint saved without
    its LM head (GPT-2's would tie one from its embeddings) never yields CE or KL."""
    model = save_family(tmp_path / family, family, with_head=with_head)
    results = _run(model, corpus, tmp_path / "out", "--activations_dir", str(tmp_path / "acts"))
    assert results["lm_head"] is None and results["lm_head_note"]
    assert results["runs"] and all(r[k] is None for r in results["runs"] for k in CE_FIELDS)
    assert all(r["fvu"] is not None for r in results["runs"])
    assert not (tmp_path / "out" / "ce_loss_recovered_matrix.png").exists()


def test_a_masked_lm_with_its_head_reports_masked_token_ce(tmp_path, corpus):
    model = save_family(tmp_path / "bert", "bert")
    results = _run(model, corpus, tmp_path / "out", "--activations_dir", str(tmp_path / "acts"))
    assert results["lm_head"] == "masked" and results["hook_name"] == "encoder.layer.1.intermediate"
    for r in results["runs"]:
        assert all(isinstance(r[k], float) for k in CE_FIELDS) and r["kl"] >= 0
    manifest = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    assert manifest["separator"] == "[SEP]" and "[CLS]" in manifest["excluded_token_strings"]


def test_several_hooks_in_one_run(tmp_path, corpus):
    model = make_nanogpt(tmp_path / "nano")
    out = tmp_path / "out"
    index = _run(model, corpus, out, "--layers", "0", "1", "--activations_dir", str(tmp_path / "acts"))
    hooks = ["transformer.h.0.mlp.gelu", "transformer.h.1.mlp.gelu"]
    assert index["hooks"] == hooks and set(index["by_hook"]) == set(hooks)
    for hook in hooks:
        entry = index["by_hook"][hook]
        folder = out / entry["folder"]
        assert json.loads((folder / "results.json").read_text())["runs"] == entry["runs"]
        assert entry["hook_name"] == hook and all(r["ce_loss_recovered"] is not None for r in entry["runs"])
        cfg = json.loads((folder / "saes" / entry["runs"][0]["name"] / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == hook
    assert not list(out.glob("**/checkpoint"))
    manifests = [json.loads(p.read_text()) for p in sorted((tmp_path / "acts").glob("*/manifest.json"))]
    assert [(m["hook_name"], m["layer"], m["layer_loc"]) for m in manifests] == [
        (h, i, "mlp") for i, h in enumerate(hooks)
    ]
    # A run stopped after its first hook's sweep (the second hook's folder and the index not yet written)
    # keeps that sweep and does the rest: the same results.
    first = out / index["by_hook"][hooks[0]]["folder"] / "results.json"
    kept = first.read_bytes()
    shutil.rmtree(out / index["by_hook"][hooks[1]]["folder"])
    (out / "results.json").unlink()
    again = _run(model, corpus, out, "--layers", "0", "1", "--activations_dir", str(tmp_path / "acts"))
    assert first.read_bytes() == kept and again["by_hook"] == index["by_hook"]


@pytest.mark.parametrize("skip", [False, True])
def test_a_transcoder_on_the_mlp_loads_in_saelens_and_splices_in(tmp_path, corpus, skip):
    from sae_lens import SAE as SAELensSAE

    from sparse_coding.activations.store import ActivationDataset
    from sparse_coding.saes.saelens import load_sae

    model = make_nanogpt(tmp_path / "nano")
    acts = tmp_path / "acts"
    extra = ["--transcode", "--activations_dir", str(acts), *(["--skip_connection"] if skip else [])]
    results = _run(model, corpus, tmp_path / "out", *extra)
    assert (results["hook_name"], results["target_hook"]) == ("transformer.h.1.mlp:input", "transformer.h.1.mlp")
    for r in results["runs"]:
        assert np.isfinite(r["ce_loss_recovered"]) and np.isfinite(r["kl"]) and r["fvu"] is not None
    chunk = ActivationDataset.open(acts).load_chunk(0)
    x = chunk.activations[:64].float()
    folder = tmp_path / "out" / "saes" / results["runs"][0]["name"]
    ours, cfg = load_sae(folder)
    assert cfg["architecture"] == ("skip_transcoder" if skip else "transcoder")
    assert cfg["metadata"]["hook_name_out"] == "transformer.h.1.mlp"
    theirs = SAELensSAE.load_from_disk(str(folder))
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours.reconstruct(x)[0], atol=1e-5)


def _own_folder(folder, files):
    folder.mkdir()
    for name, array in files.items():
        np.save(folder / name, array)
    return folder


def _listing(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_folder_of_your_own_activations_trains_and_reports(tmp_path):
    rng = np.random.default_rng(0)
    folder = _own_folder(
        tmp_path / "mine", {f"part{i}.npy": rng.standard_normal((700, 8)).astype(np.float32) for i in range(3)}
    )
    np.save(folder / "part0.tokens.npy", np.arange(700))
    before = _listing(folder)
    out = tmp_path / "out"
    run.main(
        [
            *QUICK,
            "--activations_dir",
            str(folder),
            "--chunk_size_tokens",
            "256",
            "--batch_size",
            "64",
            "--out",
            str(out),
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["d_in"] == 8 and results["lm_head"] is None and results["hook_name"] is None
    assert all(r["fvu"] is not None and r["ce_loss_recovered"] is None for r in results["runs"])
    after = _listing(folder)
    assert set(after) == {*before, "manifest.json"} and all(after[k] == v for k, v in before.items())
    manifest = json.loads(after["manifest.json"])
    assert manifest["source"] == "files" and manifest["n_rows"] == 2100 and manifest["n_chunks"] == 9


@pytest.mark.parametrize(
    "files,message",
    [
        ({"a.npy": np.ones((10, 4), np.float32), "b.npy": np.full((10, 4), np.nan, np.float32)}, "b.npy holds NaN"),
        ({"a.npy": np.ones((10, 4), np.float32), "b.npy": np.ones((10, 5), np.float32)}, "b.npy has d=5"),
        ({"a.npy": np.ones((10, 4, 2), np.float32)}, "a.npy holds an array of shape [10, 4, 2]"),
        ({"a.npy": np.ones((0, 4), np.float32)}, "a.npy holds no activations"),
        ({"a.npy": np.ones((10, 4), np.int64)}, "a.npy holds int64 values"),
    ],
)
def test_bad_own_files_give_one_clear_error_and_change_nothing(tmp_path, files, message):
    folder = _own_folder(tmp_path / "mine", files)
    before = _listing(folder)
    r = _cli("--preset", "smoke", "--activations_dir", str(folder), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert _listing(folder) == before
