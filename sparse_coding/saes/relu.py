"""`relu`: the original research code's SAE (SAELens calls it 'standard').

codes = ReLU(x W_enc + b_enc), unit-norm decoder rows, orthogonal decoder init, encoder initialised like torch's
nn.Linear (as the original; it lets surplus features die, which the dead-feature heatmap relies on), tied or untied;
loss = MSE + l1_alpha · L1(codes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sparse_coding.errors import ConfigError
from sparse_coding.saes.base import SAE, BufferCache, TrainOutput

if TYPE_CHECKING:
    from sparse_coding.training.config import SweepConfig

L1_NORMS = ("dict_size", "none")


class ReluSAE(SAE):
    architecture = "relu"
    saelens_architecture = "standard"
    saelens_transcoder = ("transcoder", "skip_transcoder")
    knob = "l1_alpha"
    options = ("tied", "l1_norm", "decoder_bias")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        tied: bool = False,
        l1_norm: str = "dict_size",
        decoder_bias: bool = True,
        d_out: int | None = None,
        skip: bool = False,
    ):
        """l1_norm: 'dict_size' divides the L1 term by d_sae (as the original toy code did, so one l1 grid
        suits every dictionary size); 'none' uses the plain sum over features."""
        if l1_norm not in L1_NORMS:
            raise ValueError(f"l1_norm must be one of {L1_NORMS}, got {l1_norm!r}")
        if tied and d_out is not None:
            raise ConfigError("--tied does not apply to transcoders: the encoder reads another space than the decoder")
        super().__init__(d_in, d_sae, hparams, decoder_bias, d_out, skip)
        self.tied, self.l1_norm = tied, l1_norm
        self.register_buffer("l1_alpha", torch.tensor([float(h["l1_alpha"]) for h in hparams]))
        with torch.no_grad():  # as the original: orthogonal decoder, nn.Linear's default encoder init
            bound = d_in**-0.5
            for m in range(self.n_models):
                nn.init.orthogonal_(self.W_dec[m])
            self.constrain_weights()
            self.W_enc.uniform_(-bound, bound)
            self.b_enc.uniform_(-bound, bound)
        if tied:
            del self.W_enc  # the encoder is the decoder's transpose; nothing separate to learn
        self._cache = BufferCache()

    @classmethod
    def knob_values(cls, cfg: SweepConfig) -> list[float]:
        return cfg.l1_grid()

    def tag(self, m: int) -> str:
        return f"l1_{self._hparams[m]['l1_alpha']:.4g}"

    def encoder(self) -> Tensor:
        return self.W_dec if self.tied else self.W_enc

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x))

    def l1_scale(self) -> float:
        return 1.0 / self.d_sae if self.l1_norm == "dict_size" else 1.0

    def train_forward(self, x: Tensor, stats: bool = True, target: Tensor | None = None) -> TrainOutput:
        x_hat, l1, codes = _ReluSAEStep.apply(
            x, self.encoder(), self.b_enc, self.decoder(), self.b_dec, self.centers_input, self._cache
        )
        if self.skip:
            x_hat = x_hat + self.skip_term(x)
        mse = (x_hat - (x if target is None else target)).pow(2).mean(dim=(1, 2))
        loss = mse + self.l1_alpha * self.l1_scale() * l1
        if not stats:  # L0 is an extra read of the codes; the trainer asks only when it logs
            return TrainOutput(loss)
        with torch.no_grad():
            l0 = torch.count_nonzero(codes, dim=-1).float().mean(-1)
        return TrainOutput(loss, {"mse": mse.detach(), "l1": l1.detach(), "l0": l0})

    def load_exported(self, m: int, tensors: dict[str, Tensor]) -> None:
        if not self.tied:
            return super().load_exported(m, tensors)
        with torch.no_grad():
            self.b_enc[m].copy_(tensors["b_enc"])
            self.W_dec[m].copy_(tensors["W_dec"])
            self.b_dec[m].copy_(tensors["b_dec"])


class _ReluSAEStep(torch.autograd.Function):
    """Dense SAE forward and backward with the [M, B, d_sae] tensors in reused buffers and the ReLU, L1 and
    bias gradients folded into in-place passes; the five matmuls are all that is left of note.

    x: [B, d_in] shared by all M models; W_enc: [M, d_sae, d_in], W_dec: [M, d_sae, d_out]. Returns x_hat
    [M, B, d_out], l1 [M]
    (mean over the batch of the summed codes) and the codes themselves (a buffer, valid until the next call).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, center: bool, cache: BufferCache):  # type: ignore[override]
        M, B, F_ = W_enc.shape[0], x.shape[0], W_enc.shape[1]
        xc = x.unsqueeze(0) - b_dec[:, None, :] if center else x.unsqueeze(0).expand(M, -1, -1)
        codes = cache.get("codes", (M, B, F_), x)
        torch.baddbmm(b_enc[:, None, :], xc, W_enc.mT, out=codes)
        codes.relu_()
        x_hat = torch.baddbmm(b_dec[:, None, :], codes, W_dec)
        l1 = codes.sum(dim=(1, 2)) / B  # codes ≥ 0, so the sum is the L1 norm
        cache.generation += 1
        ctx.generation, ctx.cache, ctx.center = cache.generation, cache, center
        ctx.save_for_backward(xc, W_enc, W_dec, codes)
        ctx.mark_non_differentiable(codes)
        return x_hat, l1, codes

    @staticmethod
    def backward(ctx, g_xhat, g_l1, _g_codes):  # type: ignore[override]
        if ctx.generation != ctx.cache.generation:
            raise RuntimeError("a second training forward ran before this one's backward; its buffers are gone")
        xc, W_enc, W_dec, codes = ctx.saved_tensors
        M, B, F_ = codes.shape
        g_codes = ctx.cache.get("g_codes", (M, B, F_), codes)
        torch.bmm(g_xhat, W_dec.mT, out=g_codes)
        g_codes.add_((g_l1 / B)[:, None, None])  # d(l1)/d(codes) = 1/B where codes > 0
        torch.ops.aten.threshold_backward.grad_input(g_codes, codes, 0.0, grad_input=g_codes)  # ReLU mask
        g_W_enc = torch.bmm(g_codes.mT, xc)
        g_b_enc = g_codes.sum(dim=1)
        g_W_dec = torch.bmm(codes.mT, g_xhat)
        g_b_dec = g_xhat.sum(dim=1)
        if ctx.center:  # xc = x - b_dec: its gradient summed over the batch is g_b_enc @ W_enc
            g_b_dec = g_b_dec - torch.bmm(g_b_enc[:, None, :], W_enc)[:, 0, :]
        return None, g_W_enc, g_b_enc, g_W_dec, g_b_dec, None, None
