"""`topk`: keep the k largest pre-activations (Gao et al. 2024; sparsify). k is the sparsity knob, no L1.
Loss = FVU + auxk_alpha · AuxK, where AuxK asks the latents that have been dead for `dead_tokens_threshold`
tokens to reconstruct the residual. The encoder starts as the decoder's transpose.

The hot path never forms a dense [B, d_sae] gradient: the decoder is an embedding-bag over the k chosen
rows, and both weight gradients are per-latent sums over the same k entries per token (kernels.latent_sum),
so a step costs one dense matmul (the encoder forward), the top-k selection and O(B·k·d_in) work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_coding.errors import ConfigError
from sparse_coding.saes.base import SAE, BufferCache, TrainOutput
from sparse_coding.saes.kernels import fuses_bias, latent_sum, topk_last_dim

if TYPE_CHECKING:
    from sparse_coding.training.config import SweepConfig


class TopKSAE(SAE):
    architecture = "topk"
    saelens_architecture = "topk"
    knob = "k"
    options = ("auxk_alpha", "dead_tokens_threshold", "decoder_bias")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        auxk_alpha: float = 1 / 32,
        dead_tokens_threshold: int = 10_000_000,
        decoder_bias: bool = True,
        d_out: int | None = None,
        skip: bool = False,
    ):
        ks = [int(h["k"]) for h in hparams]
        if not all(0 < k <= d_sae for k in ks):
            raise ValueError(f"every k must be in 1..d_sae={d_sae}, got {ks}")
        super().__init__(d_in, d_sae, hparams, decoder_bias, d_out, skip)
        self.ks, self.k_max = ks, max(ks)
        self.auxk_alpha, self.dead_tokens_threshold = auxk_alpha, dead_tokens_threshold
        self.register_buffer("k", torch.tensor(ks))
        self.register_buffer("tokens_since_fired", torch.zeros(self.n_models, d_sae, dtype=torch.long))
        with torch.no_grad():
            self.W_dec.uniform_(-(self.d_out**-0.5), self.d_out**-0.5)
            self.constrain_weights()
            if self.transcoder:  # the encoder reads another space than the decoder writes
                self.W_enc.uniform_(-(d_in**-0.5), d_in**-0.5)
            else:
                self.W_enc.copy_(self.W_dec)
        self._cache = BufferCache()

    @classmethod
    def knob_values(cls, cfg: SweepConfig) -> list[int]:
        return [int(k) for k in cfg.k_values]

    @classmethod
    def check_sweep(cls, cfg: SweepConfig, dict_sizes: list[int]) -> None:
        if max(cfg.k_values) > min(dict_sizes):
            raise ConfigError(f"k={max(cfg.k_values)} is larger than the smallest dictionary ({min(dict_sizes)})")

    def tag(self, m: int) -> str:
        return f"k{self.ks[m]}"

    def saelens_cfg(self, m: int) -> dict[str, Any]:
        return {"k": self.ks[m], "rescale_acts_by_decoder_norm": False}

    @classmethod
    def hparams_from_saelens(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"k": int(cfg["k"])}

    def select(self, pre: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """pre (+ bias [M, d_sae], if given): [M, B, d_sae] → (values, indices) [M, B, k_max]; values ReLU'd,
        zero past each model's k."""
        # Sorted, so rank r is kept by model m when r < k[m], and an SAE sums its latents in the same order
        # whichever other k share its stack: results do not depend on the stacking.
        vals, idx = topk_last_dim(pre, self.k_max, bias)
        vals = vals.relu()
        if any(k != self.k_max for k in self.ks):
            vals = vals * (torch.arange(self.k_max, device=pre.device) < self.k[:, None, None])
        return vals, idx

    def encode(self, x: Tensor) -> Tensor:
        vals, idx = self.select(self.pre_acts(x))
        return torch.zeros(*vals.shape[:2], self.d_sae, device=x.device, dtype=vals.dtype).scatter_(-1, idx, vals)

    def train_forward(self, x: Tensor, stats: bool = True, target: Tensor | None = None) -> TrainOutput:
        M, B = self.n_models, x.shape[0]
        target = x if target is None else target
        W_dec = self.decoder()
        dead = self.tokens_since_fired >= self.dead_tokens_threshold  # [M, d_sae]
        n_dead = dead.sum(-1)
        k_aux = min(self.d_out // 2, int(n_dead.max()))
        vals, idx, aux_vals, aux_idx = _TopKEncode.apply(
            x, self.W_enc, self.b_enc, self.b_dec, self, dead if k_aux > 0 else None, k_aux
        )
        x_hat = sparse_decode(vals, idx, W_dec) + self.b_dec[:, None, :]
        if self.skip:
            x_hat = x_hat + self.skip_term(x)
        err = x_hat - target
        total_variance = (target - target.mean(0)).pow(2).sum()  # (torch's var over dim 0 is ~6x slower here)
        sq_err = err.pow(2).sum(dim=(1, 2))
        fvu = sq_err / total_variance
        loss, auxk = fvu, None
        if k_aux > 0:
            e_hat = sparse_decode(aux_vals, aux_idx, W_dec)
            auxk = (e_hat + err.detach()).pow(2).sum(dim=(1, 2)) / total_variance  # target is -err = x - x_hat
            scale = (n_dead.float() / (self.d_out // 2)).clamp(max=1.0)
            loss = loss + self.auxk_alpha * scale * auxk
        with torch.no_grad():
            # Counts, not a boolean scatter: a latent chosen by several tokens, positive for some and zero for
            # others, must come out as fired whichever write lands last.
            fires = torch.zeros(M, self.d_sae, device=x.device, dtype=torch.float32)
            fired = fires.scatter_add_(-1, idx.reshape(M, -1), (vals > 0).reshape(M, -1).float()) > 0
            self.tokens_since_fired.add_(B).masked_fill_(fired, 0)
        if not stats:
            return TrainOutput(loss)
        parts = {
            "mse": sq_err.detach() / err[0].numel(),
            "fvu": fvu.detach(),
            "l0": (vals > 0).sum(-1).float().mean(-1),
            "dead": n_dead.float(),  # latents AuxK counts as dead at this step
        }
        if auxk is not None:
            parts["auxk"] = auxk.detach()
        return TrainOutput(loss, parts)


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """vals, idx: [M, B, k], W_dec: [M, d_sae, d_in] → Σ_k vals · W_dec[idx], [M, B, d_in] (no bias).

    embedding_bag gives the output and the gradient of vals; the decoder's gradient comes from latent_sum over
    the same k entries per token (a fifth of embedding_bag's own dense scatter backward here)."""
    M, B, k = idx.shape
    d_sae, d_in = W_dec.shape[1:]
    offsets = (torch.arange(M, device=idx.device) * d_sae)[:, None, None]
    out = F.embedding_bag(
        (idx + offsets).reshape(M * B, k),
        W_dec.detach().reshape(M * d_sae, d_in),
        per_sample_weights=vals.reshape(M * B, k),
        mode="sum",
    )
    return _DecoderGrad.apply(out.view(M, B, d_in), vals.detach(), idx, W_dec)


class _DecoderGrad(torch.autograd.Function):
    """Passes the decoder output through and gives W_dec its gradient, Σ over tokens that chose a latent of
    vals · g_out[token]."""

    @staticmethod
    def forward(ctx, out, vals, idx, W_dec):  # type: ignore[override]
        ctx.save_for_backward(vals, idx)
        ctx.d_sae = W_dec.shape[1]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g_out):  # type: ignore[override]
        vals, idx = ctx.saved_tensors
        return g_out, None, None, latent_sum(idx, vals, g_out, ctx.d_sae)[0]


def _top_dead(pre: Tensor, dead: Tensor, k_aux: int, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """pre (+ bias): [M, B, d_sae], dead: [M, d_sae] → the k_aux largest pre-activations among each model's
    dead latents (ReLU'd; 0 where a model has fewer than k_aux), sorted, and their latent indices. Gathers the
    dead columns first, so a handful of dead latents costs a handful of columns, not a pass over all of pre."""
    M, B, _ = pre.shape
    n_dead = dead.sum(-1)
    D = int(n_dead.max())
    cols = torch.argsort((~dead).to(torch.uint8), dim=-1, stable=True)[:, :D]  # dead latents first, in order
    sub = pre.gather(-1, cols[:, None, :].expand(M, B, D))
    if bias is not None:
        sub += bias.gather(-1, cols)[:, None, :]
    sub.masked_fill_((torch.arange(D, device=pre.device) >= n_dead[:, None])[:, None, :], float("-inf"))
    vals, pos = topk_last_dim(sub, k_aux)  # sorted: see select()
    return vals.relu(), cols.gather(-1, pos.reshape(M, -1)).view(M, B, k_aux)


class _TopKEncode(torch.autograd.Function):
    """Encoder forward (one dense matmul into a reused buffer, then top-k; optionally the AuxK top-k over
    dead latents from the same pre-activations) with a backward that touches only the selected entries."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, sae: TopKSAE, dead: Tensor | None, k_aux: int):  # type: ignore[override]
        cache: BufferCache = sae._cache
        M, B, F_ = W_enc.shape[0], x.shape[0], W_enc.shape[1]
        xc = x.unsqueeze(0) - b_dec[:, None, :] if sae.centers_input else x.unsqueeze(0).expand(M, -1, -1)
        pre = cache.get("pre", (M, B, F_), x)
        # Where the top-k adds b_enc on the fly (CPU), pre skips it: one pass less over [M, B, d_sae].
        bias = b_enc if fuses_bias(pre) else None
        if bias is None:
            torch.baddbmm(b_enc[:, None, :], xc, W_enc.mT, out=pre)
        else:
            torch.bmm(xc, W_enc.mT, out=pre)
        vals, idx = sae.select(pre, bias)
        if dead is not None:
            aux_vals, aux_idx = _top_dead(pre, dead, k_aux, bias)
        else:
            aux_vals = x.new_zeros(M, B, 0)
            aux_idx = torch.zeros(M, B, 0, dtype=torch.long, device=x.device)
        ctx.center = sae.centers_input
        ctx.save_for_backward(xc, W_enc, vals, idx, aux_vals, aux_idx)
        ctx.mark_non_differentiable(idx, aux_idx)
        return vals, idx, aux_vals, aux_idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx, g_aux, _g_aux_idx):  # type: ignore[override]
        xc, W_enc, vals, idx, aux_vals, aux_idx = ctx.saved_tensors
        F_ = W_enc.shape[1]
        if g_aux is None or aux_idx.shape[-1] == 0:
            g, sel = g_vals * (vals > 0), idx
        else:
            g = torch.cat([g_vals * (vals > 0), g_aux * (aux_vals > 0)], dim=-1)
            sel = torch.cat([idx, aux_idx], dim=-1)
        # W_enc.grad[m, j] = Σ over (token, slot) that chose j of g · xc[token]; b_enc.grad[m, j] = Σ g.
        g_W_enc, g_b_enc = latent_sum(sel, g, xc, F_)
        g_b_dec = -torch.bmm(g_b_enc[:, None, :], W_enc)[:, 0, :] if ctx.center else None
        return None, g_W_enc, g_b_enc, g_b_dec, None, None, None
