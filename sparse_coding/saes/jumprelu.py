"""`jumprelu`: codes = pre · H(pre − θ) with a learned threshold θ per latent, and an L0 penalty (Rajamanoharan
et al. 2024, "Jumping ahead: improving reconstruction fidelity with JumpReLU sparse autoencoders").

The step H has no useful gradient, so θ learns through the paper's straight-through estimators with a rectangle
kernel of width ε (`--jumprelu_bandwidth`): ∂/∂θ [pre·H(pre − θ)] := −(θ/ε)·K((pre − θ)/ε) and
∂/∂θ H(pre − θ) := −(1/ε)·K((pre − θ)/ε), K(u) = 1 for |u| < ½; pre gets the plain H(pre − θ) and no estimator
(DeepMind's choice; SAELens' default `jumprelu_ste_to_input=False`).

Loss = FVU + l0_coef · L0 / d_in (+ the pre-act loss). On activations normalised to E‖x − x̄‖² = d_in that is
SAELens' (Σ squared error + l0_coefficient · L0) / d_in, so l0_coef means what SAELens' l0_coefficient means
there; being FVU-based it also does not depend on the activations' scale. Optional pre-act loss
(`--jumprelu_pre_act_coef`, Anthropic's January 2025 update, SAELens' `pre_act_loss_coefficient`):
coef · Σ over dead latents of ReLU(θ − pre)·‖d‖, averaged over the batch, only on latents silent for
`--dead_tokens_threshold` tokens as SAELens does; the decoder-norm weight is Anthropic's and matters with a free
decoder (`--decoder_init_norm` > 0).

Following SAELens, θ is a parameter itself (not log θ as in the paper: Adam moves a parameter by about lr a step,
which barely moves a log-parameterised small threshold) projected onto θ ≥ 0 after each step; it starts at
`--jumprelu_init_threshold`. The encoder starts as the decoder's transpose (the paper's and SAELens' init).
Saved as SAELens' `jumprelu` (`threshold` tensor).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sparse_coding.saes.base import SAE, BufferCache, PenaltySAE, TrainOutput, target_variance
from sparse_coding.saes.kernels import compiled
from sparse_coding.saes.shard import LatentShard


class JumpReLUSAE(PenaltySAE):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    saelens_transcoder = ("jumprelu_transcoder", "jumprelu_skip_transcoder")
    saelens_trainer = "jumprelu_sae.JumpReLUTrainingSAE"
    knob = "l0_coef"
    tag_prefix = "l0"
    options = (
        "jumprelu_bandwidth",
        "jumprelu_init_threshold",
        "jumprelu_pre_act_coef",
        "dead_tokens_threshold",
        "decoder_init_norm",
        "decoder_bias",
    )
    latent_tensors = SAE.latent_tensors + ("threshold", "tokens_since_fired")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        jumprelu_bandwidth: float = 0.05,
        jumprelu_init_threshold: float = 0.01,
        jumprelu_pre_act_coef: float = 0.0,
        dead_tokens_threshold: int = 10_000_000,
        decoder_init_norm: float = 0.0,
        decoder_bias: bool = True,
        d_out: int | None = None,
        skip: bool = False,
        shard: LatentShard | None = None,
    ):
        super().__init__(d_in, d_sae, hparams, decoder_bias, decoder_init_norm, d_out, skip, shard)
        self.jumprelu_bandwidth, self.jumprelu_init_threshold = jumprelu_bandwidth, jumprelu_init_threshold
        self.jumprelu_pre_act_coef, self.dead_tokens_threshold = jumprelu_pre_act_coef, dead_tokens_threshold
        self.register_buffer("tokens_since_fired", torch.zeros(self.n_models, self.d_local, dtype=torch.long))
        self.threshold = nn.Parameter(torch.full((self.n_models, self.d_local), float(jumprelu_init_threshold)))
        self.init_transposed()
        self._cache = BufferCache()

    @classmethod
    def saelens_trainer_fields(cls, value: float, d_sae: int) -> dict[str, Any]:
        return {"l0_coefficient": value}

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)  # ReLU'd as SAELens does: equal for θ ≥ 0 (ours), and for a loaded θ < 0 too
        return pre.relu() * (pre > self.threshold[:, None, :])

    @torch.no_grad()
    def constrain_weights(self) -> None:
        super().constrain_weights()
        self.threshold.clamp_(min=0.0)  # below 0 the gate would pass negative pre-activations

    def train_forward(self, x: Tensor, stats: bool = True, target: Tensor | None = None) -> TrainOutput:
        B = x.shape[0]
        target = x if target is None else target
        dead = self.tokens_since_fired >= self.dead_tokens_threshold
        n_dead = int(dead.sum(-1).max()) if self.jumprelu_pre_act_coef > 0 else 0
        cols = torch.argsort((~dead).to(torch.uint8), dim=-1, stable=True)[:, :n_dead]  # dead latents first
        x_hat, l0, fires, dead_pre = _JumpReLUStep.apply(
            x,
            self.W_enc,
            self.b_enc,
            self.decoder(),
            self.center_bias(),
            self.output_bias(),
            self.threshold,
            cols,
            self,
        )
        x_hat, l0 = self.decoded(x_hat), self.across_latents(l0)
        if self.skip:
            x_hat = x_hat + self.skip_term(x)
        total_variance = target_variance(target)
        sq_err = (x_hat - target).pow(2).sum(dim=(1, 2))
        fvu = sq_err / total_variance
        loss = fvu + self.coefficient() * l0 / self.d_out
        parts = {"mse": sq_err.detach() / (B * self.d_out), "fvu": fvu.detach(), "l0": l0.detach()}
        if n_dead > 0:
            really_dead = torch.arange(n_dead, device=x.device) < dead.sum(-1, keepdim=True)  # [M, D]
            weight = (self.decoder_norms().gather(-1, cols) * really_dead)[:, None, :]
            gap = (self.threshold.gather(-1, cols)[:, None, :] - dead_pre).relu()
            pre_act = self.jumprelu_pre_act_coef * self.across_latents((gap * weight).sum(-1).mean(-1))
            loss = loss + pre_act
            parts["pre_act"] = pre_act.detach()
        with torch.no_grad():
            self.tokens_since_fired.add_(B).masked_fill_(fires > 0, 0)
        if not stats:
            return TrainOutput(loss)
        return TrainOutput(loss, {**parts, "dead": self.across_latents(dead.sum(-1).float())})

    # --- SAELens -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def export(self, m: int) -> dict[str, Tensor]:
        return {**super().export(m), "threshold": self.threshold[m].clone()}

    @torch.no_grad()
    def load_exported(self, m: int, tensors: dict[str, Tensor]) -> None:
        super().load_exported(m, tensors)
        self.threshold[m].copy_(tensors["threshold"])

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.threshold.div_(scale)


class _JumpReLUStep(torch.autograd.Function):
    """The dense JumpReLU SAE forward and backward, [M, B, d_sae] tensors in reused buffers.

    x: [B, d_in] shared by all M models; W_enc, W_dec: [M, d_sae, d_in]; b_center: the bias subtracted from x;
    b_out: the bias added to the output (None on a shard, whose output is partial); theta: [M, d_sae]; cols: [M, D]
    latents whose pre-activations the pre-act loss reads. Returns x_hat [M, B, d_in], l0 [M] (mean active latents
    per token), fires [M, d_sae] (tokens each latent fired on; no gradient) and the pre-activations of cols
    [M, B, D]."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_center, b_out, theta, cols, sae: JumpReLUSAE):  # type: ignore[override]
        cache: BufferCache = sae._cache
        M, B, F_ = W_enc.shape[0], x.shape[0], W_enc.shape[1]
        xc = x.unsqueeze(0) - b_center[:, None, :] if sae.centers_input else x.unsqueeze(0).expand(M, -1, -1)
        mm = sae.precision
        pre = cache.get("pre", (M, B, F_), b_enc)
        mm.baddbmm(b_enc[:, None, :], xc, W_enc.mT, out=pre)
        codes = cache.get("codes", (M, B, F_), b_enc)
        fused = compiled(pre)
        if fused:  # codes = pre·H(pre − θ) and the firing counts in one pass
            fires = torch.ops.sparse_coding.jumprelu_forward(pre, theta, codes)
        else:
            active = torch.gt(pre, theta[:, None, :], out=cache.get("active", (M, B, F_), b_enc, torch.bool))
            torch.mul(pre, active, out=codes)
            fires = active.sum(1)
        l0 = fires.sum(-1).to(b_enc.dtype) / B
        x_hat = mm.baddbmm(None if b_out is None else b_out[:, None, :], codes, W_dec)
        dead_pre = pre.gather(-1, cols[:, None, :].expand(M, B, cols.shape[-1]))
        cache.generation += 1
        ctx.generation, ctx.cache, ctx.center, ctx.eps = (
            cache.generation,
            cache,
            sae.centers_input,
            sae.jumprelu_bandwidth,
        )
        ctx.fused, ctx.precision, ctx.has_out_bias = fused, mm, b_out is not None
        ctx.save_for_backward(xc, W_enc, W_dec, theta, cols, pre, codes)
        ctx.mark_non_differentiable(fires)
        return x_hat, l0, fires, dead_pre

    @staticmethod
    def backward(ctx, g_xhat, g_l0, _g_fires, g_dead_pre):  # type: ignore[override]
        if ctx.generation != ctx.cache.generation:
            raise RuntimeError("a second training forward ran before this one's backward; its buffers are gone")
        xc, W_enc, W_dec, theta, cols, pre, codes = ctx.saved_tensors
        M, B, F_ = pre.shape
        eps = ctx.eps
        mm = ctx.precision
        g = mm.bmm(g_xhat, W_dec.mT, out=ctx.cache.get("g", (M, B, F_), pre))  # ∂loss/∂codes
        g_W_dec = mm.bmm(codes.mT, g_xhat)
        # θ's estimators read the window |pre − θ| < ε/2; then ∂codes/∂pre = H(pre − θ) turns g into ∂loss/∂pre
        if ctx.fused:
            window_g, window_n, g_b_enc = torch.ops.sparse_coding.jumprelu_backward(pre, theta, g, eps / 2)
        else:
            window = torch.sub(pre, theta[:, None, :], out=codes).abs_().lt_(eps / 2)  # codes: no longer needed
            window_g, window_n = (g * window).sum(1), window.sum(1)
            g.mul_(pre > theta[:, None, :])
            g_b_enc = g.sum(dim=1)
        g_theta = -(theta / eps) * window_g - (g_l0 / (B * eps))[:, None] * window_n
        if cols.shape[-1] > 0:  # the pre-act loss's own gradient, on the dead latents' columns
            g.scatter_add_(-1, cols[:, None, :].expand(M, B, cols.shape[-1]), g_dead_pre)
            g_b_enc = g_b_enc.scatter_add(-1, cols, g_dead_pre.sum(1))
        g_W_enc = mm.bmm(g.mT, xc)
        g_b_out = g_xhat.sum(dim=1) if ctx.has_out_bias else None
        # xc = x − b_center: its gradient summed over the batch is −g_b_enc @ W_enc
        g_b_center = -torch.bmm(g_b_enc[:, None, :], W_enc)[:, 0, :] if ctx.center else None
        return None, g_W_enc, g_b_enc, g_W_dec, g_b_center, g_b_out, g_theta, None, None
