"""What a model-diffing crosscoder says about its two models (run.py --diff_model; Lindsey et al. 2024).

Each latent has one decoder vector per model, d_A and d_B (the two halves of its row). Its relative decoder norm
r = ‖d_B‖ / (‖d_A‖ + ‖d_B‖) places it between "only in A" (r = 0) and "only in B" (r = 1); latents both models
use sit near 0.5. Counted here: A-only r < 0.1, B-only r > 0.9, shared 0.3 ≤ r ≤ 0.7 (the rest between), and, for
the shared ones, the cosine of d_A and d_B (near 1: the same direction in both models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_coding.eval.plots import histogram

ONLY, SHARED = 0.1, (0.3, 0.7)


def relative_norms(decoder: Tensor) -> tuple[Tensor, Tensor]:
    """decoder [F, 2·d] (model A's half, then B's) → (relative norm ‖d_B‖ / (‖d_A‖ + ‖d_B‖) [F], cosine of d_A
    and d_B [F]); a latent with a zero decoder gets r = 0.5 and cosine 0."""
    d_a, d_b = decoder.detach().float().chunk(2, dim=-1)
    n_a, n_b = d_a.norm(dim=-1), d_b.norm(dim=-1)
    r = torch.where(n_a + n_b > 0, n_b / (n_a + n_b).clamp_min(1e-30), torch.full_like(n_a, 0.5))
    cos = (d_a * d_b).sum(-1) / (n_a * n_b).clamp_min(1e-30)
    return r, cos


def diff_summary(r: Tensor, cos: Tensor) -> dict[str, Any]:
    """A results row's view: how many latents are A-only, B-only, shared (and between), and the mean decoder
    cosine of the shared ones (null when none is)."""
    shared = (r >= SHARED[0]) & (r <= SHARED[1])
    a_only, b_only = r < ONLY, r > 1 - ONLY
    return {
        "latents_a_only": int(a_only.sum()),
        "latents_b_only": int(b_only.sum()),
        "latents_shared": int(shared.sum()),
        "latents_between": int((~(shared | a_only | b_only)).sum()),
        "shared_decoder_cosine_mean": round(float(cos[shared].mean()), 6) if bool(shared.any()) else None,
    }


def plot_relative_norms(r: Tensor, names: tuple[str, str], title: str, path: Path) -> Path:
    """The histogram of relative decoder norms, with the A-only / shared / B-only bands marked."""
    bands = [(0.0, ONLY, f"{names[0]} only"), (*SHARED, "shared"), (1 - ONLY, 1.0, f"{names[1]} only")]
    return histogram(r.numpy(), bins=50, value_range=(0.0, 1.0), bands=bands, title=title,
                     xlabel=f"relative decoder norm ‖d_B‖ / (‖d_A‖ + ‖d_B‖)   (A = {names[0]}, B = {names[1]})",
                     ylabel="latents", path=path)  # fmt: skip
