"""`matryoshka`: BatchTopK whose nested prefixes of the dictionary must each reconstruct the input on their own
(Bussmann, Nabeshima, Karvonen and Nanda 2025, "Learning multi-level features with Matryoshka SAEs"; Nabeshima
2024), so the first latents learn general features and later ones refine them instead of absorbing them.

Latents [0, w_1), [0, w_2), ..., [0, d_sae) are the levels (`--matryoshka_widths`; a width not below a
dictionary's size is dropped for it, and d_sae is always the last level; by default d_sae/16, /8, /4, /2, d_sae,
the ladder of the paper's own training script, bartbussmann/matryoshka_sae). The loss is the mean over levels of
each prefix's FVU — the uniform level weights dictionary_learning uses by default (SAELens sums the levels, which
only weighs AuxK differently) — plus AuxK on the full dictionary's residual, as both do by default. The selection,
threshold, inference form (JumpReLU with the learned threshold) and SAELens export are BatchTopK's; the levels
shape training only.

Sparse like BatchTopK: the kept entries come in index order, so token-major and, within a token, by latent; each
entry's bag is (token, level), and one embedding-bag gives every level's own part of the reconstruction, whose
running sum over levels is each prefix's reconstruction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sparse_coding.errors import ConfigError
from sparse_coding.saes.batchtopk import BatchTopKSAE
from sparse_coding.saes.kernels import compiled
from sparse_coding.saes.sparse import sparse_decode, split_flat

if TYPE_CHECKING:
    from sparse_coding.training.config import SweepConfig


def level_widths(d_sae: int, widths: list[int] | None) -> list[int]:
    """Gives the prefix sizes of a dictionary of d_sae latents: the given widths below d_sae (or the default
    ladder d_sae/16, d_sae/8, d_sae/4, d_sae/2), then d_sae itself."""
    if widths is None:
        return sorted({w for w in (d_sae // 16, d_sae // 8, d_sae // 4, d_sae // 2) if w > 0}) + [d_sae]
    if any(b <= a for a, b in zip(widths, widths[1:], strict=False)) or min(widths) <= 0:
        raise ValueError(f"matryoshka widths must be positive and strictly increasing, got {widths}")
    return [w for w in widths if w < d_sae] + [d_sae]


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    saelens_training_architecture = "matryoshka_batchtopk"
    saelens_trainer = "matryoshka_batchtopk_sae.MatryoshkaBatchTopKTrainingSAE"
    options = ("matryoshka_widths", "auxk_alpha", "dead_tokens_threshold", "decoder_bias")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        matryoshka_widths: list[int] | None = None,
        **options: Any,
    ):
        super().__init__(d_in, d_sae, hparams, **options)
        self.matryoshka_widths = matryoshka_widths
        self.widths = level_widths(d_sae, matryoshka_widths)
        self.register_buffer("bounds", torch.tensor(self.widths), persistent=False)

    @classmethod
    def check_sweep(cls, cfg: SweepConfig, dict_sizes: list[int]) -> None:
        super().check_sweep(cfg, dict_sizes)
        widths = cfg.matryoshka_widths
        if widths is not None and any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
            raise ConfigError(f"--matryoshka_widths must be strictly increasing, got {widths}")

    @classmethod
    def saelens_trainer_fields(cls, value: float, d_sae: int) -> dict[str, Any]:
        return {"k": int(value), "matryoshka_widths": level_widths(d_sae, None)}

    def reconstruction_loss(
        self, x: Tensor, vals: Tensor, idx: Tensor, total_variance: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The mean over levels of each prefix's FVU; the full dictionary's error is AuxK's target."""
        M, B, G = self.n_models, x.shape[-2], len(self.widths)
        rows, lat = split_flat(idx, self.d_local)
        level = torch.bucketize(lat + self.latent_start, self.bounds, right=True)  # the level a latent first joins
        parts = sparse_decode(vals, lat, self.decoder(), rows * G + level, B * G, self.precision)
        parts = parts.view(M, B, G, self.d_out)
        parts = self.across_latents(parts)
        rest = (self.b_dec[:, None, :] - x).expand(M, B, self.d_out).contiguous()
        sq, err = NestedSquaredError.apply(parts, rest)
        fvu = sq.sum(1) / total_variance  # [M, G]
        full = fvu[:, -1].detach()
        log = {"mse": full * total_variance / (B * self.d_out), "fvu": full, "fvu_levels_mean": fvu.mean(-1).detach()}
        return fvu.mean(-1), err, log


class NestedSquaredError(torch.autograd.Function):
    """P [M, B, G, d] (each level's part of the reconstruction), r [M, B, d] (bias − target) → the squared error of
    every prefix per token, |E_g|² [M, B, G] with E_g = r + Σ_{h≤g} P_h, and the full dictionary's error E_{G−1}
    [M, B, d] (no gradient). On CPU one compiled pass per token (dense_cpu.cpp); the backward is the reverse
    cumulative sum ∂P_h = Σ_{g≥h} 2·∂sq_g·E_g, written over the saved errors (so it runs once per forward)."""

    @staticmethod
    def forward(ctx, P: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        if compiled(P):
            E = torch.empty_like(P)
            sq = torch.ops.sparse_coding.nested_sq_err_forward(P.contiguous(), r.contiguous(), E)
        else:
            E = P.cumsum(2).add_(r[:, :, None, :])
            sq = E.pow(2).sum(-1)
        ctx.save_for_backward(E)
        full = E[:, :, -1].clone()
        ctx.mark_non_differentiable(full)
        return sq, full

    @staticmethod
    def backward(ctx, g_sq: Tensor, _g_full: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        (E,) = ctx.saved_tensors
        if compiled(E):
            torch.ops.sparse_coding.nested_sq_err_backward(E, g_sq.contiguous())
            g_P = E
        else:
            g_P = (2 * g_sq[..., None] * E).flip(2).cumsum(2).flip(2)
        return g_P, g_P[:, :, 0]
