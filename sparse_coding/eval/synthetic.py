"""How well SAEs recover known ground truth (toy data): their dictionaries against the true feature vectors, and
their codes against the true activations on one evaluation set. Streaming sums over batches (float64), for a
whole stack at once, so no [examples, latents] matrix is ever kept; checked in tests on hand-built dictionaries.

Definitions (true codes C [N, n], latent codes Z [N, m]; a feature fires where C > 0, a latent where Z ≠ 0):
- MMCS and Hungarian-matched cosine: `metrics.mmcs`, `metrics.hungarian_mmcs` (true features as reference).
- MCC: the Pearson correlation of every true feature's activations with every latent's over the N examples,
  matched one to one (Hungarian, maximising the summed correlation); the mean over true features, an unmatched
  one counting 0. A constant column correlates 0 with everything.
- Best latent of a true feature: the latent whose firing detects the feature's firing with the highest F1;
  its precision (share of the latent's firings where the feature fires), recall and F1.
- Absorption (hierarchies only): a parent's latent is the latent whose decoder has the highest cosine with the
  parent's vector. If it fires on at least half of the examples where the parent fires with none of its
  children (it detects the parent), the parent's absorption rate is the share of examples where a child fires
  (so the parent fires too) on which that latent is silent: 0 when it fires along with its children, 1 when
  the children's latents have absorbed it. A parent without such a detector is unrecovered, not absorbed
  (`absorption` leaves it out; `parents_without_detector` counts it).
- Splitting: each latent that fires belongs to the true feature it detects best (highest F1); a true feature
  is split when two or more of its latents have precision ≥ 0.5 for it. `splitting` is the share of true
  features that are split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sparse_coding.eval.metrics import cosine_matrix, hungarian_mmcs, matched_mean, mmcs

HIERARCHY_KEYS = (
    "absorption",
    "absorption_by_depth",
    "parents_without_detector",
    "parents_recovered",
    "children_recovered",
    "parents_f1",
    "children_f1",
)


def correlation_from_sums(n: int, a: Tensor, aa: Tensor, b: Tensor, bb: Tensor, ab: Tensor) -> Tensor:
    """Pearson correlations [..., p, q] from sums over n rows: Σa [p], Σa² [p], Σb [..., q], Σb² [..., q],
    Σ a bᵀ [..., p, q]; 0 where either column is constant."""
    cov = ab - a[:, None] * b[..., None, :] / n
    var_a = (aa - a**2 / n).clamp_min(0)
    var_b = (bb - b**2 / n).clamp_min(0)
    denom = (var_a[:, None] * var_b[..., None, :]).sqrt()
    return torch.where(denom > 1e-12 * n, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))


def correlation_matrix(a: Tensor, b: Tensor) -> Tensor:
    """a: [N, n], b: [N, m] → Pearson correlations [n, m] over the N rows (0 where a column is constant)."""
    a, b = a.double(), b.double()
    return correlation_from_sums(a.shape[0], a.sum(0), a.pow(2).sum(0), b.sum(0), b.pow(2).sum(0), a.T @ b)


def mcc(true_codes: Tensor, codes: Tensor) -> float:
    """Mean correlation coefficient of the best one-to-one matching of true features to latents."""
    return matched_mean(correlation_matrix(true_codes, codes))


def f1_matrix(both: Tensor, true_count: Tensor, latent_count: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gives (precision, recall, F1), each [n, m], of every latent as a detector of every true feature, from
    counts of examples where both fire [n, m], where the feature fires [n] and where the latent fires [m]."""
    precision = both / latent_count.clamp_min(1)[None, :]
    recall = both / true_count.clamp_min(1)[:, None]
    f1 = 2 * both / (true_count[:, None] + latent_count[None, :]).clamp_min(1)
    return precision, recall, f1


def split_counts(precision: Tensor, f1: Tensor, latent_count: Tensor, min_precision: float = 0.5) -> Tensor:
    """Gives, per true feature [n], how many latents detect it best with precision ≥ min_precision."""
    owner = f1.argmax(dim=0)  # [m]: the true feature each latent detects best
    latents = torch.arange(f1.shape[1], device=f1.device)
    mine = (latent_count > 0) & (precision[owner, latents] >= min_precision)
    counts = torch.zeros(f1.shape[0], dtype=torch.long, device=f1.device)
    return counts.index_add_(0, owner[mine], torch.ones_like(owner[mine]))


