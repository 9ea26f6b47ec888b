"""`batchtopk`: keep the k·B largest pre-activations of the whole batch rather than each row's k (Bussmann, Leask
and Nanda 2024, "BatchTopK sparse autoencoders"), so tokens that need more latents get them; L0 is k on average.

Training is TopK's (saes/topk.py): FVU + AuxK on latents dead for `dead_tokens_threshold` tokens, encoder
initialised as the decoder's transpose, the sparse decoder and gradients of saes/sparse.py over the selected
entries. Only the selection differs: one exact top-(k·B) over each model's [B, d_sae] slab (kernels.batch_topk).

Inference cannot see a batch, so the SAE also learns a global threshold θ: after every step
θ ← (1 − 0.01)·θ + 0.01·(smallest positive value kept), in float64 — SAELens' rate (`topk_threshold_lr` 0.01).
The first step sets θ to that value outright, as dictionary_learning does (its θ starts at −1, "unset"): SAELens
starts the average from 0, which leaves θ at 1 − 0.99ⁿ of its value after n steps (39 % at 50), so a short run or an
early evaluation encodes with a threshold far too low (held-out L0 8-20× k here at 50 steps). `encode` (evaluation,
export) is JumpReLU with θ on every latent, ReLU(pre)·[pre > θ], one example at a time, and the SAE is saved as
SAELens saves it: a `jumprelu` folder with a `threshold` tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sparse_coding.saes.base import TrainOutput
from sparse_coding.saes.kernels import batch_topk
from sparse_coding.saes.sparse import sparse_decode, split_flat
from sparse_coding.saes.topk import TopKSAE

THRESHOLD_LR = 0.01  # SAELens' topk_threshold_lr


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"  # SAELens' inference form of a BatchTopK SAE
    saelens_training_architecture = "batchtopk"
    saelens_trainer = "batchtopk_sae.BatchTopKTrainingSAE"
    saelens_transcoder = ("jumprelu_transcoder", "jumprelu_skip_transcoder")

    def __init__(self, d_in: int, d_sae: int, hparams: list[dict[str, Any]], **options: Any):
        super().__init__(d_in, d_sae, hparams, **options)
        self.register_buffer("threshold", torch.full((self.n_models,), -1.0, dtype=torch.float64))  # −1: unset

    def select(self, pre: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """pre (+ bias): [M, B, d_sae] → (values, flat indices) [M, k_max·B], in index order (saes/sparse.py's
        flat layout); values ReLU'd, model m's past its own k·B zero."""
        B = pre.shape[1]
        vals, idx = batch_topk(pre, [min(k, self.d_local) * B for k in self.ks], bias)
        if self.shard is not None:  # the exact global selection: this shard's part of it
            vals, idx = self.shard.batch_topk(vals, idx, [k * B for k in self.ks], B)
        return vals.relu(), idx

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold.to(pre.dtype)[:, None, None])

    def decode_entries(self, vals: Tensor, idx: Tensor, n_tokens: int) -> Tensor:
        rows, lat = split_flat(idx, self.d_local)
        return sparse_decode(vals, lat, self.decoder(), rows, n_tokens, self.precision)

    def latents(self, idx: Tensor) -> Tensor:
        return idx % self.d_local

    def train_forward(self, x: Tensor, stats: bool = True, target: Tensor | None = None) -> TrainOutput:
        out = super().train_forward(x, stats, target)
        if stats:
            out.parts["threshold"] = self.threshold.float()
        return out

    @torch.no_grad()
    def record_firing(self, vals: Tensor, idx: Tensor, n_tokens: int) -> None:
        """Also moves θ towards this batch's smallest kept positive value (each model's own; none kept: no move;
        θ unset: set to it)."""
        super().record_firing(vals, idx, n_tokens)
        smallest = vals.masked_fill(vals <= 0, float("inf")).amin(-1).double()
        if self.shard is not None:
            self.shard.all_reduce_(smallest, op=dist.ReduceOp.MIN)
        moved = (1 - THRESHOLD_LR) * self.threshold + THRESHOLD_LR * smallest
        moved = torch.where(self.threshold < 0, smallest, moved)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), moved, self.threshold))

    # --- SAELens: saved as JumpReLU ----------------------------------------------------------------------
    def saelens_cfg(self, m: int) -> dict[str, Any]:
        return {}

    @classmethod
    def hparams_from_saelens(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        meta = cfg.get("metadata") or {}
        return {"k": int(meta.get("k") or (meta.get("training_architecture_details") or {})["k"])}

    @torch.no_grad()
    def export(self, m: int) -> dict[str, Tensor]:
        threshold = torch.full(  # an untrained SAE (θ unset) exports θ = 0: ReLU
            (self.d_sae,), max(float(self.threshold[m]), 0.0), dtype=self.W_dec.dtype, device=self.W_dec.device
        )
        return {**super().export(m), "threshold": threshold}

    @torch.no_grad()
    def load_exported(self, m: int, tensors: dict[str, Tensor]) -> None:
        super().load_exported(m, tensors)
        self.threshold[m] = tensors["threshold"].double().mean()

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.threshold.div_(scale)
