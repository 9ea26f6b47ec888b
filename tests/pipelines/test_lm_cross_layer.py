"""Dictionaries across layers on a language model. Cross-layer transcoders (run.py --arch clt*): per-layer metrics,
CE recovered with every MLP replaced at once (checked against a replacement spliced by hand into the HF model from
the saved circuit-tracer files), evaluate.py agreeing with run.py, interpret.py's logit effects, streaming, and
latent sharding. Crosscoders (--arch crosscoder): the same, every layer's residual replaced at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_fixtures import make_hf_gpt2, smoke_run_args
from procs import one_thread
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

import evaluate
import interpret
import run
from sparse_coding.eval.reconstruction import ce_and_kl
from sparse_coding.models.language_model import load_language_model
from sparse_coding.saes.saelens import load_sae

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("clt")
    args = smoke_run_args(root)
    run.main([*args, "--out", str(root / "run"), "--arch", "clt_jumprelu", "--n_steps", "30",
              "--l1_exp_low", "-3", "--l1_exp_high", "-2"])  # fmt: skip
    return root, args


def _runs(folder: Path) -> list[dict]:
    return json.loads((folder / "results.json").read_text())["runs"]


def test_one_sweep_over_every_layer_with_metrics_per_layer(clt_run):
    root, _ = clt_run
    results = json.loads((root / "run" / "results.json").read_text())
    assert results["layers"] == [0, 1] and "by_hook" not in results  # one dictionary over both layers
    assert results["hook_name"] == "h.0.mlp:input+h.1.mlp:input" and results["target_hook"] == "h.0.mlp+h.1.mlp"
    for row in results["runs"]:
        assert len(row["fvu_by_layer"]) == 2 and all(v > 0 for v in row["fvu_by_layer"])
        assert sum(row["l0_by_layer"]) == pytest.approx(row["l0"], rel=1e-4)  # each layer's latents, all of them
        assert row["ce_loss_spliced"] is not None and row["kl"] >= 0
        names = {p.name for p in (root / "run" / "saes" / row["name"]).iterdir()}
        assert {"W_enc_0.safetensors", "W_enc_1.safetensors", "W_dec_0.safetensors", "W_dec_1.safetensors"} <= names


def _next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean next-token cross-entropy over every position but the last."""
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()))


