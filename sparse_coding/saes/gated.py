"""`gated`: a gate decides which latents fire, a magnitude path how strongly (Rajamanoharan et al. 2024,
"Improving dictionary learning with gated sparse autoencoders").

Both paths share the encoder W (b_enc here is the gate's bias b_gate): π_gate = W(x − b_dec) + b_gate,
π_mag = exp(r_mag) ⊙ W(x − b_dec) + b_mag, codes = H(π_gate) ⊙ ReLU(π_mag). The gate gets its gradient only from
the two extra terms of the paper's loss: the L1 penalty on ReLU(π_gate), weighted by each latent's decoder norm
(as the paper and SAELens do; it matters with a free decoder, `--decoder_init_norm` > 0), and the auxiliary
reconstruction of x from ReLU(π_gate) through a frozen copy of the decoder (W_dec and b_dec get no gradient from
it, as the paper specifies; SAELens does not freeze them). Both paths cost one matmul: π_mag is computed from the
gate's W(x − b_dec).

Loss = MSE + l1_alpha · L1 + aux MSE, with MSE the mean over batch and dimensions and L1 divided by d_sae under
`--l1_norm dict_size`, exactly relu's conventions, so one l1 grid serves both. Init as SAELens: r_mag = b_mag =
b_gate = 0, the encoder the decoder's transpose. Saved as SAELens' `gated` (b_gate, b_mag, r_mag; no b_enc).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sparse_coding.saes.base import SAE, BufferCache, PenaltySAE, TrainOutput
from sparse_coding.saes.kernels import compiled
from sparse_coding.saes.relu import L1_NORMS
from sparse_coding.saes.shard import LatentShard


class GatedSAE(PenaltySAE):
    architecture = "gated"
    saelens_architecture = "gated"
    saelens_trainer = "gated_sae.GatedTrainingSAE"
    knob = "l1_alpha"
    tag_prefix = "l1"
    options = ("l1_norm", "decoder_init_norm", "decoder_bias")
    # the dense step's matmuls: relu's five and the auxiliary path's decoder forward and its input gradient
    roofline_matmuls = SAE.roofline_matmuls + ("decoder", "codes_grad")
    latent_tensors = SAE.latent_tensors + ("r_mag", "b_mag")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        l1_norm: str = "dict_size",
        decoder_init_norm: float = 0.0,
        decoder_bias: bool = True,
        d_out: int | None = None,
        skip: bool = False,
        shard: LatentShard | None = None,
    ):
        if l1_norm not in L1_NORMS:
            raise ValueError(f"l1_norm must be one of {L1_NORMS}, got {l1_norm!r}")
        super().__init__(d_in, d_sae, hparams, decoder_bias, decoder_init_norm, d_out, skip, shard)
        self.l1_norm = l1_norm
        self.r_mag = nn.Parameter(torch.zeros(self.n_models, self.d_local))
        self.b_mag = nn.Parameter(torch.zeros(self.n_models, self.d_local))
        self.init_transposed()
        self._cache = BufferCache()

    @classmethod
    def saelens_trainer_fields(cls, value: float, d_sae: int) -> dict[str, Any]:
        return {"l1_coefficient": value}

    def encode(self, x: Tensor) -> Tensor:
        shared = self.precision.bmm(self.center(x), self.W_enc.mT)
        magnitude = torch.relu(shared * self.r_mag.exp()[:, None, :] + self.b_mag[:, None, :])
        return magnitude * (shared + self.b_enc[:, None, :] > 0)

    def train_forward(self, x: Tensor, stats: bool = True, target: Tensor | None = None) -> TrainOutput:
        weights = self.decoder_norms()
        x_hat, x_aux, l1, l0 = _GatedStep.apply(
            x, self.W_enc, self.b_enc, self.r_mag, self.b_mag, self.decoder(), self.center_bias(), self.output_bias(),
            weights, self,
        )  # fmt: skip
        if self.shard is not None:  # partial outputs and sums over this shard's latents
            x_aux = self.shard.reduce(x_aux) + self.b_dec.detach()[:, None, :]  # the frozen decoder's bias
            x_hat, l1, l0 = self.decoded(x_hat), self.shard.reduce(l1), self.shard.reduce(l0)
        target = x if target is None else target
        aux_target = target
        if self.skip:  # the gate path's auxiliary reconstruction is asked for what the skip path leaves
            skip = self.skip_term(x)
            x_hat, aux_target = x_hat + skip, target - skip.detach()
        mse = (x_hat - target).pow(2).mean(dim=(1, 2))
        aux = (x_aux - aux_target).pow(2).mean(dim=(1, 2))
        scale = 1.0 / self.d_sae if self.l1_norm == "dict_size" else 1.0
        loss = mse + self.coefficient() * scale * l1 + aux
        if not stats:
            return TrainOutput(loss)
        return TrainOutput(loss, {"mse": mse.detach(), "l1": l1.detach(), "aux": aux.detach(), "l0": l0})

    # --- SAELens: b_enc is b_gate ---------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, m: int) -> dict[str, Tensor]:
        w = super().export(m)
        w["b_gate"] = w.pop("b_enc")
        return {**w, "b_mag": self.b_mag[m].clone(), "r_mag": self.r_mag[m].clone()}

    @torch.no_grad()
    def load_exported(self, m: int, tensors: dict[str, Tensor]) -> None:
        super().load_exported(m, {**tensors, "b_enc": tensors["b_gate"]})
        self.b_mag[m].copy_(tensors["b_mag"])
        self.r_mag[m].copy_(tensors["r_mag"])

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.b_mag.div_(scale)


class _GatedStep(torch.autograd.Function):
    """The dense gated SAE forward and backward, [M, B, d_sae] tensors in reused buffers.

    x: [B, d_in]; W_enc, W_dec: [M, d_sae, d_in]; r_mag, b_mag, weights (decoder norms): [M, d_sae]; b_center: the
    bias subtracted from x; b_out: the bias added to the outputs (None on a shard, whose outputs are partial).
    Returns x_hat and the gate-path reconstruction x_aux (frozen decoder), [M, B, d_in]; l1 [M] (mean over the batch
    of Σ ReLU(π_gate)·weight) and l0 [M] (no gradient)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_gate, r_mag, b_mag, W_dec, b_center, b_out, weights, sae: GatedSAE):  # type: ignore[override]
        cache: BufferCache = sae._cache
        M, B, F_ = W_enc.shape[0], x.shape[0], W_enc.shape[1]
        xc = x.unsqueeze(0) - b_center[:, None, :] if sae.centers_input else x.unsqueeze(0).expand(M, -1, -1)
        mm = sae.precision
        shared = mm.bmm(xc, W_enc.mT, out=cache.get("shared", (M, B, F_), b_gate))  # W(x − b_dec)
        gate, codes = cache.get("gate", (M, B, F_), b_gate), cache.get("codes", (M, B, F_), b_gate)
        exp_r = r_mag.exp()
        fused = compiled(shared)
        if fused:  # ReLU(π_gate), the codes, Σ_b ReLU(π_gate) and the firing counts in one pass
            gate_sum, fires = torch.ops.sparse_coding.gated_forward(shared, b_gate, exp_r, b_mag, gate, codes)
        else:
            torch.add(shared, b_gate[:, None, :], out=gate)
            open_ = gate > 0
            gate.relu_()
            torch.addcmul(b_mag[:, None, :], shared, exp_r[:, None, :], out=codes).relu_().mul_(open_)
            gate_sum, fires = gate.sum(1), (codes > 0).sum(1)
        bias = None if b_out is None else b_out[:, None, :]
        x_hat = mm.baddbmm(bias, codes, W_dec)
        x_aux = mm.baddbmm(None if bias is None else bias.detach(), gate, W_dec.detach())  # the frozen decoder
        l1 = (gate_sum * weights).sum(-1) / B
        l0 = fires.sum(-1).to(b_gate.dtype) / B
        cache.generation += 1
        ctx.generation, ctx.cache, ctx.center, ctx.fused = cache.generation, cache, sae.centers_input, fused
        ctx.precision, ctx.has_out_bias = mm, b_out is not None
        ctx.save_for_backward(xc, W_enc, b_gate, exp_r, b_mag, W_dec, weights, shared, gate, codes, gate_sum)
        ctx.mark_non_differentiable(l0)
        return x_hat, x_aux, l1, l0

    @staticmethod
    def backward(ctx, g_xhat, g_aux, g_l1, _g_l0):  # type: ignore[override]
        if ctx.generation != ctx.cache.generation:
            raise RuntimeError("a second training forward ran before this one's backward; its buffers are gone")
        xc, W_enc, b_gate, exp_r, b_mag, W_dec, weights, shared, gate, codes, gate_sum = ctx.saved_tensors
        M, B, F_ = shared.shape
        mm = ctx.precision
        g_W_dec = mm.bmm(codes.mT, g_xhat)  # the auxiliary path's decoder is frozen
        g_codes = mm.bmm(g_xhat, W_dec.mT, out=ctx.cache.get("g_codes", (M, B, F_), shared))
        l1_weight = (g_l1 / B)[:, None] * weights  # ∂loss/∂ReLU(π_gate) from the L1 term
        # ∂loss/∂ReLU(π_gate) from the auxiliary path, into the codes buffer (no longer needed); then ∂loss/∂shared
        g_shared = mm.bmm(g_aux, W_dec.mT, out=codes)
        if ctx.fused:
            r_sum, g_b_mag, g_b_gate = torch.ops.sparse_coding.gated_backward(
                shared, b_gate, exp_r, b_mag, g_codes, g_shared, l1_weight.contiguous()
            )
        else:
            open_ = gate > 0  # ReLU(π_gate) > 0 ⟺ π_gate > 0
            g_codes.mul_(open_ & (torch.addcmul(b_mag[:, None, :], shared, exp_r[:, None, :]) > 0))  # ∂/∂π_mag
            g_shared.add_(l1_weight[:, None, :]).mul_(open_)  # ∂/∂π_gate
            r_sum, g_b_mag, g_b_gate = (g_codes * shared).sum(1), g_codes.sum(1), g_shared.sum(1)
            g_shared.addcmul_(g_codes, exp_r[:, None, :])  # both paths read W(x − b_dec)
        g_W_enc = mm.bmm(g_shared.mT, xc)
        g_b_out = g_xhat.sum(dim=1) if ctx.has_out_bias else None
        # xc = x − b_center: its gradient summed over the batch is −Σ g_shared @ W_enc
        g_b_center = -torch.bmm((g_b_gate + exp_r * g_b_mag)[:, None, :], W_enc)[:, 0, :] if ctx.center else None
        g_weights = (g_l1 / B)[:, None] * gate_sum
        return None, g_W_enc, g_b_gate, r_sum * exp_r, g_b_mag, g_W_dec, g_b_center, g_b_out, g_weights, None
