"""Scoring trained stacks on held-out data: reconstruction statistics on stored activations, and CE loss
recovered and KL through the language model with each SAE's reconstruction spliced in at its hook."""

from __future__ import annotations

import torch
from torch import Tensor

from sparse_coding.eval import metrics
from sparse_coding.eval.synthetic import TruthMeter
from sparse_coding.models.language_model import LanguageModel, next_token_ce
from sparse_coding.saes import SAE


@torch.no_grad()
def evaluate(stacks: list[SAE], x_eval: Tensor, batch_size: int) -> list[metrics.ReconstructionStats]:
    """Gives reconstruction statistics of every stack on held-out activations x_eval [N, d]."""
    meters = [metrics.ReconstructionMeter() for _ in stacks]
    for xb in x_eval.split(batch_size):
        xb = xb.float()
        for sae, meter in zip(stacks, meters, strict=True):
            codes = sae.encode(xb)
            meter.update(xb, sae.decode(codes), codes)
    return [m.result() for m in meters]


@torch.no_grad()
def truth_meters(
    stacks: list[SAE], features: Tensor, parent: Tensor, x_eval: Tensor, true_codes: Tensor, batch_size: int
) -> list[TruthMeter]:
    """Gives, per stack, the recovery sums of every SAE against the true codes [N, n] of x_eval [N, d]."""
    meters = [TruthMeter(features, parent, s.decoder().detach()) for s in stacks]
    for xb, cb in zip(x_eval.split(batch_size), true_codes.split(batch_size), strict=True):
        for sae, meter in zip(stacks, meters, strict=True):
            meter.update(cb, sae.encode(xb.float()))
    return meters


@torch.no_grad()
def ce_and_kl(lm: LanguageModel, hook: str, stack: SAE, tokens: Tensor, budget: int = 2**27) -> dict[str, Tensor]:
    """CE loss recovered and KL for every SAE of a stack on held-out rows tokens [R, T]; the M models run as
    one batch of M·r rows, r chosen so the biggest intermediate stays under `budget` elements."""
    M, (R, T) = stack.n_models, tokens.shape
    sums = {"ce_clean": 0.0, "ce_zero": 0.0, "ce_sae": torch.zeros(M), "kl": torch.zeros(M)}
    probe = lm.logits(tokens[:1])
    r = max(1, min(R, budget // (M * T * max(probe.shape[-1], stack.d_sae))))
    for start in range(0, R, r):
        rows = tokens[start : start + r]
        n = rows.shape[0]
        clean = lm.logits(rows)
        zero = lm.logits(rows, hook, torch.zeros_like)

        def splice(act: Tensor) -> Tensor:
            x = act.reshape(M, -1, act.shape[-1])  # [M, n·T, d]: model m's copy of the rows
            return stack.decode(stack.encode(x.float())).to(act.dtype).reshape(act.shape)

        spliced = lm.logits(rows.repeat(M, 1), hook, splice).view(M, n, T, -1)
        sums["ce_clean"] += float(next_token_ce(clean, rows)) * n
        sums["ce_zero"] += float(next_token_ce(zero, rows)) * n
        for m in range(M):
            sums["ce_sae"][m] += float(next_token_ce(spliced[m], rows)) * n
            sums["kl"][m] += float(metrics.kl_divergence(clean, spliced[m])) * n
    ce_clean, ce_zero = sums["ce_clean"] / R, sums["ce_zero"] / R
    ce_sae = sums["ce_sae"] / R
    return {
        "ce_clean": torch.full((M,), ce_clean),
        "ce_zero": torch.full((M,), ce_zero),
        "ce_sae": ce_sae,
        "ce_loss_recovered": metrics.ce_loss_recovered(ce_clean, ce_zero, ce_sae),
        "kl": sums["kl"] / R,
    }
