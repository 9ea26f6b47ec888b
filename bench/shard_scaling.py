"""Latent sharding (--parallel latents) against one process: training tokens/s and, per rank, peak memory and the
bytes of weights + Adam state, for one SAE of each size asked; then the largest d_sae that fits each process count in
a memory budget, from a straight line through the measured peaks (peak = fixed + per-latent · d_sae).

The driver starts `torchrun --nproc_per_node N` of this script for N = 1 and 2 (gloo on CPU, NCCL on CUDA) and
prints one JSON line per (ranks, d_sae) and per process count's fit. Each rank times the trainer's own step on the
same random batches (every rank sees the whole batch, as in training), after warm-up steps that create Adam's
state. On a 2-core machine the 2 ranks get one thread each against one process's two, so tokens/s compares the two
ways of using the same cores.

    python bench/shard_scaling.py --arch topk --d_in 512 --d_sae 8192 32768 --batch 2048 --budget_gib 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(args: argparse.Namespace) -> None:
    """One rank: trains one SAE of args.d_sae[0] latents on its share, prints its JSON line."""
    from sparse_coding.saes import sae_class
    from sparse_coding.training.distributed import init_distributed, latent_shard, shutdown
    from sparse_coding.training.trainer import Trainer
    from utils import resolve_device, tune_allocator

    tune_allocator()
    info, device = init_distributed(resolve_device(args.device))
    cls, d_sae = sae_class(args.arch), args.d_sae[0]
    knob = {"k": args.k, "l1_alpha": 1e-3, "l0_coef": 1.0}[cls.knob]
    shard = {"shard": latent_shard(d_sae, info)} if info.active else {}
    torch.manual_seed(0)
    sae = cls(args.d_in, d_sae, [{cls.knob: knob}], **shard).to(device)
    trainer = Trainer([sae], lr=1e-4)
    g = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randn(args.batch, args.d_in, generator=g, device=device) for _ in range(4)]
    for i in range(args.warmup):
        trainer.step(batches[i % 4])
    sync()
    start = time.perf_counter()
    for i in range(args.steps):
        trainer.step(batches[i % 4])
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    state = [p for p in sae.parameters()] + [t for s in trainer.opt.state.values() for t in s.values() if t.dim()]
    row = {
        "ranks": info.world,
        "rank": info.rank,
        "arch": args.arch,
        "d_in": args.d_in,
        "d_sae": d_sae,
        "batch": args.batch,
        "tokens_per_s": round(args.batch / seconds, 1),
        "weights_adam_mib": round(sum(t.numel() * t.element_size() for t in state) / 2**20, 2),
        "peak_mib": round(peak_bytes(device) / 2**20, 1),
        "device": str(device),
    }  # fmt: skip
    Path(args.results, f"rank{info.rank}.json").write_text(json.dumps(row))  # ranks share stdout: a file each
    shutdown(info)


def peak_bytes(device: torch.device) -> int:
    """The process's peak memory: the GPU's allocator peak on CUDA, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_ranks(n: int, d_sae: int, args: argparse.Namespace) -> list[dict]:
    flags = [
        *("--arch", args.arch, "--d_in", str(args.d_in), "--d_sae", str(d_sae), "--batch", str(args.batch)),
        *("--k", str(args.k), "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device),
    ]
    threads = max(1, (os.cpu_count() or 1) // n)  # the same cores, split between the ranks
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as results:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "--results", results, *flags]  # fmt: skip
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{n} ranks at d_sae {d_sae} failed:\n{out.stderr[-3000:]}")
        return [json.loads(Path(results, f"rank{r}.json").read_text()) for r in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="topk", help="SAE architecture")
    p.add_argument("--d_in", type=int, default=512, help="input width")
    p.add_argument("--d_sae", type=int, nargs="+", default=[8192, 32768], help="dictionary sizes measured")
    p.add_argument("--batch", type=int, default=2048, help="tokens per step")
    p.add_argument("--k", type=int, default=32, help="k of the TopK family")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (they create Adam's state)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="process counts compared")
    p.add_argument("--budget_gib", type=float, default=4.0, help="memory per process for the largest-d_sae fit")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per rank)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--results", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    for n in args.ranks:
        peaks = []
        for d_sae in args.d_sae:
            rows = run_ranks(n, d_sae, args)
            for r in rows:
                print(json.dumps(r), flush=True)
            peaks.append((d_sae, max(r["peak_mib"] for r in rows)))
        if len(peaks) >= 2:  # peak = fixed + slope · d_sae through the smallest and largest size measured
            (a, pa), (b, pb) = peaks[0], peaks[-1]
            slope = (pb - pa) / (b - a)
            fixed = pa - slope * a
            largest = int((args.budget_gib * 1024 - fixed) / slope) if slope > 0 else None
            fit = {"ranks": n, "budget_gib": args.budget_gib, "fixed_mib": round(fixed, 1)}
            print(json.dumps({**fit, "mib_per_1k_latents": round(1000 * slope, 2), "largest_d_sae": largest}))


if __name__ == "__main__":
    main()
