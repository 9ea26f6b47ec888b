"""interpret.py on a run.py run: the summary contract, baselines through the same pipeline, resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lm_fixtures import smoke_run_args

import interpret
import run

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


def test_interpret_refuses_to_mix_settings_in_one_folder(lm_run, tmp_path):
    out = tmp_path / "interp"
    args = ["--run_dir", str(lm_run), "--n_features", "2", "--max_rows", "32", "--baselines", "random", "--out"]
    interpret.main([*args, str(out)])
    r = subprocess.run([sys.executable, str(ROOT / "interpret.py"), *args, str(out), "--seed", "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
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
