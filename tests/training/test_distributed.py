"""run.py under torchrun (2 processes, gloo on CPU) gives the same SAEs and results as one process, whichever way the
work is split: the sweep's SAEs, every batch, or every SAE's latents."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_fixtures import smoke_run_args
from procs import one_thread
from safetensors.torch import load_file

import run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return [*smoke_run_args(tmp_path_factory.mktemp("dist")), "--n_steps", "30"]


@pytest.fixture(scope="module")
def one_relu(assets, tmp_path_factory):
    """The relu sweep trained in one process: what every split must reproduce."""
    out = tmp_path_factory.mktemp("one") / "run"
    return out, _run([*assets, "--arch", "relu"], out)


def _run(args, out, nproc=1):
    """run.py under torchrun with nproc processes, or (nproc 1) in this process on one thread, as torchrun gives each
    of its processes, so both run the same kernels."""
    if nproc == 1:
        with one_thread():
            run.main([*args, "--out", str(out)])
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run([*launcher, str(ROOT / "run.py"), *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def _same_numbers(a, b, rel=1e-4):
    for ra, rb in zip(a, b, strict=True):
        _same_values(ra, rb, rel, ra["name"])


def _same_values(va, vb, rel, where):
    """Floats within rel (nested dicts such as a row's "core" metrics too), everything else equal."""
    if isinstance(va, dict) and isinstance(vb, dict):
        assert va.keys() == vb.keys(), where
        for k in va:
            _same_values(va[k], vb[k], rel, f"{where}.{k}")
    elif isinstance(va, float) and isinstance(vb, float):
        assert math.isclose(va, vb, rel_tol=rel, abs_tol=1e-6), (where, va, vb)
    else:
        assert va == vb, where


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_two_processes_sharing_the_sweep_match_one(assets, one_relu, tmp_path, arch):
    one_dir, one = one_relu if arch == "relu" else (tmp_path / "one", _run([*assets, "--arch", arch], tmp_path / "one"))
    two = _run([*assets, "--arch", arch, "--parallel", "models"], tmp_path / "two", nproc=2)
    _same_numbers(one["runs"], two["runs"])
    for r in one["runs"]:
        wa = load_file(one_dir / "saes" / r["name"] / "sae_weights.safetensors")
        wb = load_file(tmp_path / "two" / "saes" / r["name"] / "sae_weights.safetensors")
        for k in wa:  # each SAE starts and trains as in one process (relu: bit for bit; topk: its sparse
            # kernels sum in an order that depends on the stack's shape, so to float precision)
            assert torch.equal(wa[k], wb[k]) if arch == "relu" else torch.allclose(wa[k], wb[k], atol=1e-5), k
    assert not (tmp_path / "two" / "checkpoint").exists()


def test_more_processes_than_grid_points_is_one_clear_error_not_a_hang(assets, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "run.py"),
           *assets, "--l1_exp_low", "0", "--out", str(tmp_path / "r")]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "use --parallel data" in r.stderr


def test_data_parallel_matches_one_process_on_the_whole_batch(assets, one_relu, tmp_path):
    """Averaged half-batch gradients equal whole-batch ones up to summation order."""
    one_dir, one = one_relu
    two = _run([*assets, "--arch", "relu", "--parallel", "data"], tmp_path / "two", nproc=2)
    _same_numbers(one["runs"], two["runs"], rel=1e-3)
    for r in one["runs"]:
        wa = load_file(one_dir / "saes" / r["name"] / "sae_weights.safetensors")
        wb = load_file(tmp_path / "two" / "saes" / r["name"] / "sae_weights.safetensors")
        for k in wa:  # summation order differs; a code crossing zero in one run amplifies that a little
            assert torch.allclose(wa[k], wb[k], atol=1e-3), (r["name"], k)


def test_latent_shards_match_one_process_through_the_model(assets, one_relu, tmp_path):
    """Each SAE's latents split over 2 processes; evaluation (CE/KL through the model included) and saving run on
    the stacks put back together on rank 0."""
    one_dir, one = one_relu
    two = _run([*assets, "--arch", "relu", "--parallel", "latents"], tmp_path / "two", nproc=2)
    # CE loss recovered divides by CE_zero − CE_clean, small for this random model: weights agree to 1e-5 below
    _same_numbers(one["runs"], two["runs"], rel=1e-3)
    for r in one["runs"]:
        a, b = one_dir / "saes" / r["name"], tmp_path / "two" / "saes" / r["name"]
        assert (a / "cfg.json").read_text() == (b / "cfg.json").read_text()
        wa, wb = load_file(a / "sae_weights.safetensors"), load_file(b / "sae_weights.safetensors")
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-5), (r["name"], k)
