"""--parallel latents: one SAE's latents split over 2 gloo processes on CPU trains as one process does (loss curve
and final weights to float precision, every architecture), holds half the weights and Adam state per process,
saves the same SAELens folders, and resumes after a kill only with as many processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from procs import Exit, in_process, kill_tree, one_thread
from safetensors.torch import load_file

import replicate_toy_models
from sparse_coding.pipelines.toy import smoke
from sparse_coding.training.trainer import build_stacks

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it; the one-process runs here get one_thread()


def _command(out: Path, *args: str) -> list[str]:
    """replicate_toy_models.py under torchrun with its latents split over 2 processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    toy = ["replicate_toy_models.py", "--preset", "smoke", "--out", str(out), *args, "--parallel", "latents"]
    return [*launcher, *toy]


def _toy(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(out, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _toy_here(capsys, out: Path, *args: str) -> Exit:
    """replicate_toy_models.py in this process (through run_main, as its script) on one thread, as torchrun gives
    each of its processes."""
    with one_thread():
        return in_process(capsys, replicate_toy_models.main, "--preset", "smoke", "--out", str(out), *args)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _assert_same_training(one: Path, two: Path, atol: dict[str, float]) -> None:
    """The same loss curve and final weights (to float precision), and byte-identical cfg.json files."""
    la, lb = _log(one), _log(two)
    assert [(r["step"], r["sae"]) for r in la] == [(r["step"], r["sae"]) for r in lb]
    for ra, rb in zip(la, lb, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5), (ra, rb)
    runs = json.loads((one / "results.json").read_text())["runs"]
    for r in runs:
        a, b = one / "saes" / r["name"], two / "saes" / r["name"]
        assert (a / "cfg.json").read_bytes() == (b / "cfg.json").read_bytes()
        wa, wb = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            gap = float((wa[k] - wb[k]).abs().max())
            assert gap <= atol[r["arch"]], (r["name"], k, gap)
    rows_b = {r["name"]: r for r in json.loads((two / "results.json").read_text())["runs"]}
    for r in runs:
        assert r["mmcs"] == pytest.approx(rows_b[r["name"]]["mmcs"], abs=1e-4)
        assert r["dead_features"] == rows_b[r["name"]]["dead_features"]


def test_every_architecture_trains_on_two_shards_as_in_one_process(tmp_path, capsys):
    # AuxK switched on early (latents silent for two batches count as dead), so its global top-k is exercised too
    args = ("--arch", "all", "--dead_tokens_threshold", "512")
    one, two = _toy_here(capsys, tmp_path / "one", *args), _toy(tmp_path / "two", *args)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "latents split over 2 processes" in two.stdout
    assert any("auxk" in r for r in _log(tmp_path / "two")), "AuxK never ran: the test would not cover it"
    # jumprelu's threshold estimators read a window of pre-activations; summation order moves it a little more
    atol = {"relu": 1e-5, "topk": 1e-5, "batchtopk": 1e-5, "matryoshka": 1e-5, "gated": 1e-5, "jumprelu": 5e-5}
    _assert_same_training(tmp_path / "one", tmp_path / "two", atol)


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _digest(folder: Path) -> dict[str, str]:
    """The run's files by content (the killed run's lock note aside: the next run clears it)."""
    files = [p for p in folder.rglob("*.*") if not p.name.startswith(".sparse_coding.")]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_a_killed_sharded_run_holds_half_per_process_and_resumes_only_with_as_many(tmp_path, capsys):
    """relu with SAELens' free decoder and dead-latent resampling (every rank draws the whole dictionary's picks
    and keeps its own), killed after its first checkpoint."""
    args = ("--arch", "relu", "--decoder_init_norm", "0.1", "--resample_every", "20", "--checkpoint_every", "20",
            "--dict_ratio_exp_high", "1")  # fmt: skip
    out = tmp_path / "two"
    proc = subprocess.Popen(_command(out, *args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    states = [out / "checkpoint" / f"rank{r}" / "state.safetensors" for r in range(2)]
    deadline = time.time() + 120
    while not all(s.exists() for s in states) and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(proc)
    assert all(s.exists() for s in states) and not (out / "results.json").exists()

    # Each process's checkpoint holds half of every per-latent tensor and its Adam moments, and all of b_dec.
    whole = build_stacks(replace(smoke(), dict_ratio_exp_high=1), 16, torch.device("cpu"))
    full = sum(3 * p.numel() * p.element_size() for s in whole for p in s.parameters())  # weights + two moments
    full += sum(b.numel() * b.element_size() for s in whole for b in s.buffers())
    for state in states:
        held = load_file(state)
        share = _bytes({k: v for k, v in held.items() if not k.startswith("data.")}) / full
        assert 0.5 <= share < 0.52, share  # 1/N, plus the replicated b_dec and per-model settings

    before = _digest(out)
    refused = _toy_here(capsys, out, *args)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: the checkpoint in")
    assert "written by 2 processes and this run has 1" in refused.stderr
    assert _digest(out) == before  # nothing changed

    resumed = _toy(out, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    alone = _toy_here(capsys, tmp_path / "one", *args)
    assert alone.returncode == 0, alone.stderr[-3000:]
    # resampling draws from losses that differ in the last bits; a little more drift than plain training
    _assert_same_training(tmp_path / "one", out, {"relu": 1e-3})
    assert not (out / "checkpoint").exists()
