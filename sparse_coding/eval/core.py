"""SAEBench's core metrics for one SAE, under SAEBench's keys and categories, so results line up with published
tables. The numbers come from the reconstruction meter (metrics.py), the CE/KL pass through the model
(reconstruction.ce_and_kl) and the SAE's weights; this module only names and assembles them.

Definitions follow SAELens' own evals functions (sae_lens/evals.py, the version pinned here), checked against
them in tests/pipelines/test_evaluate.py on the same tokens:
- explained_variance = 1 − Σ‖x − x̂‖² / Σ‖x − mean x‖² over all evaluated tokens (= 1 − FVU).
- mse = mean over tokens of Σ_d (x − x̂)² (SAELens' convention; results.json's own `mse` is per element).
- cossim, l2_norm_in, l2_norm_out, l2_ratio, relative_reconstruction_bias, l0, l1: see ReconstructionStats.
  Where SAELens averages relative_reconstruction_bias over evaluation batches, this is its value over the whole
  set at once (the two agree for one batch).
- ce_loss_score = (CE_ablation − CE_sae) / (CE_ablation − CE_clean); kl_div_score = (KL_ablation − KL_sae) /
  KL_ablation, the ablation zeroing the hooked activation; special tokens keep their own activation and are
  left out (see ce_and_kl).
- misc_metrics: frac_alive (share of latents that fired at least once), freq_over_1/10_percent (share of
  latents firing on more than 1 % / 10 % of tokens), normalized_freq_over_1/10_percent (their share of all
  firings), average_max_encoder/decoder_cosine_sim (each latent's highest cosine with another latent's
  encoder / decoder vector, averaged), as SAEBench's core eval.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sparse_coding.eval.metrics import ReconstructionStats
from sparse_coding.files import finite_or_none
from sparse_coding.saes import SAE


def max_other_cosine(rows: Tensor, chunk: int = 2048) -> Tensor:
    """rows [n, d] → for each row the largest cosine similarity with any other row [n] (in chunks of rows, so
    the n × n matrix is never whole)."""
    unit = rows.float() / rows.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = []
    for start in range(0, unit.shape[0], chunk):
        sims = unit[start : start + chunk] @ unit.T
        idx = torch.arange(sims.shape[0], device=sims.device)
        sims[idx, start + idx] = float("-inf")
        out.append(sims.amax(dim=1))
    return torch.cat(out)


@torch.no_grad()
def weight_metrics(sae: SAE, m: int) -> dict[str, float]:
    """Average max cosine between encoder vectors and between decoder vectors of SAE m (the vectors it computes
    with: its SAELens weights; a cross-layer transcoder's decoders over all its target layers)."""
    return {
        "average_max_encoder_cosine_sim": float(max_other_cosine(sae.encoder()[m].detach()).mean()),
        "average_max_decoder_cosine_sim": float(max_other_cosine(sae.decoder()[m].detach()).mean()),
    }


def density_metrics(density: Tensor) -> dict[str, float]:
    """SAEBench's statistics of the feature-density histogram, density [d_sae] = share of tokens each fires on."""
    density = density.double()
    total = density.sum()
    out = {"frac_alive": float((density > 0).double().mean())}
    for pct, cut in (("1", 0.01), ("10", 0.1)):
        over = density > cut
        out[f"freq_over_{pct}_percent"] = float(over.double().mean())
        out[f"normalized_freq_over_{pct}_percent"] = float(density[over].sum() / total) if total > 0 else 0.0
    return out


def core_metrics(
    stats: ReconstructionStats,
    m: int,
    weights: dict[str, float],
    through_model: dict[str, Tensor] | None,
    tokens: tuple[int, int] = (0, 0),
) -> dict[str, dict[str, Any]]:
    """SAEBench's metric categories for SAE m: reconstruction on activations (stats), its weights
    (weight_metrics), and CE/KL through the model (ce_and_kl's result, or None without an LM head, when
    those fields are null). tokens: the tokens in the rows run through the model and in those whose activations
    were scored, special ones included (SAELens' token_stats count whole batches)."""
    t = through_model

    def tm(key: str) -> float | None:
        return None if t is None else float(t[key][m])

    out = {
        "model_behavior_preservation": {
            "kl_div_score": tm("kl_score"),
            "kl_div_with_ablation": tm("kl_zero"),
            "kl_div_with_sae": tm("kl"),
        },
        "model_performance_preservation": {
            "ce_loss_score": tm("ce_loss_recovered"),
            "ce_loss_with_ablation": tm("ce_zero"),
            "ce_loss_with_sae": tm("ce_sae"),
            "ce_loss_without_sae": tm("ce_clean"),
        },
        "reconstruction_quality": {
            "explained_variance": 1.0 - float(stats.fvu[m]),
            "mse": float(stats.mse_per_token[m]),
            "cossim": float(stats.cossim[m]),
        },
        "shrinkage": {
            "l2_norm_in": float(stats.l2_norm_in[m]),
            "l2_norm_out": float(stats.l2_norm_out[m]),
            "l2_ratio": float(stats.l2_ratio[m]),
            "relative_reconstruction_bias": float(stats.relative_reconstruction_bias[m]),
        },
        "sparsity": {"l0": float(stats.l0[m]), "l1": float(stats.l1[m])},
        "token_stats": {
            "total_tokens_eval_reconstruction": tokens[0] if t is not None else 0,
            "total_tokens_eval_sparsity_variance": tokens[1],
        },
        "misc_metrics": {**density_metrics(stats.feature_density[m]), **weights},
    }
    # JSON has no NaN: a metric that cannot be computed is null
    return {cat: {k: finite_or_none(v) if isinstance(v, float) else v for k, v in d.items()} for cat, d in out.items()}
