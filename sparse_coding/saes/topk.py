"""`topk`: keep the k largest pre-activations (Gao et al. 2024; sparsify). k is the sparsity knob, no L1.
Loss = FVU + auxk_alpha · AuxK, where AuxK asks the latents that have been dead for `dead_tokens_threshold`
tokens to reconstruct the residual. The encoder starts as the decoder's transpose.

With a free decoder (`decoder_init_norm` > 0; SAELens' default, 0.1, with `rescale_acts_by_decoder_norm`) the
rows start at that norm and train unconstrained, and the SAE computes as if they were unit rows: each latent's
pre-activation is multiplied by its row's norm (which the selection then ranks) and decoded through the
normalized row, so a code times its unit row is what the latent adds. Small rows make Adam's fixed-size steps
turn them faster, which is what this option is for; `encoder()`/`encoder_bias()`/`decoder()` give that effective
unit-row SAE, so export (and SAELens) sees a plain one.

The hot path never forms a dense [B, d_sae] gradient (saes/sparse.py): a step costs one dense matmul (the
encoder forward), the top-k selection and O(B·k·d_in) work. BatchTopK and Matryoshka subclass this class and
change only the selection and the reconstruction term.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from sparse_coding.errors import ConfigError
from sparse_coding.saes.base import SAE, BufferCache, TrainOutput, target_variance
from sparse_coding.saes.kernels import topk_last_dim
from sparse_coding.saes.shard import LatentShard
from sparse_coding.saes.sparse import SparseEncode, sparse_decode

if TYPE_CHECKING:
    from sparse_coding.training.config import SweepConfig


class TopKSAE(SAE):
    architecture = "topk"
    saelens_architecture = "topk"
    knob = "k"
    options = ("auxk_alpha", "dead_tokens_threshold", "decoder_bias", "decoder_init_norm")
    saelens_trainer = "topk_sae.TopKTrainingSAE"
    lowers_decoder = False  # evaluation decodes in fp32 (training's sparse decoder: saes/sparse.py)
    selects_bf16 = True  # both top-k kernels (per row, batch-wide) read a native bf16 product, fp32 bias
    latent_tensors = SAE.latent_tensors + ("tokens_since_fired",)

    # FVU's gradient norm falls ~50x over the first ~50 steps (0.64 -> 0.012 on the tiny model's MLP). Unclipped,
    # those first gradients dominate Adam's second moment (β2 0.999 remembers ~1000 steps) and shrink every later
    # step. bench/vs_saelens.py at lr 2e-3, 2 M tokens, FVU (dead latents): batchtopk unclipped 0.0497, clipped at
    # 0.05 0.0432, at 0.025 0.0406 (435); topk at 0.05 0.0437 (436), at 0.025 0.0422 (519), at 0.0125 0.0414 but
    # 687 dead. SAELens clips at 1.0 on its loss, whose scale is the activations'; FVU's gradient has no such scale.
    def default_grad_clip(self) -> float:
        return 0.025

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        auxk_alpha: float = 1 / 32,
        dead_tokens_threshold: int = 10_000_000,
        decoder_bias: bool = True,
        decoder_init_norm: float = 0.0,
        d_out: int | None = None,
        skip: bool = False,
        shard: LatentShard | None = None,
    ):
        ks = [int(h["k"]) for h in hparams]
        if not all(0 < k <= d_sae for k in ks):
            raise ValueError(f"every k must be in 1..d_sae={d_sae}, got {ks}")
        super().__init__(d_in, d_sae, hparams, decoder_bias, decoder_init_norm, d_out, skip, shard)
        self.ks, self.k_max = ks, max(ks)
        self.auxk_alpha, self.dead_tokens_threshold = auxk_alpha, dead_tokens_threshold
        self.register_buffer("k", torch.tensor(ks))
        self.register_buffer("tokens_since_fired", torch.zeros(self.n_models, self.d_local, dtype=torch.long))
        self.init_transposed()
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

    @classmethod
    def saelens_trainer_fields(cls, value: float, d_sae: int) -> dict[str, Any]:
        return {"k": int(value)}

    # --- a free decoder computes as its unit rows (module docstring) ---------------------------------------
    def decoder(self) -> Tensor:
        return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True) if self.free_decoder else self.W_dec

    def encoder(self) -> Tensor:
        return self.W_enc * self.W_dec.norm(dim=-1, keepdim=True) if self.free_decoder else self.W_enc

    def encoder_bias(self) -> Tensor:
        return self.b_enc * self.W_dec.norm(dim=-1) if self.free_decoder else self.b_enc

    def select(self, pre: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """pre (+ bias [M, d_sae], if given): [M, B, d_sae] → (values, indices) [M, B, k_max]; values ReLU'd,
        zero past each model's k."""
        # Sorted, so rank r is kept by model m when r < k[m], and an SAE sums its latents in the same order
        # whichever other k share its stack: results do not depend on the stacking.
        vals, idx = topk_last_dim(pre, min(self.k_max, self.d_local), bias)
        if self.shard is not None:  # the exact global top-k; entries on other shards come back as zeros
            vals, idx = self.shard.topk_rows(vals, idx, self.k_max)
        vals = vals.relu()
        if any(k != self.k_max for k in self.ks):
            vals = vals * (torch.arange(self.k_max, device=pre.device) < self.k[:, None, None])
        return vals, idx

    def encode(self, x: Tensor) -> Tensor:
        vals, idx = self.select(self.pre_acts(x))  # added, not scattered: a shard's zero entries share latent 0
        return torch.zeros(*vals.shape[:2], self.d_local, device=x.device, dtype=vals.dtype).scatter_add_(-1, idx, vals)

    def decode_entries(self, vals: Tensor, idx: Tensor, n_tokens: int) -> Tensor:
        """The selected entries (either layout, see saes/sparse.py) → their reconstruction [M, B, d_in], no bias;
        on a shard, this shard's part of it."""
        return sparse_decode(vals, idx, self.decoder(), precision=self.precision)

    def latents(self, idx: Tensor) -> Tensor:
        """The latent index of each selected entry (for the per-row layout, idx itself)."""
        return idx

    def reconstruction_loss(
        self, x: Tensor, vals: Tensor, idx: Tensor, total_variance: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Gives the reconstruction term of the loss [M] against x ([B, d_out], or [M, B, d_out]: what the decoder
        should output), the full reconstruction's error [M, B, d_out] (AuxK's target) and the term's parts for
        the training log: here FVU, the squared error over total_variance (the target's)."""
        decoded = self.across_latents(self.decode_entries(vals, idx, x.shape[-2]))
        sq_err, err = _SquaredError.apply(decoded, self.b_dec, x)
        fvu = sq_err / total_variance
        return fvu, err, {"mse": sq_err.detach() / err[0].numel(), "fvu": fvu.detach()}

    @torch.no_grad()
    def record_firing(self, vals: Tensor, idx: Tensor, n_tokens: int) -> None:
        """Restarts the silence count of every latent a token's code used (vals: the selected values)."""
        # Counts, not a boolean scatter: a latent chosen by several tokens, positive for some and zero for
        # others, must come out as fired whichever write lands last.
        fires = torch.zeros(self.n_models, self.d_local, device=vals.device, dtype=torch.float32)
        lat = self.latents(idx).reshape(self.n_models, -1)
        fired = fires.scatter_add_(-1, lat, (vals > 0).reshape(self.n_models, -1).float()) > 0
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)

    def train_forward(self, x: Tensor, stats: bool = True, target: Tensor | None = None) -> TrainOutput:
        M, B = self.n_models, x.shape[0]
        target = x if target is None else target
        dead = self.tokens_since_fired >= self.dead_tokens_threshold  # [M, d_local]
        n_dead = dead.sum(-1)
        if self.shard is not None:
            n_dead = self.shard.all_reduce_(n_dead.clone())
        k_aux = min(self.d_out // 2, int(n_dead.max()))
        vals, idx, aux_vals, aux_idx = SparseEncode.apply(
            x, self.encoder(), self.encoder_bias(), self.center_bias(), self, dead if k_aux > 0 else None, k_aux
        )
        total_variance = target_variance(target)
        # A skip transcoder's latents reconstruct what its linear path leaves: error = decode + skip - target.
        rest = target - self.skip_term(x) if self.skip else target
        loss, err, parts = self.reconstruction_loss(rest, vals, idx, total_variance)
        if k_aux > 0:
            e_hat = self.across_latents(sparse_decode(aux_vals, aux_idx, self.decoder(), precision=self.precision))
            auxk = (e_hat + err.detach()).pow(2).sum(dim=(1, 2)) / total_variance  # target is -err = x - x_hat
            scale = (n_dead.float() / (self.d_out // 2)).clamp(max=1.0)
            loss = loss + self.auxk_alpha * scale * auxk
            parts["auxk"] = auxk.detach()
        self.record_firing(vals.detach(), idx, B)
        if not stats:
            return TrainOutput(loss)
        parts["l0"] = self.across_latents((vals > 0).reshape(M, -1).sum(-1).float()) / B
        parts["dead"] = n_dead.float()  # latents AuxK counts as dead at this step
        return TrainOutput(loss, parts)


class _SquaredError(torch.autograd.Function):
    """(Σ err² per model [M], err [M, B, d]) for err = decoded + b_dec − x, x [B, d] or [M, B, d]; err comes back
    without a gradient (AuxK's target). The sum is one dot product per model and the backward one pass, 2·g·err:
    autograd's pow, sum and their backward made four passes over [M, B, d] and two temporaries (~1.3 ms a step at
    batch 4096, d 512 here)."""

    @staticmethod
    def forward(ctx, decoded, b_dec, x):  # type: ignore[override]
        err = (decoded + b_dec[:, None, :]).sub_(x)
        flat = err.view(err.shape[0], 1, -1)
        ctx.save_for_backward(err)
        ctx.x_shared = x.dim() == 2
        ctx.mark_non_differentiable(err)
        return torch.bmm(flat, flat.mT).view(-1), err

    @staticmethod
    def backward(ctx, g_sq, _g_err):  # type: ignore[override]
        (err,) = ctx.saved_tensors
        g = err * (2 * g_sq)[:, None, None]
        g_x = None
        if ctx.needs_input_grad[2]:  # a skip transcoder's target, x less its skip path
            g_x = -(g.sum(0) if ctx.x_shared else g)
        return g, g.sum(1), g_x
