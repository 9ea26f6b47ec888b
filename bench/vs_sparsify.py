"""Our TopK training step against EleutherAI sparsify's (`eai-sparsify`, whose fused TopK decoder is the GPU anchor)
on the same shapes and the same batch, in one process, alternating rounds; prints one JSON line.

Each side is its own trainer's step: ours is Trainer.step (forward, backward, the decoder's gradient projection and
renormalisation, clipping, fused Adam); sparsify's is what its Trainer does per batch (SparseCoder.forward, FVU
backward, remove_gradient_parallel_to_decoder_directions, Adam, set_decoder_norm_to_unit_norm). No latent is dead
on either side (AuxK idle), as in bench/sae_step.py. sparsify is not a dependency: without it (`pip install
eai-sparsify natsort schedulefree`) the line says so and the exit status is 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sae_step import median_time, step_seconds  # noqa: E402

from utils import tune_allocator  # noqa: E402


def sparsify_step_seconds(d: int, f: int, k: int, B: int, device: torch.device, steps: int) -> float:
    """Median wall time of one sparsify training step on a fresh SparseCoder (the batch bench/sae_step.py uses)."""
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=f, k=k), device=device, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(B, d, device=device)

    def step() -> None:
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()

    step()
    return median_time(step, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_in", type=int, default=512)
    p.add_argument("--d_sae", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (the median is kept)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians kept)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    line = {"bench": "vs_sparsify", "device": a.device, "d_in": a.d_in, "d_sae": a.d_sae, "k": a.k, "batch": a.batch}
    try:
        import importlib.metadata

        import sparsify.sparse_coder  # noqa: F401

        line["sparsify_version"] = importlib.metadata.version("eai-sparsify")
    except ImportError as e:
        print(
            json.dumps(
                {**line, "skipped": f"sparsify is not installed ({e}): pip install eai-sparsify natsort schedulefree"}
            )
        )
        return
    tune_allocator()
    device = torch.device(a.device)
    ours, theirs = [], []
    for _ in range(a.rounds):
        ours.append(step_seconds("topk", 1, a.batch, a.d_in, a.d_sae, a.k, device, a.steps))
        theirs.append(sparsify_step_seconds(a.d_in, a.d_sae, a.k, a.batch, device, a.steps))
    t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
    line |= {
        "threads": torch.get_num_threads(),
        "ours_tokens_per_s": round(a.batch / t_ours),
        "sparsify_tokens_per_s": round(a.batch / t_theirs),
        "ratio": round(t_theirs / t_ours, 3),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
