"""evaluate.py: SAEBench's core metrics agree with SAELens' own evals functions on the same tokens, for an SAE
folder SAELens wrote and for ours; every SAE of a run folder is scored, with probing and figures; toy runs get
their recovery metrics back; --steer prints before and after."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_fixtures import make_hooked_transformer, smoke_run_args, write_corpus, write_rst_corpus
from procs import in_process
from sae_lens import SAE as SAELensSAE
from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
from sae_lens.training.activation_scaler import ActivationScaler

import evaluate
import replicate_toy_models
import run
from sparse_coding.models.language_model import Tokenizer, TransformerLensModel
from sparse_coding.pipelines.evaluate import EvaluateConfig, eval_data, run_evaluate
from sparse_coding.saes import build_sae
from sparse_coding.saes.saelens import save_sae

ROOT = Path(__file__).resolve().parents[2]
HOOK = "blocks.0.hook_resid_post"


class TokenRows:
    """What SAELens' metric functions ask of an activation store: a batch of token rows (always the same)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        assert n == len(self.tokens)
        return self.tokens


def _saelens_sae(folder: Path, kind: str) -> Path:
    torch.manual_seed(1)
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
    else:
        sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=5))
    with torch.no_grad():
        sae.b_enc.normal_(-0.5, 0.5)
        sae.b_enc[:8] = -1e3  # these never fire
        sae.b_dec.normal_(0, 0.1)
    sae.cfg.metadata.hook_name, sae.cfg.metadata.model_name = HOOK, "tiny-tl"
    sae.save_model(folder)
    return folder


def _our_sae(folder: Path) -> Path:
    sae = build_sae("relu", 32, 64, [{"l1_alpha": 1.0}])
    with torch.no_grad():
        sae.b_enc.normal_(-0.1, 0.2)
        sae.b_enc[0, :8] = -1e3  # these never fire
        sae.b_dec.normal_(0, 0.1)
    return save_sae(folder, sae, 0, {"model_name": "tiny-tl", "hook_name": HOOK, "context_size": 16})


@pytest.fixture(scope="module")
def tl(tmp_path_factory):
    model, tok = make_hooked_transformer()
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    return TransformerLensModel(model, Tokenizer.from_hf(tok, "tiny-bpe"), "tiny-tl"), corpus


@pytest.mark.parametrize("which", ["saelens_standard", "saelens_topk", "ours"])
def test_core_metrics_agree_with_saelens_on_the_same_tokens(tl, tmp_path, which):
    lm, corpus = tl
    folder = _our_sae(tmp_path / "sae") if which == "ours" else _saelens_sae(tmp_path / "sae", which[8:])
    cfg = EvaluateConfig(sae_dir=str(folder), dataset_name=str(corpus), context_size=16, eval_tokens=16 * 12,
                         ce_eval_rows=12, probe=False, device="cpu")  # fmt: skip
    ours = run_evaluate(cfg, tmp_path / "out", lm=lm)["saes"]["sae"]["metrics"]

    tokens = eval_data(cfg, {}, lm, HOOK).tokens
    special = list(lm.tokenizer.special_ids)
    assert len(tokens) == 12 and torch.isin(tokens, torch.tensor(special)).any()  # the mask is exercised
    sae = SAELensSAE.load_from_disk(str(folder))
    theirs, features = get_sparsity_and_variance_metrics(
        sae, lm.model, TokenRows(tokens), ActivationScaler(), n_batches=1, compute_l2_norms=True,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=len(tokens), model_kwargs={}, ignore_tokens=special,
    )  # fmt: skip
    theirs |= get_downstream_reconstruction_metrics(
        sae, lm.model, TokenRows(tokens), ActivationScaler(), compute_kl=True, compute_ce_loss=True, n_batches=1,
        eval_batch_size_prompts=len(tokens), ignore_tokens=special,
    )  # fmt: skip
    flat = {k: v for category in ours.values() for k, v in category.items()}
    for key in ("explained_variance", "mse", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio",
                "relative_reconstruction_bias", "l0", "l1", "ce_loss_score", "ce_loss_with_sae",
                "ce_loss_without_sae", "ce_loss_with_ablation", "kl_div_score", "kl_div_with_sae",
                "kl_div_with_ablation"):  # fmt: skip
        assert flat[key] == pytest.approx(theirs[key], abs=1e-4), key
    alive = sum(d > 0 for d in features["feature_density"]) / 64
    assert flat["frac_alive"] == pytest.approx(alive) and 0 < alive < 1
    assert flat["ce_loss_score"] > 0 and flat["l0"] > 0


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    run.main([*smoke_run_args(root), "--out", str(root / "run"), "--n_steps", "30"])
    return root


