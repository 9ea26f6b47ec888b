"""bench/sae_step.py end to end at toy size (so it cannot rot between the occasions it runs at full size), and its
count of what a step dispatches against a hand-counted case."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench_module():
    spec = importlib.util.spec_from_file_location("sae_step", ROOT / "bench" / "sae_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_op_counter_tells_kernels_views_and_host_reads_apart():
    x = torch.randn(4, 6)
    with _bench_module()._OpCounter() as counter:
        y = x.view(6, 4).t()  # two views
        z = (y + 1).relu_()  # two kernels
        assert float(z.sum()) >= 0  # a kernel and a host read
    assert (counter.ops, counter.views, counter.host_reads) == (3, 2, 1)


def test_the_bench_prints_the_machine_then_a_row_per_measurement():
    cmd = [sys.executable, str(ROOT / "bench" / "sae_step.py"), "--arch", "topk", "--k", "4", "--d_in", "16",
           "--d_sae", "64", "--batch", "32", "--steps", "1", "--repeats", "1", "--rounds", "1",
           "--train_dtype", "bf16", "--compare", "fp32"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    header, row = (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))
    assert header["R_bf16_over_fp32"] > 0 and header["gemm"] == [1, 32, 16, 64]
    assert row["arch"] == "topk" and row["tokens_per_s"] > 0 and row["fp32_tokens_per_s"] > 0
    assert row["ratio_vs_fp32"] == "no bf16 units" or row["ratio_vs_fp32"] > 0
    # a step launches dozens of kernels and reads the number of dead latents back once (AuxK's size)
    assert row["ops_per_step"] > 20 and row["views_per_step"] > 0 and row["host_reads_per_step"] >= 1
