"""run.py end to end on a locally made GPT-2 and text: the DESIGN.md contract, reuse, resume, clear failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_fixtures import smoke_run_args
from procs import in_process, kill_after_checkpoint

import run
from sparse_coding.eval.reconstruction import ce_and_kl
from sparse_coding.models.language_model import load_language_model

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = {
    "arch",
    "l1_alpha",
    "dict_size",
    "l0",
    "fvu",
    "dead_features",
    "mmcs_with_larger",
    "ce_loss_recovered",
    "kl",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"args": smoke_run_args(root), "model": str(root / "gpt2"), "root": root}


def _args(assets, out, *extra):
    return [*assets["args"], "--out", str(out), *extra]


def _main(capsys, *args):
    return in_process(capsys, run.main, *args)


def test_smoke_run_writes_the_contract_and_reuses_activations(assets, tmp_path, capsys):
    run.main(_args(assets, tmp_path / "a"))
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == 5 * 2
    largest = max(r["dict_size"] for r in runs)
    for r in runs:
        assert r.keys() >= CONTRACT
        assert (r["mmcs_with_larger"] is None) == (r["dict_size"] == largest)
        assert r["ce_loss_recovered"] is not None and r["kl"] >= 0
        assert r["ce_loss_zero_ablation"] > r["ce_loss_clean"]
    assert results["hook_name"] == "h.1.mlp.act" and results["d_in"] == 128 and results["lm_head"] == "causal"
    for name in (
        "mmcs_with_larger_matrix.png",
        "dead_features_matrix.png",
        "fvu_matrix.png",
        "ce_loss_recovered_matrix.png",
        "feature_density_d128.png",
    ):
        assert (tmp_path / "a" / name).is_file(), name
    assert len(list((tmp_path / "a" / "saes").iterdir())) == len(runs)
    cfg = json.loads((tmp_path / "a" / "saes" / runs[0]["name"] / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "h.1.mlp.act" and cfg["metadata"]["context_size"] == 16
    capsys.readouterr()
    run.main(_args(assets, tmp_path / "b", "--arch", "topk"))
    assert "reusing stored activations" in capsys.readouterr().out
    topk = json.loads((tmp_path / "b" / "results.json").read_text())["runs"]
    assert {r["k"] for r in topk} == {2, 4} and all(r["l0"] <= r["k"] + 1e-6 for r in topk)


def test_ce_loss_recovered_is_one_for_perfect_and_zero_for_ablation(assets):
    lm = load_language_model(assets["model"], torch.device("cpu"))
    hook = lm.hook_for(0, "mlp")
    tokens = torch.randint(0, 300, (4, 12))

    class Reconstruction:  # a stack of two "SAEs": one reconstructs exactly, one outputs zeros
        n_models, d_sae = 2, 8

        def reconstruct(self, x):
            return torch.stack([x[0], torch.zeros_like(x[1])])

    out = ce_and_kl(lm, hook, Reconstruction(), tokens)
    assert out["ce_loss_recovered"][0].item() == pytest.approx(1.0, abs=1e-5)
    assert out["ce_loss_recovered"][1].item() == pytest.approx(0.0, abs=1e-5)
    assert out["kl"][0].item() == pytest.approx(0.0, abs=1e-6) and out["kl"][1] > 0


def test_killed_sweep_resumes_to_the_same_saes(assets, tmp_path, capsys):
    """Only the killed run needs a process of its own; the others run here (an interpreter's start-up each)."""
    args = ["--n_steps", "300", "--checkpoint_every", "20"]
    assert _main(capsys, *_args(assets, tmp_path / "unbroken", *args)).returncode == 0
    killed = tmp_path / "killed"
    kill_after_checkpoint(
        [sys.executable, str(ROOT / "run.py"), *_args(assets, killed, *args)], killed, ROOT, grace=0.3
    )
    r = _main(capsys, *_args(assets, killed, *args))
    assert r.returncode == 0, r.stderr
    for sae in (tmp_path / "unbroken" / "saes").iterdir():
        a = (sae / "sae_weights.safetensors").read_bytes()
        assert a == (killed / "saes" / sae.name / "sae_weights.safetensors").read_bytes(), sae.name


def test_continue_from_saved_saes(assets, tmp_path, capsys):
    run.main(_args(assets, tmp_path / "first", "--n_steps", "5"))
    run.main(_args(assets, tmp_path / "second", "--n_steps", "5", "--load_autoencoders", str(tmp_path / "first")))
    r = _main(capsys, *_args(assets, tmp_path / "third", "--l1_exp_base", "3", "--l1_exp_high", "-1",
                             "--load_autoencoders", str(tmp_path / "first")))  # fmt: skip
    assert r.returncode == 2 and "no SAE" in r.stderr


def test_wandb_offline_logs_and_keeps_the_key_out(assets, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": "secret-key-0123456789abcdef0123456789abcdef01"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *_args(assets, tmp_path / "w", "--use_wandb", "--n_steps", "20")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    for f in (tmp_path / "w").rglob("*"):
        if f.is_file():
            assert b"secret-key-0123" not in f.read_bytes(), f


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model_name", "./no/such/model"], "not found"),
        (["--hook_name", "transformer.h.0.nope"], "has no module"),
        (["--layer", "7"], "out of range"),
        (["--dataset_name", "./missing.jsonl"], "not found"),
        (["--chunk_size_tokens", "100"], "multiple of max_length"),
        (["--n_chunks", "500"], "chunks"),
        (["--layer_loc", "embed"], "layer_loc must be one of"),
        (["--max_length", "128"], "longer than"),
        (["--batch_size", "4096"], "smallest chunk group"),
    ],
)
def test_bad_input_gives_one_clear_message(assets, tmp_path, extra, message, capsys):
    r = _main(capsys, *_args(assets, tmp_path / "run", "--activations_dir", str(tmp_path / "acts"), *extra))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_empty_dataset_manifest_mismatch_and_corrupt_chunk(assets, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    r = _main(
        capsys,
        *_args(
            assets,
            tmp_path / "r1",
            "--dataset_name",
            str(tmp_path / "empty.jsonl"),
            "--activations_dir",
            str(tmp_path / "acts_empty"),
        ),
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    acts = tmp_path / "acts"
    assert (
        _main(capsys, *_args(assets, tmp_path / "r2", "--activations_dir", str(acts), "--n_steps", "2")).returncode == 0
    )
    r = _main(capsys, *_args(assets, tmp_path / "r3", "--activations_dir", str(acts), "--activation_dtype", "fp16"))
    assert r.returncode == 2 and "other settings" in r.stderr
    before = (acts / "chunk_00000.safetensors").read_bytes()
    (acts / "chunk_00002.safetensors").write_bytes(b"\x00" * 16)
    r = _main(capsys, *_args(assets, tmp_path / "r4", "--activations_dir", str(acts)))
    assert r.returncode == 2 and "unreadable" in r.stderr
    assert (acts / "chunk_00000.safetensors").read_bytes() == before  # the other chunks are untouched
    assert (tmp_path / "r2" / "results.json").is_file()