class TruthMeter:
    """Accumulates, over evaluation batches, what the recovery metrics need for every SAE of a stack.

    features [n, d] and parent [n] come from the generator, decoders [M, m, d] from the stack. Memory is
    two [M, n, m] float64 sums (correlations and co-firing counts)."""

    def __init__(self, features: Tensor, parent: Tensor, decoders: Tensor):
        self.features, self.parent, self.decoders = features, parent, decoders
        self.nearest = cosine_matrix(features, decoders).argmax(dim=-1)  # [M, n]: each feature's nearest latent
        self.n = 0
        self.sums: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, true_codes: Tensor, codes: Tensor) -> None:
        """true_codes: [B, n], codes: [M, B, m] on the same examples."""
        c, z = true_codes.double(), codes.double()
        t, f = (true_codes > 0).double(), (codes != 0).double()
        child_fires = self._child_fires(true_codes > 0)
        alone = (true_codes > 0) & ~child_fires
        near = codes.gather(2, self.nearest[:, None, :].expand(-1, codes.shape[1], -1)) != 0  # [M, B, n]
        parts = {
            "c": c.sum(0),
            "cc": c.pow(2).sum(0),
            "z": z.sum(1),
            "zz": z.pow(2).sum(1),
            "cz": torch.einsum("bn,mbk->mnk", c, z),
            "both": torch.einsum("bn,mbk->mnk", t, f),
            "t": t.sum(0),
            "f": f.sum(1),
            "alone": alone.double().sum(0),
            "child": child_fires.double().sum(0),
            "alone_fired": (near & alone).double().sum(1),
            "child_silent": (~near & child_fires).double().sum(1),
        }
        for k, v in parts.items():
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
        self.n += true_codes.shape[0]

    def _child_fires(self, active: Tensor) -> Tensor:
        """[B, n]: where some child of each feature fires."""
        kids = self.parent >= 0
        spread = torch.zeros(active.shape, dtype=torch.float32, device=active.device)
        return spread.index_add_(1, self.parent[kids], active[:, kids].float()) > 0

    def result(self, m: int, depth: Tensor, threshold: float = 0.9) -> dict[str, Any]:
        """Gives every recovery number of SAE m for a results row (see the module docstring)."""
        s, decoder = self.sums, self.decoders[m]
        corr = correlation_from_sums(self.n, s["c"], s["cc"], s["z"][m], s["zz"][m], s["cz"][m])
        precision, recall, f1 = f1_matrix(s["both"][m], s["t"], s["f"][m])
        best = f1.argmax(dim=1, keepdim=True)
        best_f1 = f1.gather(1, best)[:, 0]
        best_cos = cosine_matrix(self.features, decoder).amax(dim=1)
        row: dict[str, Any] = {
            "mmcs": float(mmcs(self.features, decoder)),
            "mmcs_share_above": float((best_cos > threshold).float().mean()),
            "hungarian_mmcs": hungarian_mmcs(self.features, decoder),
            "mcc": matched_mean(corr),
            "precision": float(precision.gather(1, best).mean()),
            "recall": float(recall.gather(1, best).mean()),
            "f1": float(best_f1.mean()),
            "splitting": float((split_counts(precision, f1, s["f"][m]) >= 2).float().mean()),
        }
        if (self.parent < 0).all():
            return {**row, **dict.fromkeys(HIERARCHY_KEYS)}
        return {**row, **self._hierarchy(m, depth, best_cos, best_f1, threshold)}

    def _hierarchy(self, m: int, depth: Tensor, best_cos: Tensor, best_f1: Tensor, threshold: float) -> dict[str, Any]:
        s = self.sums
        is_parent = torch.isin(torch.arange(len(self.parent), device=self.parent.device), self.parent[self.parent >= 0])
        detects = s["alone_fired"][m] >= 0.5 * s["alone"].clamp_min(1)
        usable = is_parent & detects & (s["child"] > 0)
        rate = torch.where(usable, s["child_silent"][m] / s["child"].clamp_min(1), torch.nan)
        groups = {"parents": is_parent, "children": self.parent >= 0}
        return {
            "absorption": _nanmean(rate),
            "absorption_by_depth": {str(k): _nanmean(rate[depth == k]) for k in range(int(depth.max()))},
            "parents_without_detector": int((is_parent & ~detects).sum()),
            **{f"{g}_recovered": float((best_cos[mask] > threshold).float().mean()) for g, mask in groups.items()},
            **{f"{g}_f1": float(best_f1[mask].mean()) for g, mask in groups.items()},
        }


def _nanmean(x: Tensor) -> float | None:
    """Mean over the defined (non-NaN) entries; None when there are none."""
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else None


def truth_metrics(
    features: Tensor,
    decoder: Tensor,
    true_codes: Tensor,
    codes: Tensor,
    parent: Tensor,
    depth: Tensor,
    threshold: float = 0.9,
) -> dict[str, Any]:
    """The recovery numbers of one SAE: decoder [m, d], its codes [N, m] on examples with true codes [N, n]."""
    meter = TruthMeter(features, parent, decoder[None])
    meter.update(true_codes, codes[None])
    return meter.result(0, depth, threshold)
