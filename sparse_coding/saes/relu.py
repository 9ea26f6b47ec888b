"""`relu`: the original research code's SAE (SAELens calls it 'standard').

codes = ReLU(x W_enc + b_enc), unit-norm decoder rows, orthogonal decoder init, encoder initialised like torch's
nn.Linear (as the original; it lets surplus features die, which the dead-feature heatmap relies on), tied or untied;
loss = MSE + l1_alpha · L1(codes). With a free decoder (`decoder_init_norm` > 0; untied only) relu is SAELens'
standard SAE (Anthropic's April 2024 update), down to its optimiser: the rows start uniform at that norm, the
encoder as their transpose, b_enc and b_dec at 0; L1 weighs each code by its decoder row's norm. Our loss is
SAELens' divided by d_out (the squared error is a mean over d_out, not a sum; l1_alpha = SAELens' l1_coefficient ·
d_sae / d_out), so its gradient clip (1) and Adam ε (1e-8) are divided by d_out too, which makes the two
trajectories the same: on the tiny model's MLP ours then gives SAELens' L0 and, within a few per cent, its FVU and
dead latents (README). With torch's ε instead the dead latents differed by ~100 of 4096.

Once the codes are sparse (`sparse_below`), a step runs as the TopK family's does (saes/sparse.py): one dense
matmul for the encoder, then work over the positive codes only; before that, the dense step below. Both are exact.

Dead-latent resampling (`--resample_every`, Bricken et al. 2023, "Towards monosemanticity"): at every multiple
of resample_every steps, each latent that fired on none of the last `--resample_window` steps' tokens is
re-initialised towards an input the SAE reconstructs badly (drawn with probability ∝ its squared loss): decoder
row = that input minus b_dec, normalised; encoder row = the same direction at 0.2 × the mean norm of the living
encoder rows; bias 0. The trainer then resets those rows' Adam moments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from sparse_coding.errors import ConfigError
from sparse_coding.saes.base import SAE, BufferCache, PenaltySAE, TrainOutput
from sparse_coding.saes.precision import Precision
from sparse_coding.saes.shard import LatentShard
from sparse_coding.saes.sparse import SparseEncode, sparse_decode, split_flat

if TYPE_CHECKING:
    from sparse_coding.training.config import SweepConfig

L1_NORMS = ("dict_size", "none")


class ReluSAE(PenaltySAE):
    architecture = "relu"
    saelens_architecture = "standard"
    saelens_transcoder = ("transcoder", "skip_transcoder")
    saelens_trainer = "standard_sae.StandardTrainingSAE"
    knob = "l1_alpha"
    tag_prefix = "l1"
    can_resample = True
    # The recipe where the config leaves it (run.py): SAELens' standard SAE, free rows at 0.1 (its init, clip and
    # Adam ε), plus our resampling of dead latents every 50 steps. On the tiny model's MLP it matches or beats SAELens'
    # FVU at SAELens' own L0 with fewer dead latents; unit rows without resampling (the original code's recipe, which
    # the toy replication keeps) lost that match by 19 % (README, bench/vs_saelens.py).
    default_resample_every = 50
    options = ("tied", "l1_norm", "decoder_init_norm", "decoder_bias")
    latent_tensors = SAE.latent_tensors + ("steps_since_fired",)
    # Below this fraction of positive codes a step runs sparse: the encoder's matmul, then O(entries · d_in) work
    # over the positive codes (saes/sparse.py) instead of four more dense matmuls. Measured here (d_in 512,
    # d_sae 4096, batch 4096, one SAE): dense 0.70-0.76 s a step; sparse 0.41 s at L0 152 (3.7 %), 1.03 s at L0 598
    # (14.6 %), so they cross near 9 %. Training brings L0 below it within ~20 steps at any useful L1.
    sparse_below: ClassVar[float] = 0.08

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        tied: bool = False,
        l1_norm: str = "dict_size",
        decoder_init_norm: float = 0.0,
        decoder_bias: bool = True,
        d_out: int | None = None,
        skip: bool = False,
        shard: LatentShard | None = None,
    ):
        """l1_norm: 'dict_size' divides the L1 term by d_sae (as the original toy code did, so one l1 grid
        suits every dictionary size); 'none' uses the plain sum over features."""
        if l1_norm not in L1_NORMS:
            raise ValueError(f"l1_norm must be one of {L1_NORMS}, got {l1_norm!r}")
        if tied and decoder_init_norm > 0:
            raise ValueError("a tied relu SAE keeps unit-norm decoder rows (decoder_init_norm must be 0)")
        if tied and d_out is not None:
            raise ConfigError("--tied does not apply to transcoders: the encoder reads another space than the decoder")
        super().__init__(d_in, d_sae, hparams, decoder_bias, decoder_init_norm, d_out, skip, shard)
        self.tied, self.l1_norm = tied, l1_norm
        self.register_buffer("steps_since_fired", torch.zeros(self.n_models, self.d_local, dtype=torch.long))
        with torch.no_grad():
            if self.free_decoder:  # SAELens' standard init; b_enc stays 0, and b_dec too (init_b_dec)
                self.init_transposed()
            else:  # as the original: orthogonal decoder (per block of latents), nn.Linear's default encoder init
                bound = d_in**-0.5

                def uniform(t: Tensor, g: torch.Generator) -> None:
                    t.uniform_(-bound, bound, generator=g)

                self.W_dec.copy_(
                    self.init_rows("W_dec", (self.d_out,), lambda t, g: nn.init.orthogonal_(t, generator=g))
                )
                self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
                self.W_enc.copy_(self.init_rows("W_enc", (d_in,), uniform))
                self.b_enc.copy_(self.init_rows("b_enc", (), uniform))
        if tied:
            del self.W_enc  # the encoder is the decoder's transpose; nothing separate to learn
        self._cache = BufferCache()

    @classmethod
    def saelens_trainer_fields(cls, value: float, d_sae: int) -> dict[str, Any]:
        return {"l1_coefficient": value}

    @classmethod
    def default_options(cls, cfg: SweepConfig) -> dict[str, Any]:
        return {"decoder_init_norm": 0.0 if cfg.tied else 0.1}  # a tied SAE keeps unit rows

    def default_grad_clip(self) -> float:
        return 1.0 / self.d_out if self.free_decoder else 0.0

    def adam_eps(self) -> float:
        return 1e-8 / self.d_out if self.free_decoder else 1e-8

    def init_b_dec(self, target: Tensor) -> None:
        if not self.free_decoder:  # with a free decoder b_dec starts at 0, as SAELens'
            super().init_b_dec(target)

    def encoder(self) -> Tensor:
        return self.W_dec if self.tied else self.W_enc

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x))

    def l1_scale(self) -> float:
        return 1.0 / self.d_sae if self.l1_norm == "dict_size" else 1.0

    def l1_weights(self) -> Tensor | None:
        """Each latent's weight in the L1 term, [M, d_sae]: its decoder norm with a free decoder, else none (1)."""
        return self.decoder_norms() if self.free_decoder else None

    def train_forward(self, x: Tensor, stats: bool = True, target: Tensor | None = None) -> TrainOutput:
        weights = self.l1_weights()
        M, B = self.n_models, x.shape[0]
        with torch.no_grad():  # the codes first (their gradients come from the step below), to choose its path
            xc = self.center(x)
            codes = self._cache.get("codes", (M, B, self.d_local), self.b_enc)
            self.precision.baddbmm(self.b_enc[:, None, :], xc, self.encoder().mT, out=codes)
            codes.relu_()
        bias = self.output_bias()
        if self.runs_sparse(codes):
            vals, idx, _, _ = SparseEncode.apply(
                x, self.encoder(), self.b_enc, self.center_bias(), self, None, 0, codes
            )
            rows, lat = split_flat(idx, self.d_local)
            x_hat = sparse_decode(vals, lat, self.decoder(), rows, B, self.precision)
            x_hat = self.decoded(x_hat if bias is None else x_hat + bias[:, None, :])
            l1 = (vals if weights is None else vals * weights.gather(-1, lat)).sum(-1) / B
        else:
            x_hat, l1 = _ReluSAEStep.apply(
                xc, codes, self.encoder(), self.b_enc, self.decoder(), self.center_bias(), bias, weights,
                self.centers_input, self._cache, self.precision,
            )  # fmt: skip
            x_hat = self.decoded(x_hat)
        l1 = self.across_latents(l1)
        if self.skip:
            x_hat = x_hat + self.skip_term(x)
        mse = (x_hat - (x if target is None else target)).pow(2).mean(dim=(1, 2))
        loss = mse + self.coefficient() * self.l1_scale() * l1
        if self.track_firing:
            with torch.no_grad():
                self.steps_since_fired.add_(1).masked_fill_(codes.amax(dim=1) > 0, 0)
        if not stats:  # L0 is an extra read of the codes; the trainer asks only when it logs
            return TrainOutput(loss)
        with torch.no_grad():
            l0 = self.across_latents(torch.count_nonzero(codes, dim=-1).float().mean(-1))
        return TrainOutput(loss, {"mse": mse.detach(), "l1": l1.detach(), "l0": l0})

    def runs_sparse(self, codes: Tensor) -> bool:
        """Whether a step with these codes [M, B, d_sae] takes the sparse path: fp32 only (its gathers have a bf16
        form in the CPU kernels alone; under bf16/fp16 the dense step's matmuls are) and codes sparse enough, judged
        on every 64th token. Either path is exact; this choice is a function of the codes alone, so a resumed run
        chooses as the killed one did."""
        if self.precision.low is not None:
            return False
        sample = codes[:, :: max(1, codes.shape[1] // 64)]
        nonzero = torch.count_nonzero(sample).reshape(1)
        if self.shard is not None:  # every shard takes the path the whole dictionary's codes choose
            self.shard.all_reduce_(nonzero)
        return int(nonzero) < self.sparse_below * sample.numel() * (self.shard.world if self.shard else 1)

    def select(self, pre: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """codes [M, B, d_sae] (ReLU'd; no bias) → their positive entries (values, flat indices) [M, N] in
        saes/sparse.py's flat layout, N the largest count of a model, the others padded with value 0 at index
        B·d_sae − 1."""
        M, B, F_ = pre.shape
        where = torch.nonzero(pre.view(M, B * F_))  # [entries, 2]: (model, flat index), in order
        counts = torch.bincount(where[:, 0], minlength=M)
        slot = torch.arange(len(where), device=pre.device) - (counts.cumsum(0) - counts)[where[:, 0]]
        n = int(counts.max()) if len(where) else 0
        idx = torch.full((M, n), B * F_ - 1, dtype=torch.long, device=pre.device)
        vals = pre.new_zeros(M, n)
        idx[where[:, 0], slot] = where[:, 1]
        vals[where[:, 0], slot] = pre.view(M, -1)[where[:, 0], where[:, 1]]
        return vals, idx

    @torch.no_grad()
    def resample(self, x: Tensor, window: int, generator: torch.Generator) -> Tensor:
        """Anthropic's recipe (module docstring) on inputs x [N, d_in]; gives the mask of resampled latents. On a
        shard every rank draws the whole dictionary's picks (same generator, same losses) and takes its own, so the
        result is the unsharded one."""
        dead = self.steps_since_fired >= window
        counts = dead.sum(-1)[None]  # [shards, M]: dead latents per shard
        if self.shard is not None:
            counts = self.shard.all_gather(counts[0])
        if not counts.any():
            return dead
        sq_err = torch.cat([(self.decode(self.encode(xb)) - xb).pow(2).sum(-1) for xb in x.split(4096)], dim=1)
        first = counts[: self.shard.rank].sum(0) if self.shard is not None else torch.zeros_like(counts[0])
        for m in torch.nonzero(counts.sum(0)).flatten().tolist():
            rows = dead[m]
            picks = torch.multinomial(sq_err[m].pow(2), int(counts[:, m].sum()), replacement=True, generator=generator)
            direction = x[picks[int(first[m]) : int(first[m]) + int(rows.sum())]] - self.b_dec[m]
            direction /= direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            self.W_dec[m, rows] = direction * (self.decoder_init_norm if self.free_decoder else 1.0)
            if not self.tied:
                alive = self.W_enc[m, ~rows].norm(dim=-1)
                total = torch.stack([alive.sum(), torch.tensor(float(alive.numel()), device=alive.device)])
                if self.shard is not None:
                    self.shard.all_reduce_(total)
                self.W_enc[m, rows] = direction * 0.2 * (total[0] / total[1] if total[1] > 0 else 1.0)
            self.b_enc[m, rows] = 0.0
        self.steps_since_fired.masked_fill_(dead, 0)
        return dead

    def load_exported(self, m: int, tensors: dict[str, Tensor]) -> None:
        if not self.tied:
            return super().load_exported(m, tensors)
        with torch.no_grad():
            self.b_enc[m].copy_(tensors["b_enc"])
            self.W_dec[m].copy_(tensors["W_dec"])
            self.b_dec[m].copy_(tensors["b_dec"])


class _ReluSAEStep(torch.autograd.Function):
    """The dense step: decoder forward and the whole backward, with the [M, B, d_sae] tensors in reused buffers and
    the ReLU, L1 and bias gradients folded into in-place passes; four matmuls are all that is left of note.

    xc: [M, B, d_in], the (centred) input; codes: [M, B, d_sae] = ReLU(xc W_encᵀ + b_enc), computed by the caller
    without a graph (a buffer, valid until the next step); this Function gives W_enc, b_enc (and b_center, the bias
    xc had subtracted) their gradients. W_dec: [M, d_sae, d_out]; b_out: the bias added to the output (None on a
    shard, whose output is partial); weights: [M, d_sae] or None (each latent's L1 weight, its decoder norm with a
    free decoder). Returns x_hat [M, B, d_out] and l1 [M] (mean over the batch of the summed, weighted codes).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, xc, codes, W_enc, b_enc, W_dec, b_center, b_out, weights, center: bool, cache: BufferCache,
        precision: Precision,
    ):  # fmt: skip
        B = xc.shape[1]
        x_hat = precision.baddbmm(None if b_out is None else b_out[:, None, :], codes, W_dec)
        if weights is None:
            l1 = codes.sum(dim=(1, 2)) / B  # codes ≥ 0, so the sum is the L1 norm
            code_sums = None
        else:
            code_sums = codes.sum(dim=1)
            l1 = (code_sums * weights).sum(-1) / B
        cache.generation += 1
        ctx.generation, ctx.cache, ctx.center, ctx.precision = cache.generation, cache, center, precision
        ctx.has_out_bias = b_out is not None
        ctx.save_for_backward(xc, W_enc, W_dec, codes, weights, code_sums)
        return x_hat, l1

    @staticmethod
    def backward(ctx, g_xhat, g_l1):  # type: ignore[override]
        if ctx.generation != ctx.cache.generation:
            raise RuntimeError("a second training forward ran before this one's backward; its buffers are gone")
        xc, W_enc, W_dec, codes, weights, code_sums = ctx.saved_tensors
        M, B, F_ = codes.shape
        g_codes = ctx.cache.get("g_codes", (M, B, F_), codes)
        mm = ctx.precision
        mm.bmm(g_xhat, W_dec.mT, out=g_codes)
        if weights is None:
            g_codes.add_((g_l1 / B)[:, None, None])  # d(l1)/d(codes) = 1/B where codes > 0
            g_weights = None
        else:
            g_codes.add_((g_l1 / B)[:, None, None] * weights[:, None, :])
            g_weights = (g_l1 / B)[:, None] * code_sums
        torch.ops.aten.threshold_backward.grad_input(g_codes, codes, 0.0, grad_input=g_codes)  # ReLU mask
        g_W_enc = mm.bmm(g_codes.mT, xc)
        g_b_enc = g_codes.sum(dim=1)
        g_W_dec = mm.bmm(codes.mT, g_xhat)
        g_b_out = g_xhat.sum(dim=1) if ctx.has_out_bias else None
        # xc = x - b_center: its gradient summed over the batch is -g_b_enc @ W_enc
        g_b_center = -torch.bmm(g_b_enc[:, None, :], W_enc)[:, 0, :] if ctx.center else None
        return None, None, g_W_enc, g_b_enc, g_W_dec, g_b_center, g_b_out, g_weights, None, None, None
