"""Scoring trained stacks on held-out data: reconstruction statistics on stored activations, recovery of the
ground truth on toy data, and CE loss recovered and KL through the language model with each SAE's
reconstruction spliced in at its hook."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sparse_coding.eval import metrics
from sparse_coding.eval.synthetic import TruthMeter
from sparse_coding.models.language_model import LanguageModel, token_ce
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


def splicer(stack: SAE, keep: Tensor) -> Callable[[Tensor], Tensor]:
    """The hook replacement of ce_and_kl: activations [M·n, T, d] (model m's copy of the rows in block m) →
    each model's reconstruction where keep [M·n, T] is true, the activation itself elsewhere."""

    def splice(act: Tensor) -> Tensor:
        x = act.reshape(stack.n_models, -1, act.shape[-1])
        x_hat = stack.decode(stack.encode(x.float())).to(act.dtype).reshape(act.shape)
        return torch.where(keep[..., None], x_hat, act)

    return splice


@torch.no_grad()
def ce_and_kl(
    lm: LanguageModel, hook: str, stack: SAE, tokens: Tensor, ignore_ids: Sequence[int] = (), budget: int = 2**27
) -> dict[str, Tensor]:
    """CE loss and KL through the model with each SAE's reconstruction spliced in at the hook, on held-out rows
    tokens [R, T], as SAELens' core evals define them: positions holding a token in ignore_ids (its special
    tokens) keep their own activation and are left out of the means (CE at position t, which predicts t + 1, when
    token t is one). Gives, each [M]: ce_clean, ce_zero (the hook zero-ablated), ce_sae, ce_loss_recovered,
    kl (KL(clean ‖ spliced) per position), kl_zero (KL(clean ‖ zero-ablated)) and kl_score. The M models run as
    one batch of M·r rows, r chosen so the biggest intermediate stays under `budget` elements."""
    M, (R, T) = stack.n_models, tokens.shape
    sums = {k: torch.zeros(M, dtype=torch.float64) for k in ("ce_clean", "ce_zero", "ce_sae", "kl", "kl_zero")}
    counts = {"ce": 0, "kl": 0}
    probe = lm.logits(tokens[:1])
    r = max(1, min(R, budget // (M * T * max(probe.shape[-1], stack.d_sae))))
    for start in range(0, R, r):
        rows = tokens[start : start + r]
        n = rows.shape[0]
        keep = ~torch.isin(rows, torch.tensor(list(ignore_ids), dtype=rows.dtype)).to(lm.device)  # [n, T]
        clean = lm.logits(rows)
        zero = lm.logits(rows, hook, torch.zeros_like)

        spliced = lm.logits(rows.repeat(M, 1), hook, splicer(stack, keep.repeat(M, 1))).view(M, n, T, -1)
        ce_keep, kl_keep = keep[:, :-1], keep
        sums["ce_clean"] += token_ce(clean, rows)[ce_keep].double().sum()
        sums["ce_zero"] += token_ce(zero, rows)[ce_keep].double().sum()
        sums["kl_zero"] += metrics.kl_per_position(clean, zero)[kl_keep].double().sum()
        for m in range(M):
            sums["ce_sae"][m] += token_ce(spliced[m], rows)[ce_keep].double().sum()
            sums["kl"][m] += metrics.kl_per_position(clean, spliced[m])[kl_keep].double().sum()
        counts["ce"] += int(ce_keep.sum())
        counts["kl"] += int(kl_keep.sum())
    out = {k: (v / counts["ce" if k.startswith("ce") else "kl"]).float() for k, v in sums.items()}
    out["ce_loss_recovered"] = metrics.ce_loss_recovered(out["ce_clean"], out["ce_zero"], out["ce_sae"])
    out["kl_score"] = metrics.kl_score(out["kl_zero"], out["kl"])
    return out
