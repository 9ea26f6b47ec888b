"""Every number a sweep reports, as pure functions over tensors (checked in tests on hand-computed cases).

Definitions:
- MMCS(reference, candidates): for each reference direction, the largest cosine similarity with any candidate,
  averaged over the reference. With the ground truth as reference it says how much of the truth was found; with
  a smaller dictionary as reference and the next larger one as candidates it is "MMCS with larger", usable when
  no ground truth exists.
- Hungarian MMCS: the same, but each candidate may be matched to at most one reference direction (the matching
  that maximises the summed similarity, scipy's linear_sum_assignment).
- Share above threshold: the fraction of reference directions whose best cosine similarity exceeds it.
- L0: mean number of non-zero codes per example. Dead features: features that never fired on the evaluation
  set. MSE: mean squared error per element. FVU: Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the evaluation set.
- The shrinkage and similarity statistics of SAELens' core evals (L1, cosine, L2 ratio, relative
  reconstruction bias) are accumulated by the same meter; eval/core.py names them as SAEBench does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """a: [..., n, d], b: [..., m, d] → cosine similarities [..., n, m]."""
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.mT


def mmcs(reference: Tensor, candidates: Tensor) -> Tensor:
    """reference: [..., n, d], candidates: [..., m, d] → mean over reference of the max cosine similarity."""
    return cosine_matrix(reference, candidates).amax(dim=-1).mean(dim=-1)


def share_above(reference: Tensor, candidates: Tensor, threshold: float) -> Tensor:
    """Fraction of reference directions whose best cosine similarity with a candidate exceeds `threshold`."""
    return (cosine_matrix(reference, candidates).amax(dim=-1) > threshold).float().mean(dim=-1)


def hungarian_mmcs(reference: Tensor, candidates: Tensor) -> float:
    """reference: [n, d], candidates: [m, d] → mean similarity under the best one-to-one matching.
    With n > m only m reference directions can be matched; the rest count as 0."""
    return matched_mean(cosine_matrix(reference, candidates))


def matched_mean(sims: Tensor) -> float:
    """sims [n, m] → the mean over rows of the similarity under the best one-to-one matching (Hungarian;
    with n > m the unmatched rows count 0)."""
    s = sims.double().cpu().numpy()
    rows, cols = linear_sum_assignment(s, maximize=True)
    return float(s[rows, cols].sum() / s.shape[0])


def mmcs_with_larger(small: Tensor, large: Tensor, threshold: float = 0.9) -> dict[str, float]:
    """small: [n, d], large: [m, d] dictionaries → plain MMCS, Hungarian MMCS and share above threshold
    (one similarity matrix serves all three)."""
    sims = cosine_matrix(small, large)
    best = sims.amax(dim=-1)
    return {
        "plain": float(best.mean()),
        "hungarian": matched_mean(sims),
        "share_above": float((best > threshold).float().mean()),
    }


@dataclass
class ReconstructionStats:
    """Per-model evaluation totals, all [M]; fire_counts [M, d_sae]. The shrinkage and L1 fields follow SAELens'
    core evals (see eval/core.py) and are None where a caller built the stats without them."""

    mse: Tensor  # per element
    fvu: Tensor
    l0: Tensor
    fire_counts: Tensor
    n_examples: int
    mse_per_token: Tensor | None = None  # mean over tokens of ‖x − x̂‖² (SAELens' `mse`)
    l1: Tensor | None = None  # mean over tokens of Σ|code|
    cossim: Tensor | None = None  # mean over tokens of cos(x, x̂)
    l2_norm_in: Tensor | None = None  # mean ‖x‖ ([M], the same for every model)
    l2_norm_out: Tensor | None = None  # mean ‖x̂‖
    l2_ratio: Tensor | None = None  # mean ‖x̂‖ / ‖x‖ (‖x‖ < 1e-4 divides by 1, as SAELens)
    relative_reconstruction_bias: Tensor | None = None  # E‖x̂‖² / E[x·x̂] (Rajamanoharan et al. 2024, eq. 10)

    @property
    def dead_features(self) -> Tensor:
        return (self.fire_counts == 0).sum(dim=-1)

    @property
    def feature_density(self) -> Tensor:
        """Fraction of examples on which each feature fired, [M, d_sae]."""
        return self.fire_counts.double() / self.n_examples


class ReconstructionMeter:
    """Accumulates reconstruction statistics over evaluation batches (float64 sums, exact across batches)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.n = 0
        self.d = 0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, codes: Tensor) -> None:
        """x: [B, d], x_hat: [M, B, d], codes: [M, B, d_sae]."""
        x64, xh = x.double(), x_hat.double()
        norm_in, norm_out = x64.norm(dim=-1), xh.norm(dim=-1)  # [B], [M, B]
        dot = (xh * x64).sum(-1)
        parts = {
            "sq_err": (xh - x64).pow(2).sum(dim=(1, 2)),
            "l0": (codes != 0).sum(dim=(1, 2)).double(),
            "l1": codes.double().abs().sum(dim=(1, 2)),
            "fires": (codes != 0).sum(dim=1),
            "x": x64.sum(0),
            "x_sq": x64.pow(2).sum(),
            "norm_in": norm_in.sum().expand(x_hat.shape[0]),
            "norm_out": norm_out.sum(-1),
            "ratio": (norm_out / torch.where(norm_in < 1e-4, 1.0, norm_in)).sum(-1),
            "cos": (dot / (norm_in * norm_out).clamp_min(1e-30)).sum(-1),
            "out_sq": norm_out.pow(2).sum(-1),
            "dot": dot.sum(-1),
        }
        for k, v in parts.items():
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
        self.n += x.shape[0]
        self.d = x.shape[1]

    def result(self) -> ReconstructionStats:
        if not self.sums:
            raise ValueError("no evaluation batches were seen")
        s, n = self.sums, self.n
        total_variance = s["x_sq"] - s["x"].pow(2).sum() / n  # Σ‖x − mean‖²
        return ReconstructionStats(
            mse=s["sq_err"] / (n * self.d),
            fvu=s["sq_err"] / total_variance,
            l0=s["l0"] / n,
            fire_counts=s["fires"],
            n_examples=n,
            mse_per_token=s["sq_err"] / n,
            l1=s["l1"] / n,
            cossim=s["cos"] / n,
            l2_norm_in=s["norm_in"] / n,
            l2_norm_out=s["norm_out"] / n,
            l2_ratio=s["ratio"] / n,
            relative_reconstruction_bias=s["out_sq"] / s["dot"],
        )


def ce_loss_recovered(ce_clean: Tensor | float, ce_zero: Tensor | float, ce_sae: Tensor | float) -> Tensor | float:
    """(CE_zero − CE_sae) / (CE_zero − CE_clean): 1 when splicing the reconstruction in at the hook leaves the
    model's next-token loss as it was, 0 when it is as bad as zero-ablating the hook."""
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def kl_score(kl_zero: Tensor | float, kl_sae: Tensor | float) -> Tensor | float:
    """(KL_zero − KL_sae) / KL_zero, KL measured from the clean model: 1 when splicing the reconstruction in
    leaves the next-token distribution as it was, 0 when it moves it as far as zero-ablating the hook."""
    return (kl_zero - kl_sae) / kl_zero


def kl_per_position(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p ‖ q) in nats at every position [...], p and q the softmaxes of logits [..., V]."""
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)
