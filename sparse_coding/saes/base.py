"""The interface every SAE architecture implements, for a stack of SAEs trained in lockstep.

A stack holds `n_models` SAEs of one dictionary size with parameters on a leading model axis:
W_enc [M, d_sae, d_in] (one row per latent, the layout the sparse TopK gradient fills), b_enc [M, d_sae],
W_dec [M, d_sae, d_in], b_dec [M, d_in]. Exported tensors follow SAELens (W_enc [d_in, d_sae]).

Decoder rows are kept at unit norm in parameter space: before each optimizer step the gradient's component
along each row is removed, after it each row is rescaled to norm 1. At unit norm that projected gradient is
exactly the gradient of normalizing in the forward pass (the original research code's way), without the
extra [d_sae, d_in] tensors per step that forward normalization allocates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


@dataclass
class TrainOutput:
    """What one training forward gives back; `loss` is per model and is what gets minimised."""

    loss: Tensor  # [M]
    mse: Tensor  # [M] mean squared error per element
    l0: Tensor  # [M] mean active features per example
    fired: Tensor  # [M, d_sae] bool, features that fired on this batch
    extra: dict[str, Tensor] = field(default_factory=dict)


class SAE(nn.Module, ABC):
    """A stack of `n_models` SAEs sharing d_in and d_sae; subclasses add the encoder nonlinearity and loss."""

    architecture: ClassVar[str]  # our name, the registry key
    saelens_architecture: ClassVar[str]  # the name SAELens' cfg.json uses

    def __init__(self, d_in: int, d_sae: int, n_models: int, decoder_bias: bool = True):
        super().__init__()
        self.d_in, self.d_sae, self.n_models = d_in, d_sae, n_models
        self.decoder_bias = decoder_bias
        self.W_enc = nn.Parameter(torch.empty(n_models, d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(n_models, d_sae))
        self.W_dec = nn.Parameter(torch.empty(n_models, d_sae, d_in))
        # Without a decoder bias b_dec stays a zero buffer, so the SAELens layout still has one.
        if decoder_bias:
            self.b_dec = nn.Parameter(torch.zeros(n_models, d_in))
        else:
            self.register_buffer("b_dec", torch.zeros(n_models, d_in))

    # --- the SAE math -------------------------------------------------------------------------------------
    def decoder(self) -> Tensor:
        """Gives the decoder, [M, d_sae, d_in], rows of unit norm."""
        return self.W_dec

    def encoder(self) -> Tensor:
        """Gives the encoder rows actually used, [M, d_sae, d_in] (tied SAEs override this)."""
        return self.W_enc

    @torch.no_grad()
    def constrain_grads(self) -> None:
        """Removes from W_dec's gradient its component along each (unit) row; call before the optimizer step."""
        g = self.W_dec.grad
        if g is not None:
            radial = torch.einsum("mfd,mfd->mf", g, self.W_dec)
            g.addcmul_(self.W_dec, radial.unsqueeze(-1), value=-1.0)

    @torch.no_grad()
    def constrain_weights(self) -> None:
        """Puts every decoder row back at unit norm; call after the optimizer step."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def center(self, x: Tensor) -> Tensor:
        """x: [B, d_in] shared by all models, or [M, B, d_in] → [M, B, d_in] minus b_dec when it is trained."""
        if x.dim() == 2:
            x = x.unsqueeze(0)
        return x - self.b_dec[:, None, :] if self.decoder_bias else x.expand(self.n_models, -1, -1)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Gives the encoder pre-activations, [M, B, d_sae]."""
        return torch.baddbmm(self.b_enc[:, None, :], self.center(x), self.encoder().mT)

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Gives the codes (feature activations), [M, B, d_sae], dense."""

    def decode(self, codes: Tensor) -> Tensor:
        """codes: [M, B, d_sae] → reconstruction [M, B, d_in]."""
        return torch.baddbmm(self.b_dec[:, None, :], codes, self.decoder())

    @abstractmethod
    def train_forward(self, x: Tensor) -> TrainOutput:
        """One training forward on a batch x: [B, d_in] (the fast path; call backward before the next one)."""

    # --- bookkeeping --------------------------------------------------------------------------------------
    @abstractmethod
    def hparams(self, m: int) -> dict[str, Any]:
        """Gives model m's own hyperparameters (l1_alpha, k, ...) for names, results and cfg.json."""

    @torch.no_grad()
    def init_b_dec(self, x: Tensor) -> None:
        """Starts b_dec at the data mean, so the encoder sees centred inputs from step one."""
        if self.decoder_bias:
            self.b_dec.copy_(x.float().mean(0).expand_as(self.b_dec))

    @torch.no_grad()
    def export(self, m: int) -> dict[str, Tensor]:
        """Gives model m's effective weights in the SAELens layout (W_enc [d_in, d_sae], W_dec [d_sae, d_in])."""
        return {
            "W_enc": self.encoder()[m].T.contiguous(),
            "b_enc": self.b_enc[m].clone(),
            "W_dec": self.decoder()[m].contiguous().clone(),
            "b_dec": self.b_dec[m].clone(),
        }

    @torch.no_grad()
    def load_exported(self, m: int, tensors: dict[str, Tensor]) -> None:
        """Puts exported weights back into slot m (inverse of `export`, for continuing from saved SAEs)."""
        self.W_enc[m].copy_(tensors["W_enc"].T)
        self.b_enc[m].copy_(tensors["b_enc"])
        self.W_dec[m].copy_(tensors["W_dec"])
        self.b_dec[m].copy_(tensors["b_dec"])

    def saelens_cfg(self, m: int) -> dict[str, Any]:
        """Gives the architecture-specific fields of cfg.json for model m (beyond d_in, d_sae, ...)."""
        return {}


class BufferCache:
    """Reuses large scratch tensors across steps: a fresh [B, d_sae] tensor costs page faults on every step
    on CPU (measured ~35 ms per 134 MB here, as much as a small matmul), a reused one costs nothing."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self.generation = 0  # bumped by each training forward; a stale backward is refused

    def get(self, name: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or like.dtype
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != like.device:
            buf = torch.empty(shape, dtype=dtype, device=like.device)
            self._buffers[name] = buf
        return buf
