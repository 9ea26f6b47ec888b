"""replicate_toy_models.py end to end: the DESIGN.md contract, resume after a kill, and clear failures."""

import json
import sys
from pathlib import Path

import pytest
from procs import in_process, kill_after_checkpoint

import replicate_toy_models
from sparse_coding.pipelines.toy import ARCHS_PLOT
from sparse_coding.saes import SAES, single_hook_archs

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_KEYS = {
    "l1_alpha",
    "dict_ratio",
    "dict_size",
    "mmcs",
    "dead_features",
    "fvu",
    "l0",
    "mmcs_with_larger",
}
PLOTS = [
    "mmcs_matrix.png",
    "dead_features_matrix.png",
    "recon_loss_matrix.png",
    "mmcs_with_larger_matrix.png",
]


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_smoke_run_writes_the_contract(tmp_path, arch):
    replicate_toy_models.main(["--preset", "smoke", "--out", str(tmp_path), "--arch", arch])
    results = json.loads((tmp_path / "results.json").read_text())
    cfg = results["config"]
    assert cfg["preset"] == "smoke" and cfg["arch"] == arch
    n_rows = len(cfg["k_values"]) if arch == "topk" else cfg["l1_exp_high"] - cfg["l1_exp_low"] + 1
    runs = results["runs"]
    assert len(runs) == n_rows * 3
    largest = max(r["dict_size"] for r in runs)
    for r in runs:
        assert r.keys() >= CONTRACT_KEYS
        assert (r["mmcs_with_larger"] is None) == (r["dict_size"] == largest)
        assert 0 <= r["mmcs"] <= 1 and r["l0"] >= 0 and r["fvu"] >= 0
    for p in PLOTS:
        assert (tmp_path / p).stat().st_size > 1000
    assert len(list((tmp_path / "saes").iterdir())) == len(runs)
    assert (tmp_path / "ground_truth.safetensors").is_file()
    assert not (tmp_path / "checkpoint").exists()
    json.loads((tmp_path / "config.json").read_text())


def test_every_architecture_in_one_sweep(tmp_path):
    """--arch all: every registered architecture trains on the same batches; rows, SAE folders and one figure of
    MMCS, FVU and dead latents against L0."""
    replicate_toy_models.main(["--preset", "smoke", "--arch", "all", "--out", str(tmp_path), "--n_steps", "30"])
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {r["arch"] for r in runs} == set(single_hook_archs())
    for arch in single_hook_archs():
        mine = [r for r in runs if r["arch"] == arch]
        knob = SAES[arch].knob
        assert all(r["knob"] == knob and r[knob] is not None for r in mine)
        assert {r["dict_size"] for r in mine} == {16, 32, 64}
        largest = [r for r in mine if r["dict_size"] == 64]
        assert all(r["mmcs_with_larger"] is None for r in largest)
        assert all(r["mmcs_with_larger"] is not None for r in mine if r["dict_size"] < 64)
    assert (tmp_path / ARCHS_PLOT).stat().st_size > 1000 and not (tmp_path / "mmcs_matrix.png").exists()
    assert len(list((tmp_path / "saes").iterdir())) == len(runs)


def test_architectures_compared_on_a_hierarchy(tmp_path, capsys):
    args = ["--preset", "smoke", "--out", str(tmp_path), "--arch", "all", "--hierarchy_roots", "2",
            "--hierarchy_depth", "2", "--n_steps", "30"]  # fmt: skip
    replicate_toy_models.main(args)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {r["arch"] for r in runs} == set(single_hook_archs())
    for r in runs:
        assert r.keys() >= CONTRACT_KEYS | {"mcc", "hungarian_mmcs", "f1", "absorption", "splitting"}
        assert set(r["absorption_by_depth"]) == {"0", "1"} and 0 <= r["mcc"] <= 1
    table = (tmp_path / "comparison.md").read_text()
    assert all(f"| {arch} |" in table for arch in single_hook_archs())
    assert (tmp_path / "absorption_by_depth.png").stat().st_size > 1000
    assert json.loads((tmp_path / "comparison.json").read_text())["best_by_mcc"].keys() == set(single_hook_archs())
    r = in_process(capsys, replicate_toy_models.main, *args)
    assert r.returncode == 2 and "already holds a finished run" in r.stderr