def test_a_run_folder_every_sae_probing_and_figures(lm_run, tmp_path):
    rst = write_rst_corpus(tmp_path / "rst")
    out = tmp_path / "eval"
    evaluate.main(["--sae_dir", str(lm_run / "run"), "--out", str(out), "--dataset_name", str(rst),
                   "--probe_k", "1", "2", "5", "--probe_examples", "300"])  # fmt: skip
    result = json.loads((out / "eval.json").read_text())
    runs = json.loads((lm_run / "run" / "results.json").read_text())["runs"]
    assert set(result["saes"]) == {r["name"] for r in runs} and result["data"]["kind"] == "text"
    for s in result["saes"].values():
        assert s["metrics"]["model_performance_preservation"]["ce_loss_score"] is not None
        tasks = s["probing"]["tasks"]
        assert {"code_block", "doctest", "inline_literal"} <= set(tasks)
        assert all(0 <= acc <= 1 for t in tasks.values() for acc in t["sae"].values())
    assert set(result["probing_baselines"]["mean"]["neurons"]) == {"1", "2", "5"}
    for png in ("frontier_fvu_l0.png", "probing_accuracy_vs_k.png"):
        assert (out / png).stat().st_size > 1000


def test_run_py_rows_carry_the_same_core_metrics_as_evaluate_py(lm_run, tmp_path):
    runs = json.loads((lm_run / "run" / "results.json").read_text())["runs"]
    row = runs[0]
    ce_rows = json.loads((lm_run / "run" / "config.json").read_text())["ce_eval_rows"]
    evaluate.main(["--sae_dir", str(lm_run / "run" / "saes" / row["name"]), "--out", str(tmp_path / "e"),
                   "--ce_eval_rows", str(ce_rows)])  # fmt: skip
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert result["data"]["kind"] == "activations"  # the held-out chunk run.py scored on
    ours = result["saes"][row["name"]]["metrics"]
    for cat, values in row["core"].items():
        for key, v in values.items():
            assert ours[cat][key] == pytest.approx(v, rel=1e-5, abs=1e-6), (cat, key)
    assert row["ce_loss_recovered"] == pytest.approx(row["core"]["model_performance_preservation"]["ce_loss_score"])


def test_steering_from_the_command_line(lm_run, tmp_path, capsys):
    """evaluate.py's command line as its script runs it (in this process: test_not_an_sae_folder starts the script)."""
    sae = next((lm_run / "run" / "saes").iterdir())
    r = in_process(capsys, evaluate.main, "--sae_dir", str(sae), "--out", str(tmp_path / "s"), "--steer", "3=40",
                   "--prompt", "the cat sat on", "--top_tokens", "5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    steer = json.loads((tmp_path / "s" / "steer.json").read_text())
    assert len(steer["before"]) == len(steer["after"]) == 5 and "before" in r.stdout
    assert steer["before"] != steer["after"]
    bad = in_process(capsys, evaluate.main, "--sae_dir", str(sae), "--steer", "99999=1", "--prompt", "x", "--out",
                     str(tmp_path / "bad"))  # fmt: skip
    assert bad.returncode == 2 and "not in 0.." in bad.stderr and "Traceback" not in bad.stderr


def test_a_toy_comparison_gets_its_recovery_metrics_back(tmp_path):
    args = ["--preset", "smoke", "--arch", "all", "--hierarchy_roots", "2", "--hierarchy_depth", "2",
            "--n_steps", "30", "--out", str(tmp_path / "toy")]  # fmt: skip
    replicate_toy_models.main(args)
    evaluate.main(["--sae_dir", str(tmp_path / "toy"), "--out", str(tmp_path / "e")])
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    rows = {r["name"]: r for r in json.loads((tmp_path / "toy" / "results.json").read_text())["runs"]}
    assert set(result["saes"]) == set(rows)
    for name, s in result["saes"].items():  # the same held-out examples, so the same numbers
        assert s["synthetic"]["mcc"] == pytest.approx(rows[name]["mcc"], abs=1e-9)
        assert s["synthetic"]["absorption"] == pytest.approx(rows[name]["absorption"], abs=1e-9, nan_ok=True)
    assert (tmp_path / "e" / "absorption_by_depth.png").is_file() and (tmp_path / "e" / "frontier_fvu_l0.png").is_file()


def test_not_an_sae_folder(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--sae_dir", str(tmp_path), "--out",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "neither an SAE folder" in r.stderr


def test_saes_of_several_hooks_are_scored_per_hook(lm_run, tmp_path):
    import shutil

    src = next((lm_run / "run" / "saes").iterdir())
    for name, hook in (("a", "transformer.h.1.mlp.act"), ("b", "transformer.h.0.mlp.act")):
        shutil.copytree(src, tmp_path / "run" / "saes" / name)
        cfg = json.loads((tmp_path / "run" / "saes" / name / "cfg.json").read_text())
        cfg["metadata"]["hook_name"] = hook
        (tmp_path / "run" / "saes" / name / "cfg.json").write_text(json.dumps(cfg))
    corpus = next((lm_run / "corpus").glob("*.jsonl"))
    evaluate.main(["--sae_dir", str(tmp_path / "run"), "--out", str(tmp_path / "e"), "--dataset_name", str(corpus)])
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert [g["hook_name"] for g in result["groups"]] == ["h.1.mlp.act", "h.0.mlp.act"]  # the base model's names
    assert result["saes"]["a"]["hook_name"] != result["saes"]["b"]["hook_name"]
    a, b = (result["saes"][k]["metrics"]["reconstruction_quality"]["explained_variance"] for k in "ab")
    assert a != b  # the same SAE scored on two different activations
