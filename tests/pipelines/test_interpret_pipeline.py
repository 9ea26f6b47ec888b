"""interpret.py on a run.py run: the summary contract, baselines through the same pipeline, resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lm_fixtures import smoke_run_args
from procs import in_process

import interpret
import run
from sparse_coding import export

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    run.main([*smoke_run_args(root), "--out", str(root / "run"), "--n_steps", "60"])
    return root / "run"


def test_interpret_writes_summary_pages_and_resumes(lm_run, tmp_path):
    out = tmp_path / "interp"
    args = ["--run_dir", str(lm_run), "--n_features", "4", "--max_rows", "64", "--out", str(out)]
    interpret.main(args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scorer"] == "correlation_all"
    for method in ("sae", "neuron", "pca", "random", "ica"):
        entry = summary["by_method"][method]
        assert entry["n_features"] == 4 and {"mean_score", "n_features"} <= entry.keys()
    assert summary["verdict"].startswith("SAE features") and "95% intervals" in summary["verdict"]
    for method in ("neuron", "pca", "random", "ica"):
        c = summary["comparisons"][method]
        lo, hi = c["interval"]
        assert lo <= c["difference"] <= hi and c["outcome"] in ("beats", "ties with", "loses to")
        lo, hi = summary["by_method"][method]["interval"]
        assert lo <= summary["by_method"][method]["mean_score"] <= hi
    feature = json.loads(next((out / "features").glob("sae_*.json")).read_text())
    extras = feature["record"]["extras"]
    assert len(extras["neighbours"]) == 5 and len(extras["logits"]["promoted"]) == 10
    assert feature["scores"]["intruder"] is None or 0 <= feature["scores"]["intruder"] <= 1
    assert Path(summary["sae_dir"]).parent == lm_run / "saes"
    assert (out / "index.html").is_file()
    features = sorted((out / "features").glob("*.json"))
    assert len(features) == 5 * 4
    stamps = {p: p.stat().st_mtime_ns for p in features}
    features[0].unlink()  # an interrupted run: one feature missing
    interpret.main(args)
    assert features[0].is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != features[0])  # not recomputed


def test_interpret_refuses_to_mix_settings_in_one_folder(lm_run, tmp_path, capsys):
    out = tmp_path / "interp"
    args = ["--run_dir", str(lm_run), "--n_features", "2", "--max_rows", "32", "--baselines", "random", "--out"]
    interpret.main([*args, str(out)])
    r = in_process(capsys, interpret.main, *args, str(out), "--seed", "1")  # test_interpret_bad_input starts the script
    assert r.returncode == 2 and "other settings" in r.stderr


def test_interpret_bad_input(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "interpret.py"), "--sae_dir", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "not an SAE folder" in r.stderr and "Traceback" not in r.stderr


def test_feature_data_the_sae_page_and_the_community_exports(lm_run, tmp_path, capsys):
    out = lm_run / "interpret_dash"
    interpret.main(["--run_dir", str(lm_run), "--n_features", "3", "--max_rows", "64", "--baselines", "random",
                    "--out", str(out)])  # fmt: skip
    feature = json.loads(next((out / "features").glob("sae_*.json")).read_text())
    # (this smoke SAE's features fire on a handful of rows, too few for quantiles: the unit test covers those)
    assert feature["density_histogram"]["log10_firing_rate"] < 0 and isinstance(feature["quantile_examples"], list)
    assert len(feature["top_logits"]) == 10 and feature["logits_note"] is None  # the tiny GPT-2 has an LM head
    assert len(feature["neighbours"]) == 5 and set(feature["score_intervals"]) >= {"correlation_all"}
    overview = json.loads((out / "sae.json").read_text())
    row = next(
        r
        for r in json.loads((lm_run / "results.json").read_text())["runs"]
        if r["name"] == overview["sae_dir"].split("/")[-1]
    )
    assert overview["metrics"]["fvu"] == row["fvu"] and overview["n_latents"] == row["dict_size"]
    assert (out / "sae.html").is_file()

    export.main(["neuronpedia", str(lm_run), "--out", str(tmp_path / "np")])
    (batch_file,) = (tmp_path / "np").glob("*/batch-0.json")
    batch = json.loads(batch_file.read_text())
    assert batch["layer"] == 1 and batch["sae_set"] == batch_file.parent.name and len(batch["features"]) == 3
    f = next(x for x in batch["features"] if x["feature_index"] == feature["feature_index"])
    assert (
        f["pos_str"] == [t for t, _ in feature["top_logits"]] and f["frac_nonzero"] == feature["record"]["firing_rate"]
    )
    assert sum(f["freq_hist_data_bar_heights"]) == sum(feature["density_histogram"]["counts"])
    tops = [a for a in f["activations"] if a["bin_min"] == -1]
    assert len(tops) == len(feature["record"]["train_top"]) + len(feature["record"]["test_top"])
    assert all(len(a["tokens"]) == len(a["values"]) for a in f["activations"])
    explained = json.loads((batch_file.parent / "explanations.json").read_text())
    assert {e["index"] for e in explained} <= {x["feature_index"] for x in batch["features"]} and explained
    assert explained[0]["description"] and explained[0]["typeName"] == "oai_token-act-pair"

    capsys.readouterr()
    export.main(["hub", str(lm_run), "org/my-saes", "--dry-run"])
    said = capsys.readouterr().out
    saes = sorted((lm_run / "saes").iterdir())
    assert f"would upload saes/{saes[0].name}/cfg.json -> org/my-saes/saes/{saes[0].name}/cfg.json" in said
    assert said.count("would upload") == 2 + 3 * len(saes)  # config, results; cfg, weights, sparsity per SAE