def test_killed_run_resumes_to_the_same_results(tmp_path, capsys):
    """Only the killed run needs a process of its own; the others run here (an interpreter's start-up each)."""
    args = ["--preset", "smoke", "--n_steps", "400", "--checkpoint_every", "50"]
    assert in_process(capsys, replicate_toy_models.main, *args, "--out", str(tmp_path / "unbroken")).returncode == 0

    killed = tmp_path / "killed"
    kill_after_checkpoint(
        [sys.executable, str(ROOT / "replicate_toy_models.py"), *args, "--out", str(killed)], killed, ROOT
    )
    config_before = (killed / "config.json").read_text()
    # other settings: refused, nothing overwritten
    refused = in_process(capsys, replicate_toy_models.main, *args, "--lr", "0.5", "--out", str(killed))
    assert refused.returncode == 2 and "different settings" in refused.stderr
    assert (killed / "config.json").read_text() == config_before
    assert in_process(capsys, replicate_toy_models.main, *args, "--out", str(killed)).returncode == 0

    a = json.loads((tmp_path / "unbroken" / "results.json").read_text())["runs"]
    b = json.loads((killed / "results.json").read_text())["runs"]
    assert a == b


def test_a_finished_run_is_never_overwritten(tmp_path, capsys):
    replicate_toy_models.main(["--preset", "smoke", "--out", str(tmp_path), "--n_steps", "5"])
    before = (tmp_path / "results.json").read_text()
    r = in_process(capsys, replicate_toy_models.main, "--preset", "smoke", "--out", str(tmp_path))
    assert r.returncode == 2 and "already holds a finished run" in r.stderr
    assert (tmp_path / "results.json").read_text() == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["--activation_dim", "0"], "activation_dim must be > 0, got 0"),
        (["--n_ground_truth", "-3"], "n_ground_truth must be > 0, got -3"),
        (["--dict_ratio_exp_base", "0"], "dict_ratio_exp_base must be > 0"),
        (["--dict_ratio_exp_low", "-9"], "every size must be"),
        (["--arch", "topk", "--k_values", "100"], "larger than the smallest dictionary"),
        (["--arch", "nope"], "unknown architecture"),
        (["--arch", "topk", "--grad_clip", "-1"], "grad_clip must be ≥ 0"),
        (["--arch", "gated", "--resample_every", "10"], "only these architectures resample dead latents: relu"),
        (["--arch", "matryoshka", "--matryoshka_widths", "8", "4"], "strictly increasing"),
        (["--lr_warmup_steps", "50", "--lr_decay_steps", "20"], "must not exceed n_steps"),
        (["--preset", "huge"], "invalid choice"),
        (["--batch_size", "0"], "batch_size must be > 0"),
        (["--config", "/nonexistent.yaml"], "not found"),
    ],
)
def test_bad_input_gives_one_clear_message(tmp_path, args, message, capsys):
    r = in_process(capsys, replicate_toy_models.main, "--preset", "smoke", "--out", str(tmp_path / "run"), *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_out_is_refused(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = in_process(capsys, replicate_toy_models.main, "--preset", "smoke", "--out", str(blocker / "run"))
    assert r.returncode == 2 and "cannot write to output folder" in r.stderr


def test_config_file_and_flags(tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("n_steps: 7\nlr: 0.01\n")
    replicate_toy_models.main(
        ["--preset", "smoke", "--config", str(conf), "--lr", "0.002", "--out", str(tmp_path / "run")]
    )
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["n_steps"] == 7 and cfg["lr"] == 0.002  # the flag beats the file
    conf.write_text("preset: smoke\nlr: 1e-3\nk_values: 3\narch: topk\nn_steps: 5\n")  # YAML reads 1e-3 as text
    replicate_toy_models.main(["--config", str(conf), "--out", str(tmp_path / "run3")])
    cfg = json.loads((tmp_path / "run3" / "config.json").read_text())
    assert cfg["lr"] == 0.001 and cfg["k_values"] == [3] and cfg["preset"] == "smoke"
    conf.write_text("n_steps: many\n")
    r = in_process(capsys, replicate_toy_models.main, "--preset", "smoke", "--config", str(conf), "--out",
                   str(tmp_path / "run4"))  # fmt: skip
    assert r.returncode == 2 and "field n_steps: expected int, got 'many'" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"n_stepz": 3}')
    r = in_process(capsys, replicate_toy_models.main, "--preset", "smoke", "--config", str(bad), "--out",
                   str(tmp_path / "run2"))  # fmt: skip
    assert r.returncode == 2 and "unknown field(s): n_stepz" in r.stderr
