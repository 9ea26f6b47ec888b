"""Scoring trained stacks on held-out data: reconstruction statistics on stored activations, recovery of the
ground truth on toy data, and CE loss recovered and KL through the language model with each SAE's output
spliced in at its hook.

Through the model, only a language-model head loaded from the checkpoint is used (LanguageModel.head):
- causal: next-token cross-entropy at the kept positions of 0..T-2 (position t predicts token t + 1, and is
  left out when token t is excluded, as SAELens' evals do); KL over the kept positions.
- masked: a seeded MASK_FRACTION of the kept positions of each row is replaced by the mask token; CE and KL are
  over those positions only: how well the model still fills in masked tokens.
The SAE's output replaces the activation at the positions whose (original) token the store keeps; excluded
special tokens keep their own activation. Zero ablation zeroes every position, excluded ones included, as
SAELens' evals (and so SAEBench's published ce_loss_score) do. A transcoder reads the module's input and replaces
its output; a cross-layer transcoder replaces all its layers' MLP outputs in the same pass (each layer reading the
input the replaced layers before it left), and its zero ablation zeroes all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from sparse_coding.eval import metrics
from sparse_coding.eval.synthetic import TruthMeter
from sparse_coding.models.language_model import JOIN, LanguageModel
from sparse_coding.models.paired import SIDES, PairedModel
from sparse_coding.saes import SAE

MASK_FRACTION = 0.15  # BERT's share of masked tokens


@torch.no_grad()
def evaluate(stacks: list[SAE], x_eval: Tensor, batch_size: int) -> list[metrics.ReconstructionStats]:
    """Gives reconstruction statistics of every stack on held-out rows x_eval [N, d] (a transcoder's [N,
    d_in + d_out]: input and target side by side)."""
    meters = [metrics.ReconstructionMeter() for _ in stacks]
    for batch in x_eval.split(batch_size):
        x, target = stacks[0].split_batch(batch.float())
        for sae, meter in zip(stacks, meters, strict=True):
            codes = sae.encode(x)
            meter.update(target, sae.decode(codes, x), codes)
    return [m.result() for m in meters]


@torch.no_grad()
def truth_meters(
    stacks: list[SAE], features: Tensor, parent: Tensor, x_eval: Tensor, true_codes: Tensor, batch_size: int
) -> list[TruthMeter]:
    """Gives, per stack, the recovery sums of every SAE against the true codes [N, n] of x_eval [N, d] (a
    transcoder's [N, d_in + d_out])."""
    meters = [TruthMeter(features, parent, s.decoder().detach()) for s in stacks]
    for xb, cb in zip(x_eval.split(batch_size), true_codes.split(batch_size), strict=True):
        x = stacks[0].split_batch(xb.float())[0]
        for sae, meter in zip(stacks, meters, strict=True):
            meter.update(cb, sae.encode(x))
    return meters


@dataclass
class Scoring:
    """What the model reads and which positions count, for rows tokens [R, T]."""

    inputs: Tensor  # [R, T] the tokens fed (masked LMs: some replaced by the mask token)
    targets: Tensor  # [R, T] the token each position should predict (0 where nothing is scored)
    ce: Tensor  # [R, T] bool: positions whose cross-entropy counts
    kl: Tensor  # [R, T] bool: positions whose KL counts
    splice: Tensor  # [R, T] bool: positions where the SAE's output replaces the activation


def scoring(lm: LanguageModel, tokens: Tensor, excluded: Sequence[int], seed: int = 0) -> Scoring:
    """Gives the scoring of rows tokens [R, T] for the model's head (see the module docstring)."""
    kept = ~torch.isin(tokens, torch.tensor(list(excluded), dtype=tokens.dtype))
    if lm.head == "causal":
        targets = torch.zeros_like(tokens)
        targets[:, :-1] = tokens[:, 1:]
        ce = kept.clone()
        ce[:, -1] = False
        return Scoring(tokens, targets, ce, kept, kept)
    if lm.head == "masked":
        g = torch.Generator().manual_seed(seed)
        chosen = (torch.rand(tokens.shape, generator=g) < MASK_FRACTION) & kept
        inputs = tokens.masked_fill(chosen, lm.tokenizer.special["mask"][1])
        return Scoring(inputs, tokens, chosen, chosen, kept)
    raise ValueError(f"{lm.name} has no trained language-model head ({lm.head_note})")


@torch.no_grad()
def ce_and_kl(
    lm: LanguageModel,
    hook: str,
    stack: SAE,
    tokens: Tensor,
    excluded: Sequence[int] = (),
    source: str | None = None,
    budget: int = 2**27,
) -> dict[str, Tensor]:
    """CE loss recovered and KL for every SAE of a stack on held-out rows tokens [R, T], as SAELens' core evals
    define them (excluded tokens keep their own activation; see the module docstring for the positions scored).
    Gives, each [M]: ce_clean, ce_zero (the hook zero-ablated), ce_sae, ce_loss_recovered, kl (KL(clean ‖
    spliced) per position), kl_zero (KL(clean ‖ zero-ablated)) and kl_score. A transcoder reads `source` (the
    module's input) and replaces `hook` (its output). The M models run as one batch of M·r rows, r chosen so
    the biggest intermediate stays under `budget` elements."""
    if isinstance(lm, PairedModel) and lm.side is None:
        return _both_models(lm, hook, stack, tokens, excluded, budget)
    M, (R, T) = stack.n_models, tokens.shape
    s = scoring(lm, tokens, excluded)
    totals = {"ce_clean": 0.0, "ce_zero": 0.0, "ce_sae": torch.zeros(M, dtype=torch.float64)}
    totals["kl"] = torch.zeros(M, dtype=torch.float64)
    totals["kl_zero"] = 0.0
    probe = lm.logits(s.inputs[:1])
    r = max(1, min(R, budget // (M * T * max(probe.shape[-1], stack.d_sae))))
    for start in range(0, R, r):
        rows = slice(start, start + r)
        inputs, splice, ce, kl, targets = s.inputs[rows], s.splice[rows], s.ce[rows], s.kl[rows], s.targets[rows]
        n = inputs.shape[0]

        def zero(act: Tensor, _src: Tensor) -> Tensor:
            return torch.zeros_like(act)

        splice_m = splice.repeat(M, 1)  # the M models' copies of the rows, one after another

        def reconstruct(act: Tensor, src: Tensor, where: Tensor = splice_m) -> Tensor:
            x = src.reshape(M, -1, src.shape[-1]).float()  # [M, n·T, d_in]: model m's copy of the rows
            return _splice(where, stack.reconstruct(x), act)

        clean = lm.logits(inputs)
        if JOIN in hook and stack.layer_transcoder:  # a CLT: every layer's MLP output replaced in one pass
            zeroed, spliced = _layered(lm, hook, source or hook, stack, inputs, splice_m)
        elif JOIN in hook:  # a crosscoder: every layer's activation replaced by its reconstruction, at once
            zeroed, spliced = _joint(lm, hook, stack, inputs, splice_m)
        else:
            zeroed = lm.logits(inputs, hook, zero, source)
            spliced = lm.logits(inputs.repeat(M, 1), hook, reconstruct, source)
        spliced = spliced.view(M, n, T, -1)
        totals["ce_clean"] += _ce_sum(clean, targets, ce)
        totals["ce_zero"] += _ce_sum(zeroed, targets, ce)
        at = kl.to(clean.device)
        totals["kl_zero"] += float(metrics.kl_per_position(clean[at], zeroed[at]).double().sum())
        for m in range(M):
            totals["ce_sae"][m] += _ce_sum(spliced[m], targets, ce)
            totals["kl"][m] += float(metrics.kl_per_position(clean[at], spliced[m][at]).double().sum())
    n_ce, n_kl = int(s.ce.sum()), int(s.kl.sum())
    if n_ce == 0 or n_kl == 0:  # no position to score (e.g. nothing masked in very few rows): null, not NaN
        keys = ("ce_clean", "ce_zero", "ce_sae", "ce_loss_recovered", "kl", "kl_zero", "kl_score")
        return {k: torch.full((M,), float("nan")) for k in keys}
    ce_clean, ce_zero, ce_sae = totals["ce_clean"] / n_ce, totals["ce_zero"] / n_ce, totals["ce_sae"] / n_ce
    return {  # the ratio in float64: its denominator can be small
        "ce_clean": torch.full((M,), ce_clean),
        "ce_zero": torch.full((M,), ce_zero),
        "ce_sae": ce_sae.float(),
        "ce_loss_recovered": metrics.ce_loss_recovered(ce_clean, ce_zero, ce_sae).float(),
        "kl": (totals["kl"] / n_kl).float(),
        "kl_zero": torch.full((M,), totals["kl_zero"] / n_kl),
        "kl_score": metrics.kl_score(totals["kl_zero"] / n_kl, totals["kl"] / n_kl).float(),
    }


def _splice(where: Tensor, out: Tensor, act: Tensor) -> Tensor:
    """The hook's value act [M·n, T, d] with out (the M models' outputs, any shape of as many elements) at the
    positions where [M·n, T] is true; act elsewhere."""
    return torch.where(where[..., None].to(act.device), out.to(act.dtype).reshape(act.shape), act)


def _zero_layer(_j: int, act: Tensor, _src: Tensor) -> Tensor:
    return torch.zeros_like(act)


def _layered(
    lm: LanguageModel, hook: str, source: str, stack: SAE, inputs: Tensor, splice_m: Tensor
) -> tuple[Tensor, Tensor]:
    """Logits of rows inputs [n, T] with every joined target hook zeroed, and of the M models' copies of the rows
    with each layer's output replaced by the stack's, layer after layer from the inputs the replaced layers before
    it left (the replacement model of a cross-layer transcoder)."""
    targets, sources, M = hook.split(JOIN), source.split(JOIN), stack.n_models
    zeroed = lm.logits_layered(inputs, targets, sources, _zero_layer)
    step = stack.replacement()  # type: ignore[operator]  (cross-layer stacks have one)

    def replace(j: int, act: Tensor, src: Tensor) -> Tensor:
        return _splice(splice_m, step(j, src.reshape(M, -1, src.shape[-1]).float()), act)

    return zeroed, lm.logits_layered(inputs.repeat(M, 1), targets, sources, replace)


def _both_models(
    lm: PairedModel, hook: str, stack: SAE, tokens: Tensor, excluded: Sequence[int], budget: int
) -> dict[str, Tensor]:
    """ce_and_kl of a model-diffing crosscoder: each model scored with both models' hooks replaced by the
    crosscoder's reconstruction; every field the mean of the two models' (the pair's), and each model's own as
    `<field>_a` / `<field>_b`."""
    sides = {side: ce_and_kl(lm.on(side), hook, stack, tokens, excluded, budget=budget) for side in SIDES}
    both = {k: (sides["a"][k] + sides["b"][k]) / 2 for k in sides["a"]}
    return {**both, **{f"{k}_{side}": v for side, d in sides.items() for k, v in d.items()}}


def _joint(lm: LanguageModel, hook: str, stack: SAE, inputs: Tensor, splice_m: Tensor) -> tuple[Tensor, Tensor]:
    """Logits of rows inputs [n, T] with every joined hook zeroed, and of the M models' copies with every joined
    hook's value replaced by its block of the stack's reconstruction of the clean pass's activations (an acausal
    crosscoder reads later layers too, so it cannot be applied layer after layer as a CLT is)."""
    hooks, M = hook.split(JOIN), stack.n_models
    zeroed = lm.logits_layered(inputs, hooks, hooks, _zero_layer)
    clean = lm.activations(inputs, [hook])[hook]  # [n, T, L·d]
    blocks = stack.reconstruct(clean.reshape(-1, clean.shape[-1]).float()).split(clean.shape[-1] // len(hooks), -1)

    def replace(j: int, act: Tensor, _src: Tensor) -> Tensor:
        return _splice(splice_m, blocks[j], act)

    return zeroed, lm.logits_layered(inputs.repeat(M, 1), hooks, hooks, replace)


@torch.no_grad()
def layer_stats(stack: SAE, x_eval: Tensor, batch_size: int) -> dict[str, Tensor]:
    """A cross-layer stack's reconstruction per layer on held-out rows [N, d_in + d_out] (a crosscoder's [N, d_in]):
    `fvu_by_layer` [M, L] (each target layer's squared error over its own variance) and, for a CLT, `l0_by_layer`
    [M, L] (active latents per token of each source layer; a crosscoder's latents belong to no layer)."""
    M, L = stack.n_models, stack.n_layers
    sq = torch.zeros(M, L, dtype=torch.float64)
    active = torch.zeros(M, L, dtype=torch.float64)
    t_sum = t_sq = None
    for batch in x_eval.split(batch_size):
        x, target = stack.split_batch(batch.float())
        codes = stack.encode(x)
        err = (stack.decode(codes, x) - target).double()
        sq += err.pow(2).view(M, len(x), L, -1).sum(dim=(1, 3)).cpu()
        if stack.layer_transcoder:  # a CLT's codes are L blocks of its layers' latents
            active += (codes != 0).view(M, len(x), L, -1).sum(dim=(1, 3)).double().cpu()
        t = target.double().view(len(x), L, -1)
        t_sum = t.sum(0) if t_sum is None else t_sum + t.sum(0)
        t_sq = t.pow(2).sum(0) if t_sq is None else t_sq + t.pow(2).sum(0)
    n = x_eval.shape[0]
    assert t_sum is not None and t_sq is not None
    variance = (t_sq - t_sum.pow(2) / n).sum(-1).cpu()  # [L]: Σ over a layer's dimensions of n·var
    stats = {"fvu_by_layer": (sq / variance).float(), "l0_by_layer": (active / n).float()}
    return stats if stack.layer_transcoder else {"fvu_by_layer": stats["fvu_by_layer"]}


def layer_fields(stacks: list[SAE], x_eval: Tensor, batch_size: int) -> Callable[[int, int], dict[str, Any]]:
    """Gives, for results rows, the per-layer fields of SAE m of stack i: layer_stats' lists for cross-layer stacks,
    nothing for the others."""
    stats = [layer_stats(s, x_eval, batch_size) if s.cross_layer else None for s in stacks]

    def fields(i: int, m: int) -> dict[str, Any]:
        st = stats[i]
        return {} if st is None else {k: [round(float(v), 6) for v in t[m]] for k, t in st.items()}

    return fields


def _ce_sum(logits: Tensor, targets: Tensor, where: Tensor) -> float:
    """Summed cross-entropy (nats) of logits [n, T, V] at the positions `where` [n, T] against targets."""
    where = where.to(logits.device)
    per_position = F.cross_entropy(logits[where].float(), targets.to(logits.device)[where], reduction="none")
    return float(per_position.double().sum())  # summed in float64: CE_zero − CE_clean can be small