def _hand_spliced_ce(model: GPT2LMHeadModel, sae_dir: Path, tokens: torch.Tensor) -> float:
    """Mean next-token CE of the HF model with each block's MLP output swapped for the CLT's, computed from the
    saved circuit-tracer files alone: a_i = JumpReLU(W_enc_i x_i + b_enc_i), y_j = Σ_{i≤j} a_i W_dec_i[:, j−i]
    + b_dec_j, where x_i is block i's MLP input in this very pass (earlier blocks already replaced)."""
    n_layers = len(model.transformer.h)
    enc = [load_file(sae_dir / f"W_enc_{i}.safetensors") for i in range(n_layers)]
    dec = [load_file(sae_dir / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(n_layers)]
    codes: list[torch.Tensor] = []
    handles = []
    for j, block in enumerate(model.transformer.h):

        def read(_mod, args, j=j):
            e = enc[j]
            pre = args[0] @ e[f"W_enc_{j}"].T + e[f"b_enc_{j}"]
            codes.append(pre * (pre > e[f"threshold_{j}"]))

        def write(_mod, _args, _out, j=j):
            return sum(codes[i] @ dec[i][:, j - i] for i in range(j + 1)) + enc[j][f"b_dec_{j}"]

        handles += [block.mlp.register_forward_pre_hook(read), block.mlp.register_forward_hook(write)]
    try:
        logits = model(tokens).logits
    finally:
        for h in handles:
            h.remove()
    return _next_token_ce(logits, tokens)


@torch.no_grad()
def test_ce_recovered_replaces_every_layer_as_a_hand_spliced_model_does(clt_run):
    root, _ = clt_run
    sae_dir = root / "run" / "saes" / _runs(root / "run")[0]["name"]
    sae, cfg = load_sae(sae_dir)
    meta = cfg["metadata"]
    tokens = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    lm = load_language_model(str(root / "gpt2"), torch.device("cpu"))
    ours = ce_and_kl(lm, meta["hook_name_out"], sae, tokens, source=meta["hook_name"])
    model = GPT2LMHeadModel.from_pretrained(root / "gpt2").eval()
    assert float(ours["ce_sae"][0]) == pytest.approx(_hand_spliced_ce(model, sae_dir, tokens), rel=1e-5)
    clean = _next_token_ce(model(tokens).logits, tokens)
    assert float(ours["ce_clean"][0]) == pytest.approx(clean, rel=1e-5)


def _assert_evaluate_py_agrees(run_dir: Path, row: dict, out: Path) -> None:
    """evaluate.py on the row's SAE, on the held-out rows run.py scored, gives run.py's core metrics."""
    ce_rows = json.loads((run_dir / "config.json").read_text())["ce_eval_rows"]
    evaluate.main(["--sae_dir", str(run_dir / "saes" / row["name"]), "--out", str(out), "--ce_eval_rows",
                   str(ce_rows)])  # fmt: skip
    ours = json.loads((out / "eval.json").read_text())["saes"][row["name"]]["metrics"]
    for cat, values in row["core"].items():
        for key, v in values.items():
            assert ours[cat][key] == pytest.approx(v, rel=1e-5, abs=1e-6), (cat, key)


def test_evaluate_py_scores_a_clt_as_run_py_did(clt_run, tmp_path):
    root, _ = clt_run
    _assert_evaluate_py_agrees(root / "run", _runs(root / "run")[0], tmp_path / "e")


def test_interpret_gives_a_clt_latent_the_logits_of_its_summed_decoders(clt_run, tmp_path):
    root, _ = clt_run
    interpret.main(["--run_dir", str(root / "run"), "--n_features", "2", "--max_rows", "32", "--baselines", "random",
                    "--out", str(tmp_path / "i")])  # fmt: skip
    feature = json.loads(next((tmp_path / "i" / "features").glob("sae_*.json")).read_text())
    assert len(feature["top_logits"]) == 10 and feature["logits_note"] is None


def test_a_streamed_normalised_batchtopk_clt(clt_run, tmp_path):
    """Streamed, and trained on scaled activations: the saved CLT has the scale folded into its biases and
    thresholds (it failed to fold once: a CLT has no single W_dec)."""
    _, args = clt_run
    i = args.index("--activations_dir")
    run.main([*args[:i], *args[i + 2 :], "--out", str(tmp_path / "s"), "--activations", "stream", "--buffer_tokens",
              "4096", "--arch", "clt_batchtopk", "--n_steps", "20", "--normalize_activations"])  # fmt: skip
    for row in _runs(tmp_path / "s"):
        assert row["fvu"] is not None and row["ce_loss_recovered"] is not None and len(row["l0_by_layer"]) == 2
        assert 0 < row["l0"] < 4 * row["k"]  # held out, through the learned thresholds (k per layer on average)


@pytest.mark.parametrize("arch", ["clt", "crosscoder"])
def test_trains_on_two_latent_shards_as_in_one_process(clt_run, tmp_path, arch):
    """The latents (a CLT's: every layer's) split over 2 gloo processes: the same weights as one process."""
    root, args = clt_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["--arch", arch, "--n_steps", "15", "--dict_ratio_exp_high", "0", "--log_every", "5"]
    if arch == "crosscoder":
        i = args.index("--activations_dir")
        args = [*args[:i], "--activations_dir", str(root / "cc_shard_acts"), "--layer_loc", "residual"]
    with one_thread():  # the one-process run here, on one thread as torchrun gives each rank
        run.main([*args, "--out", str(tmp_path / "one"), *extra])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run([*launcher, str(ROOT / "run.py"), *args, "--out", str(tmp_path / "two"), *extra, "--parallel",
                          "latents"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "latents split over 2 processes" in two.stdout
    for ra, rb in zip(_runs(tmp_path / "one"), _runs(tmp_path / "two"), strict=True):
        assert ra["fvu_by_layer"] == pytest.approx(rb["fvu_by_layer"], rel=1e-4)
        a, b = (tmp_path / d / "saes" / ra["name"] for d in ("one", "two"))
        for f in sorted(p.name for p in a.glob("*.safetensors") if p.name != "sparsity.safetensors"):
            wa, wb = load_file(a / f), load_file(b / f)
            for k in wa:
                assert torch.allclose(wa[k], wb[k], atol=1e-5), (f, k)


@pytest.fixture(scope="module")
def crosscoder_run(clt_run):
    root, args = clt_run
    i = args.index("--activations_dir")
    run.main([*args[:i], "--activations_dir", str(root / "cc_acts"), "--out", str(root / "cc"), "--arch", "crosscoder",
              "--layer_loc", "residual", "--n_steps", "30", "--l1_exp_low", "-2", "--l1_exp_high", "-1"])  # fmt: skip
    return root


def test_a_crosscoder_reads_every_layer_at_once(crosscoder_run, tmp_path):
    root = crosscoder_run
    results = json.loads((root / "cc" / "results.json").read_text())
    assert results["hook_name"] == "h.0+h.1" and results["target_hook"] is None and results["layers"] == [0, 1]
    for row in results["runs"]:
        assert len(row["fvu_by_layer"]) == 2 and "l0_by_layer" not in row  # shared latents: no layer of their own
    _assert_evaluate_py_agrees(root / "cc", results["runs"][0], tmp_path / "e")
    interpret.main(["--run_dir", str(root / "cc"), "--n_features", "2", "--max_rows", "32", "--baselines", "random",
                    "--out", str(tmp_path / "i")])  # fmt: skip
    feature = json.loads(next((tmp_path / "i" / "features").glob("sae_*.json")).read_text())
    assert len(feature["top_logits"]) == 10


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def test_crosscoder_ce_replaces_every_layer_with_its_reconstruction_of_the_clean_pass(crosscoder_run):
    root = crosscoder_run
    sae_dir = root / "cc" / "saes" / _runs(root / "cc")[0]["name"]
    sae, cfg = load_sae(sae_dir)
    tokens = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    lm = load_language_model(str(root / "gpt2"), torch.device("cpu"))
    ours = ce_and_kl(lm, cfg["metadata"]["hook_name"], sae, tokens)

    model = GPT2LMHeadModel.from_pretrained(root / "gpt2").eval()
    blocks = model.transformer.h
    clean: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _a, out: clean.append(_hidden(out))) for b in blocks]
    model(tokens)
    for h in handles:
        h.remove()
    w = load_file(sae_dir / "sae_weights.safetensors")  # SAELens layout: W_enc [d_in, d_sae], W_dec [d_sae, d_in]
    x = torch.cat(clean, dim=-1)
    x_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    recon = torch.relu(x_in @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    parts = recon.split(x.shape[-1] // len(blocks), dim=-1)

    def swap(j):
        def hook(_m, _a, out):
            return (parts[j], *out[1:]) if isinstance(out, tuple) else parts[j]

        return hook

    handles = [b.register_forward_hook(swap(j)) for j, b in enumerate(blocks)]
    logits = model(tokens).logits
    for h in handles:
        h.remove()
    ce = _next_token_ce(logits, tokens)
    assert float(ours["ce_sae"][0]) == pytest.approx(ce, rel=1e-5)


def test_attention_heads_outputs_and_each_latents_share_per_head(clt_run, tmp_path):
    """--layer_loc attn_z: the heads' outputs before the output projection; rows summarise each latent's share
    per head, the SAE folder keeps the shares (load_sae still reads it), interpret.py shows them per feature."""
    root, args = clt_run
    i = args.index("--activations_dir")
    run.main([*args[:i], "--activations_dir", str(tmp_path / "acts"), "--out", str(tmp_path / "r"), "--layer_loc",
              "attn_z", "--arch", "topk", "--n_steps", "20"])  # fmt: skip
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["hook_name"] == "h.1.attn.c_proj:input" and results["n_heads"] == 4
    for row in results["runs"]:
        assert sum(row["latents_per_head"]) == row["dict_size"] and 0.25 <= row["head_top_share_mean"] <= 1
        sae, cfg = load_sae(tmp_path / "r" / "saes" / row["name"])
        shares = load_file(tmp_path / "r" / "saes" / row["name"] / "head_attribution.safetensors")["head_share"]
        by_hand = sae.decoder()[0].detach().view(row["dict_size"], 4, 8).pow(2).sum(-1)
        torch.testing.assert_close(shares, by_hand / by_hand.sum(-1, keepdim=True))
        assert cfg["metadata"]["n_heads"] == 4 and row["ce_loss_spliced"] is not None
    interpret.main(["--run_dir", str(tmp_path / "r"), "--n_features", "2", "--max_rows", "32", "--baselines", "random",
                    "--out", str(tmp_path / "i")])  # fmt: skip
    feature = json.loads(next((tmp_path / "i" / "features").glob("sae_*.json")).read_text())
    assert len(feature["head_shares"]) == 4 and sum(feature["head_shares"]) == pytest.approx(1, abs=1e-3)


def test_model_diffing_one_crosscoder_over_two_models(clt_run, tmp_path):
    """--diff_model: one crosscoder over both models' residual at layer 1; rows count A-only / B-only / shared
    latents and give each model's CE (checked against a hand splice into model B: both models' clean activations
    encoded, B's half of the reconstruction in place of B's residual); histograms written; evaluate.py and
    interpret.py load the pair back."""
    root, args = clt_run
    other = make_hf_gpt2(tmp_path / "gpt2_other", seed=1)  # same tokenizer, other weights
    i = args.index("--activations_dir")
    run.main([*args[:i], "--activations_dir", str(tmp_path / "acts"), "--out", str(tmp_path / "r"), "--arch",
              "crosscoder", "--diff_model", str(other), "--layer_loc", "residual", "--n_steps", "30",
              "--l1_exp_low", "-2", "--l1_exp_high", "-1"])  # fmt: skip
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["hook_name"] == "a.h.1+b.h.1"
    for row in results["runs"]:
        kinds = ("latents_a_only", "latents_b_only", "latents_shared", "latents_between")
        assert sum(row[k] for k in kinds) == row["dict_size"] and len(row["fvu_by_model"]) == 2
        by_model = row["ce_loss_recovered_by_model"]
        assert row["ce_loss_recovered"] == pytest.approx(sum(by_model) / 2, rel=1e-5)
        assert (tmp_path / "r" / "model_diff" / f"{row['name']}.png").stat().st_size > 1000
    row = results["runs"][0]
    sae_dir = tmp_path / "r" / "saes" / row["name"]
    sae, cfg = load_sae(sae_dir)
    assert cfg["metadata"]["diff_model"] == str(other)

    with torch.no_grad():
        ce_b, ours = _hand_spliced_model_b(root / "gpt2", other, sae_dir, sae, cfg)
    assert float(ours["ce_sae_b"][0]) == pytest.approx(ce_b, rel=1e-5)

    evaluate.main(["--sae_dir", str(sae_dir), "--out", str(tmp_path / "e"), "--ce_eval_rows", "8"])
    scored = json.loads((tmp_path / "e" / "eval.json").read_text())["saes"][row["name"]]["metrics"]
    assert scored["model_performance_preservation"]["ce_loss_score"] == pytest.approx(
        row["ce_loss_recovered"], rel=1e-5
    )
    interpret.main(["--run_dir", str(tmp_path / "r"), "--n_features", "2", "--max_rows", "32", "--baselines",
                    "random", "--out", str(tmp_path / "i")])  # fmt: skip
    assert len(json.loads(next((tmp_path / "i" / "features").glob("sae_*.json")).read_text())["top_logits"]) == 10


def _hand_spliced_model_b(first: Path, other: Path, sae_dir: Path, sae, cfg) -> tuple[float, dict]:
    """Model B's CE with its block-1 residual replaced by B's half of the crosscoder's reconstruction of both
    models' clean activations (by hand, from the saved weights), and ce_and_kl's fields on the same tokens."""
    tokens = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    lm = load_language_model(str(first), torch.device("cpu"), diff_model=str(other))
    ours = ce_and_kl(lm, "a.h.1+b.h.1", sae, tokens)
    a, b = (GPT2LMHeadModel.from_pretrained(p).eval() for p in (first, other))
    clean = []
    for m in (a, b):  # block 1's output (HF's last hidden_states entry is after the final norm)
        handle = m.transformer.h[1].register_forward_hook(lambda _m, _a, out: clean.append(_hidden(out)))
        m(tokens)
        handle.remove()
    w = load_file(sae_dir / "sae_weights.safetensors")
    x = torch.cat(clean, dim=-1)
    x_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    recon_b = (torch.relu(x_in @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"])[..., 32:]

    def swap(_m, _a, out):
        return (recon_b, *out[1:]) if isinstance(out, tuple) else recon_b

    handle = b.transformer.h[1].register_forward_hook(swap)
    logits = b(tokens).logits
    handle.remove()
    return _next_token_ce(logits, tokens), ours
