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
    """Per-model evaluation totals, all [M]; fire_counts [M, d_sae]."""

    mse: Tensor
    fvu: Tensor
    l0: Tensor
    fire_counts: Tensor
    n_examples: int

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
        self.sq_err = self.l0_sum = self.fire_counts = None
        self.x_sum = self.x_sq_sum = None
        self.n = 0
        self.d = 0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, codes: Tensor) -> None:
        """x: [B, d], x_hat: [M, B, d], codes: [M, B, d_sae]."""
        x64 = x.double()
        sq_err = (x_hat.double() - x64).pow(2).sum(dim=(1, 2))
        l0 = (codes != 0).sum(dim=(1, 2)).double()
        fires = (codes != 0).sum(dim=1)
        if self.sq_err is None:
            self.sq_err, self.l0_sum, self.fire_counts = sq_err, l0, fires
            self.x_sum, self.x_sq_sum = x64.sum(0), x64.pow(2).sum()
        else:
            self.sq_err += sq_err
            self.l0_sum += l0
            self.fire_counts += fires
            self.x_sum += x64.sum(0)
            self.x_sq_sum += x64.pow(2).sum()
        self.n += x.shape[0]
        self.d = x.shape[1]

    def result(self) -> ReconstructionStats:
        if self.sq_err is None:
            raise ValueError("no evaluation batches were seen")
        total_variance = self.x_sq_sum - self.x_sum.pow(2).sum() / self.n  # Σ‖x − mean‖²
        return ReconstructionStats(
            mse=self.sq_err / (self.n * self.d),
            fvu=self.sq_err / total_variance,
            l0=self.l0_sum / self.n,
            fire_counts=self.fire_counts,
            n_examples=self.n,
        )


def ce_loss_recovered(ce_clean: Tensor | float, ce_zero: Tensor | float, ce_sae: Tensor | float) -> Tensor | float:
    """(CE_zero − CE_sae) / (CE_zero − CE_clean): 1 when splicing the reconstruction in at the hook leaves the
    model's next-token loss as it was, 0 when it is as bad as zero-ablating the hook."""
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Mean over positions of KL(p ‖ q) in nats, p and q the softmaxes of logits [..., V]."""
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()
