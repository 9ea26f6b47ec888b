"""bench/vs_saelens.py end to end at toy size: a random GPT-2's activations stored here, our SAE and SAELens' trained
on the same batches and scored by one evaluation, one JSON line per SAELens setting (so the bench cannot rot
unnoticed between the occasions it is run at full size)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from lm_fixtures import make_hf_gpt2, write_corpus

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("sae_lens")


def test_the_bench_prints_a_scored_pair_per_saelens_setting(tmp_path):
    """One JSON line per pair; then a second run, given the first's output, takes SAELens' side from it instead of
    training it again."""
    model, corpus = make_hf_gpt2(tmp_path / "gpt2"), write_corpus(tmp_path / "corpus", n_docs=1500)
    cmd = [sys.executable, str(ROOT / "bench" / "vs_saelens.py"), "--archs", "topk", "relu",
           "--model_name", str(model), "--dataset_name", str(corpus), "--activations_dir", str(tmp_path / "acts"),
           "--max_length", "32", "--chunk_tokens", "2048", "--tokens", "4096", "--batch", "512",
           "--d_sae", "64", "--k", "4", "--timing_steps", "2"]  # fmt: skip
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["arch"], r["saelens_setting"]) for r in rows] == [
        ("topk", "default_lr"), ("topk", "our_lr"), ("relu", "default_lr"), ("relu", "our_lr")
    ]  # fmt: skip
    for r in rows:
        assert r["tokens"] == 4096 and r["d_sae"] == 64
        for side in ("ours", "saelens"):
            m = r[side]
            assert m["tokens_per_s"] > 0 and math.isfinite(m["l0"])
            assert m["fvu"] is None or (0 < m["fvu"] < 2 and 0 <= m["dead"] <= 64)
        if r["arch"] == "topk":
            assert r["ours"]["l0"] == r["saelens"]["l0"] == 4.0
        else:  # ours interpolated at SAELens' L0, or no FVU where our runs' L0 range does not reach it
            assert r["ours"]["l0"] == r["saelens"]["l0"]
            lo, hi = r["ours"].get("bracket_l0", [0, 0])
            assert (r["ours"]["interpolated"] and lo <= r["ours"]["l0"] <= hi) or (
                r["ours"]["fvu"] is None and "outside" in r["ours"]["reason"]
            )

    (tmp_path / "first.jsonl").write_text(out.stdout)
    again = subprocess.run(cmd[:3] + ["topk"] + cmd[5:] + ["--reuse_saelens", str(tmp_path / "first.jsonl")],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    reused = [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")]
    assert [r["saelens"] for r in reused] == [r["saelens"] for r in rows[:2]]
    assert [r["ours"]["fvu"] for r in reused] == [r["ours"]["fvu"] for r in rows[:2]]  # ours trained the same
    assert "Training SAE" not in again.stderr  # SAELens' trainer's progress bar
