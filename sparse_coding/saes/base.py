"""The interface every SAE architecture implements, for a stack of SAEs trained in lockstep.

A stack holds `n_models` SAEs of one dictionary size with parameters on a leading model axis:
W_enc [M, d_sae, d_in] (one row per latent, the layout the sparse TopK gradient fills), b_enc [M, d_sae],
W_dec [M, d_sae, d_out], b_dec [M, d_out]. Exported tensors follow SAELens (W_enc [d_in, d_sae]).

Every architecture also trains as a transcoder (`d_out` given): it encodes a module's input and decodes to the
module's output, so its loss compares the reconstruction with a target rather than with its input; b_dec lives
in the output space and is not subtracted from the input (SAELens' `apply_b_dec_to_input=False`); with `skip`
a learned linear map W_skip [M, d_out, d_in] of the input is added to the output (SAELens' skip transcoder).
A transcoder's training batches hold input and target side by side, [B, d_in + d_out] (`split_batch`), so one
shuffle keeps each pair together and every batch source stays a single tensor.

Decoder rows are kept at unit norm in parameter space: before each optimizer step the gradient's component
along each row is removed, after it each row is rescaled to norm 1. At unit norm that projected gradient is
exactly the gradient of normalizing in the forward pass (the original research code's way), without the
extra [d_sae, d_in] tensors per step that forward normalization allocates. Every architecture but tied relu also
offers a free decoder (`decoder_init_norm` > 0: rows start at that norm and are not constrained, Anthropic's April
2024 recipe and SAELens' default): a sparsity penalty weighs each latent by its decoder row's norm; the TopK family
scales each code by it (saes/topk.py).
"""

from __future__ import annotations

import hashlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from sparse_coding.saes.precision import FP32, Precision
from sparse_coding.saes.shard import LatentShard

if TYPE_CHECKING:
    from sparse_coding.training.config import SweepConfig


WEIGHTS_FILE = "sae_weights.safetensors"  # SAELens' weights file; a family with another layout names its own files
# Latents per independently seeded block of the initialisation (see SAE.init_rows).
INIT_BLOCK = 4096
_SKIP_INIT: ContextVar[bool] = ContextVar("skip_init", default=False)


@contextmanager
def uninitialised() -> Iterator[None]:
    """Stacks built inside skip drawing their initial weights (and consume no random numbers): for copies whose
    state is loaded right after (slices, folded copies, stacks put back together from shards)."""
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


def target_variance(target: Tensor, groups: int = 1) -> Tensor:
    """FVU's denominator: the batch's squared distance from its mean, summed over target [B, d] (a scalar), or
    over each of `groups` equal blocks of columns ([groups]: a cross-layer transcoder's layers). Summed in float32
    at least (a bf16 batch's would keep 8 bits of it); the whole one as a dot product (torch's var over dim 0 is
    ~6x slower)."""
    wide = target.to(torch.promote_types(target.dtype, torch.float32))
    centered = wide - wide.mean(0)
    if groups == 1:
        flat = centered.reshape(-1)
        return torch.dot(flat, flat)
    return centered.pow(2).view(target.shape[0], groups, -1).sum(dim=(0, 2))  # (einsum's sum: ~5e-5 off in fp32)


@dataclass
class TrainOutput:
    """What one training forward gives back: `loss` [M] is what gets minimised; `parts` holds its terms and
    other per-model statistics of the batch ([M] each: mse, l0, l1 or fvu and auxk), filled only when asked
    for, for the training log."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


class SAE(nn.Module, ABC):
    """A stack of `n_models` SAEs sharing d_in and d_sae; subclasses add the encoder nonlinearity and loss.

    The class owns everything about its architecture, so nothing outside saes/ tests its name: the knob swept
    per SAE and where a sweep config gives its values (`knob_values`), the stack-wide options it reads from a
    sweep config (`options`), its run-name tag, its SAELens cfg.json fields and how a saved one is read back.
    """

    architecture: ClassVar[str]  # our name: the registry key, --arch, "arch" in cfg.json's metadata
    saelens_architecture: ClassVar[str]  # the name SAELens' cfg.json uses
    saelens_training_architecture: ClassVar[str | None] = None  # SAELens' metadata name, where not the above
    # SAELens' names for this encoder as a transcoder and as a skip transcoder; None where SAELens has none
    # (the folder then names our own architecture and only `load_sae` reads it).
    saelens_transcoder: ClassVar[tuple[str, str] | None] = None
    knob: ClassVar[str]  # the per-SAE sparsity setting a sweep varies ("l1_alpha", "k", ...)
    options: ClassVar[tuple[str, ...]] = ("decoder_bias",)  # sweep-config fields every SAE of a stack shares
    # The matmuls of the architecture's dense training step, [B, d_in]×[d_in, d_sae]-sized each (bench/sae_step.py
    # times them as the roofline): encoder forward, decoder forward, the codes' gradient, both weight gradients.
    roofline_matmuls: ClassVar[tuple[str, ...]] = ("encoder", "decoder", "codes_grad", "decoder_grad", "encoder_grad")
    # Trained on several layers at once (CLTs, crosscoders): batches hold every layer's activations side by side;
    # not in --arch all.
    cross_layer: ClassVar[bool] = False
    # A cross-layer family that reads each layer's MLP input and writes MLP outputs (a CLT) rather than
    # reconstructing the hooks it reads (a crosscoder).
    layer_transcoder: ClassVar[bool] = False
    n_layers: int = 1  # the layers a cross-layer stack spans; its outputs (and codes) are that many blocks
    can_resample: ClassVar[bool] = False  # re-initialises dead latents when the trainer asks (`resample`)
    default_resample_every: ClassVar[int] = 0  # steps between resamplings where the config leaves it (0: never)
    # Whether `select` takes the native bf16 product of a CPU matmul with an fp32 bias (the top-k kernel widens as
    # it reads; the values are those of the widened product): SparseEncode then skips the widening pass.
    selects_bf16: ClassVar[bool] = False
    # Whether `decode` (evaluation) runs in the stack's precision: yes where training decodes with a dense matmul;
    # the TopK family trains through a sparse decoder (bf16 rows only in the CPU kernels), and evaluates in fp32.
    lowers_decoder: ClassVar[bool] = True
    # SAELens' training SAE for this architecture ("module.Class" under sae_lens.saes), what comparisons against
    # SAELens train (bench/vs_saelens.py); None where SAELens trains none.
    saelens_trainer: ClassVar[str | None] = None
    # The parameters and buffers with a row per latent, [M, d_sae, ...]: what latent sharding splits (saes/shard.py).
    # Everything else (b_dec, W_skip, per-model settings) is the same on every shard.
    latent_tensors: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        decoder_bias: bool = True,
        decoder_init_norm: float = 0.0,
        d_out: int | None = None,
        skip: bool = False,
        shard: LatentShard | None = None,
    ):
        """decoder_init_norm 0 keeps the decoder rows at unit norm; > 0 starts them at that norm, unconstrained.
        d_out: a transcoder's output width (None: an SAE, reconstructing its input); skip: a transcoder's learned
        linear skip connection; shard: the latents this process holds (None: all of them)."""
        super().__init__()
        if not hparams or any(self.knob not in h for h in hparams):
            raise ValueError(f"{self.architecture} needs a {self.knob!r} for every SAE of the stack, got {hparams}")
        if decoder_init_norm < 0:
            raise ValueError(f"decoder_init_norm must be ≥ 0, got {decoder_init_norm}")
        if skip and d_out is None:
            raise ValueError("a skip connection belongs to transcoders (give d_out)")
        if shard is not None and shard.d_sae != d_sae:
            raise ValueError(f"a shard of {shard.d_sae} latents for a dictionary of {d_sae}")
        self.shard = shard
        self.d_local = shard.size if shard is not None else d_sae  # the latents held here
        self.latent_start = shard.start if shard is not None else 0
        # Each stack's initialisation is drawn from generators seeded by this (see init_rows).
        self.init_seed = 0 if _SKIP_INIT.get() else int(torch.randint(2**62, (), device="cpu"))
        self._hparams = [dict(h) for h in hparams]
        self.transcoder, self.skip = d_out is not None, skip
        self.d_in, self.d_sae, self.n_models = d_in, d_sae, len(hparams)
        self.d_out = d_in if d_out is None else d_out
        self.decoder_bias, self.decoder_init_norm = decoder_bias, decoder_init_norm
        self.sparsity_scale = 1.0  # the fraction of its sparsity coefficient a model uses now (the trainer's warm-up)
        self.track_firing = False  # whether train_forward keeps steps_since_fired (resampling architectures)
        self.precision: Precision = FP32  # how the big matmuls run (--train_dtype; saes/precision.py)
        self.make_weights()
        # Without a decoder bias b_dec stays a zero buffer, so the SAELens layout still has one.
        if decoder_bias:
            self.b_dec = nn.Parameter(torch.zeros(self.n_models, self.d_out))
        else:
            self.register_buffer("b_dec", torch.zeros(self.n_models, self.d_out))
        if skip:  # starts at zero, as SAELens', so training begins from the plain transcoder
            self.W_skip = nn.Parameter(torch.zeros(self.n_models, self.d_out, d_in))

    def make_weights(self) -> None:
        """Makes the per-latent weights, uninitialised: W_enc [M, d_local, d_in], b_enc [M, d_local] (zeros) and
        W_dec [M, d_local, d_out]; a family whose latents are laid out otherwise (saes/clt.py) makes its own."""
        M, F_ = self.n_models, self.d_local
        self.W_enc = nn.Parameter(torch.empty(M, F_, self.d_in))
        self.b_enc = nn.Parameter(torch.zeros(M, F_))
        self.W_dec = nn.Parameter(torch.empty(M, F_, self.d_out))

    @property
    def centers_input(self) -> bool:
        """Whether b_dec is subtracted from the input before encoding (SAEs with a decoder bias; never a
        transcoder, whose b_dec lives in the output space)."""
        return self.decoder_bias and not self.transcoder

    # --- the SAE math -------------------------------------------------------------------------------------
    def decoder(self) -> Tensor:
        """Gives the decoder, [M, d_sae, d_out], rows of unit norm unless the decoder is free."""
        return self.W_dec

    def default_grad_clip(self) -> float:
        """The largest gradient norm of each model per step where --grad_clip leaves it to the architecture (0:
        none)."""
        return 0.0

    def adam_eps(self) -> float:
        """Adam's ε for this stack's parameters (torch's default; an architecture whose loss is another tool's
        on a smaller scale may scale it alike, since ε is the one thing Adam does not scale with the gradients)."""
        return 1e-8

    @property
    def free_decoder(self) -> bool:
        return self.decoder_init_norm > 0

    def decoder_norms(self) -> Tensor:
        """Gives each latent's decoder row norm, [M, d_sae]: the weight of its sparsity penalty (ones, without a
        gradient, while rows are kept at unit norm)."""
        if self.free_decoder:
            return self.W_dec.norm(dim=-1)
        return torch.ones(self.n_models, self.d_local, device=self.W_dec.device, dtype=self.W_dec.dtype)

    def init_rows(
        self,
        tag: str,
        tail: tuple[int, ...],
        draw: Callable[[Tensor, torch.Generator], object],
        span: tuple[int, int, int] | None = None,
    ) -> Tensor:
        """Gives the initial values of a per-latent tensor for the latents held here, [M, d_local, *tail]: each
        model's rows drawn by draw(block, generator) in blocks of INIT_BLOCK latents, every block from a generator
        seeded by (the stack's seed, model, tag, block). So a latent's first value does not depend on how the
        latents are sharded, and a shard draws only the blocks it holds. span: (first, stop, total) latents, for
        a family with several groups of latents (a cross-layer transcoder's layers; default: this stack's)."""
        lo, hi, total = span or (self.latent_start, self.latent_start + self.d_local, self.d_sae)
        out = torch.empty(self.n_models, hi - lo, *tail)
        if _SKIP_INIT.get():
            return out
        for m in range(self.n_models):
            for b in range(lo // INIT_BLOCK, (hi - 1) // INIT_BLOCK + 1):
                start, stop = b * INIT_BLOCK, min((b + 1) * INIT_BLOCK, total)
                key = hashlib.blake2b(f"{self.init_seed}/{m}/{tag}/{b}".encode(), digest_size=8).digest()
                block = torch.empty(stop - start, *tail)
                draw(block, torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1))
                a, z = max(start, lo), min(stop, hi)
                out[m, a - lo : z - lo] = block[a - start : z - start]
        return out

    @torch.no_grad()
    def init_transposed(self) -> None:
        """The init of TopK (Gao et al.) and SAELens: decoder rows uniform on [-1/√d_in, 1/√d_in]^d_in scaled to
        unit norm (or decoder_init_norm), the encoder their transpose (a transcoder's encoder, which reads another
        space than the decoder writes, uniform on [-1/√d_in, 1/√d_in] instead)."""
        a, b = self.d_out**-0.5, self.d_in**-0.5
        self.W_dec.copy_(self.init_rows("W_dec", (self.d_out,), lambda t, g: t.uniform_(-a, a, generator=g)))
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if self.free_decoder:
            self.W_dec.mul_(self.decoder_init_norm)
        if self.transcoder:
            self.W_enc.copy_(self.init_rows("W_enc", (self.d_in,), lambda t, g: t.uniform_(-b, b, generator=g)))
        else:
            self.W_enc.copy_(self.W_dec)

    def encoder(self) -> Tensor:
        """Gives the encoder rows actually used, [M, d_sae, d_in] (tied SAEs override this)."""
        return self.W_enc

    def encoder_bias(self) -> Tensor:
        """Gives the encoder bias actually used, [M, d_sae]."""
        return self.b_enc

    @torch.no_grad()
    def constrain_grads(self) -> None:
        """Removes from W_dec's gradient its component along each (unit) row; call before the optimizer step."""
        g = self.W_dec.grad
        if g is not None and not self.free_decoder:
            radial = torch.einsum("mfd,mfd->mf", g, self.W_dec)
            g.addcmul_(self.W_dec, radial.unsqueeze(-1), value=-1.0)

    @torch.no_grad()
    def clip_grads(self, max_norm: float) -> None:
        """Scales each model's gradients (all its parameters together) down to norm max_norm where above it. Per
        model, so an SAE trains the same whichever others share its stack (or however its latents are sharded)."""
        named = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        if not named:
            return
        sqs = {n: torch.linalg.vector_norm(g.reshape(self.n_models, -1), dim=1).pow(2) for n, g in named}
        if self.shard is None:
            sq = sum(sqs.values())
        else:  # a shard's latents hold part of each model's norm; the replicated parameters count once
            latent = torch.stack([v for n, v in sqs.items() if n in self.latent_tensors]).sum(0)
            sq = self.shard.all_reduce_(latent) + sum(v for n, v in sqs.items() if n not in self.latent_tensors)
        grads = [g for _, g in named]
        factor = (max_norm / sq.sqrt().clamp_min(1e-30)).clamp(max=1.0)
        if factor.device.type == "cpu" and bool((factor == 1.0).all()):
            return  # under the clip: a multiply by one would be a pass over every gradient (~2.5 ms a step here)
        for g in grads:
            g.mul_(factor.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))

    @torch.no_grad()
    def constrain_weights(self) -> None:
        """Puts every decoder row back at unit norm; call after the optimizer step."""
        if not self.free_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def center(self, x: Tensor) -> Tensor:
        """x: [B, d_in] shared by all models, or [M, B, d_in] → [M, B, d_in], minus b_dec if `centers_input`."""
        if x.dim() == 2:
            x = x.unsqueeze(0)
        return x - self.b_dec[:, None, :] if self.centers_input else x.expand(self.n_models, -1, -1)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Gives the encoder pre-activations of the latents held here, [M, B, d_local]."""
        return self.precision.baddbmm(self.encoder_bias()[:, None, :], self.center(x), self.encoder().mT)

    # --- latent sharding: where the shards meet (saes/shard.py); each is the plain value when not sharded --------
    def latent_axis(self, name: str) -> int | None:
        """The axis along which the state tensor `name` holds one entry per latent (what sharding splits and
        gathering puts back together); None for a tensor every shard holds whole."""
        return 1 if name in self.latent_tensors else None

    def shard_of(self, exported: dict[str, Tensor]) -> dict[str, Tensor]:
        """This shard's part of one SAE's exported weights (`export`'s layout), to continue a saved SAE on shards;
        the weights themselves when not sharded."""
        return exported if self.shard is None else self.shard.take(exported)

    def center_bias(self) -> Tensor:
        """b_dec as the encoder subtracts it: its gradient through the encoder is summed over the shards."""
        return self.shard.replicate(self.b_dec) if self.shard is not None else self.b_dec

    def output_bias(self) -> Tensor | None:
        """b_dec as a decoder adds it to its own output: not at all on a shard, whose output is partial (`decoded`
        adds it once, after the sum)."""
        return self.b_dec if self.shard is None else None

    def across_latents(self, t: Tensor) -> Tensor:
        """The sum over shards of a partial sum over latents t (a decoder's output, an L1 or L0 term)."""
        return self.shard.reduce(t) if self.shard is not None else t

    def decoded(self, partial: Tensor) -> Tensor:
        """A decoder's output [M, B, d_out] made with `output_bias()`: on a shard summed over shards, then b_dec."""
        if self.shard is None:
            return partial
        return self.shard.reduce(partial) + self.b_dec[:, None, :]

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Gives the codes (feature activations), [M, B, d_sae], dense (on a shard, its own latents': d_local)."""

    def decode(self, codes: Tensor, x: Tensor | None = None) -> Tensor:
        """codes: [M, B, d_local] → reconstruction [M, B, d_out]; a skip transcoder also needs its input x."""
        precision = self.precision if self.lowers_decoder else FP32
        bias = self.output_bias()
        out = self.decoded(precision.baddbmm(None if bias is None else bias[:, None, :], codes, self.decoder()))
        return out + self.skip_term(x) if self.skip else out

    def skip_term(self, x: Tensor | None) -> Tensor:
        """A skip transcoder's linear path: x [B, d_in] or [M, B, d_in] → x W_skipᵀ, [M, B, d_out]."""
        if x is None:
            raise ValueError("a skip transcoder's output needs its input x")
        x = x.unsqueeze(0).expand(self.n_models, -1, -1) if x.dim() == 2 else x
        return torch.bmm(x, self.W_skip.mT)

    def reconstruct(self, x: Tensor) -> Tensor:
        """x [B, d_in] or [M, B, d_in] → the output [M, B, d_out]: x itself rebuilt, or a transcoder's target."""
        return self.decode(self.encode(x), x)

    def split_batch(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """Gives (input, target) of a batch: a transcoder's [B, d_in + d_out] halves, else the batch twice."""
        if not self.transcoder:
            return batch, batch
        return batch[:, : self.d_in], batch[:, self.d_in :]

    @abstractmethod
    def train_forward(self, x: Tensor, stats: bool = True, target: Tensor | None = None) -> TrainOutput:
        """One training forward on a batch x: [B, d_in] (the fast path; call backward before the next one).
        target [B, d_out]: what the output should be (a transcoder's); None: x itself. A skip transcoder adds
        `skip_term(x)` to its output."""

    @classmethod
    def trains_transcoders(cls) -> bool:
        """Whether the architecture trains as a transcoder: its __init__ takes d_out and skip (passed on to
        SAE.__init__) and its train_forward a target."""
        if "target" not in inspect.signature(cls.train_forward).parameters:
            return False
        for klass in cls.__mro__:  # an __init__ that passes **options on counts as its parent's
            if "__init__" in vars(klass):
                init = inspect.signature(klass.__init__).parameters
                if {"d_out", "skip"} <= init.keys():
                    return True
                if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in init.values()):
                    return False
        return False

    # --- what the architecture owns -------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def knob_values(cls, cfg: SweepConfig) -> list[Any]:
        """Gives the values of this architecture's knob that a sweep config asks for, one SAE each."""

    @classmethod
    def default_options(cls, cfg: SweepConfig) -> dict[str, Any]:
        """Gives the values of stack options the config leaves to the architecture (None there): its own recipe.
        Options missing here keep the class's __init__ default."""
        return {}

    @classmethod
    def check_sweep(cls, cfg: SweepConfig, dict_sizes: list[int]) -> None:
        """Raises ConfigError for a sweep this architecture cannot train (e.g. k above a dictionary size)."""

    @classmethod
    def weights_per_latent(cls, d_in: int, d_out: int, cfg: SweepConfig) -> float:
        """The parameters each latent holds (for the memory estimate): its encoder row, bias and decoder row."""
        return d_in + d_out + 1

    def stack_options(self) -> dict[str, Any]:
        """Gives the options this stack was built with (`options` by name, and a transcoder's d_out and skip),
        to rebuild it or a slice of it."""
        shape = {"d_out": self.d_out, "skip": self.skip} if self.transcoder else {}
        sharded = {"shard": self.shard} if self.shard is not None else {}
        return {**{name: getattr(self, name) for name in self.options}, **shape, **sharded}

    def hparams(self, m: int) -> dict[str, Any]:
        """Gives model m's own hyperparameters ({knob: value}) for names, results and cfg.json."""
        return dict(self._hparams[m])

    def tag(self, m: int) -> str:
        """Gives model m's part of its run name, e.g. "l1_0.1" or "k32"."""
        return f"{self.knob}{self._hparams[m][self.knob]:g}"

    def name(self, m: int) -> str:
        """Gives model m's name in a sweep: its folder under saes/ and its key in results and logs."""
        return f"{self.architecture}_d{self.d_sae}_{self.tag(m)}"

    def saelens_cfg(self, m: int) -> dict[str, Any]:
        """Gives the architecture-specific fields of cfg.json for model m (beyond d_in, d_sae, ...)."""
        return {}

    @classmethod
    def saelens_trainer_fields(cls, value: float, d_sae: int) -> dict[str, Any]:
        """Gives the config fields of SAELens' training SAE (`saelens_trainer`) for the sparsity setting `value` in
        SAELens' own terms (k; an l1 or l0 coefficient on its loss)."""
        return {cls.knob: value}

    @classmethod
    def hparams_from_saelens(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        """Gives {knob: value} of a saved SAE from its cfg.json (our metadata, or SAELens' own fields)."""
        return {cls.knob: (cfg.get("metadata") or {}).get(cls.knob, 0.0)}

    # --- bookkeeping --------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_b_dec(self, target: Tensor) -> None:
        """Starts b_dec at the mean of what the output should be (the data; a transcoder's targets), so the
        encoder sees centred inputs, or the output starts at its mean, from step one."""
        if self.decoder_bias:
            self.b_dec.copy_(target.float().mean(0).expand_as(self.b_dec))

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Makes the SAE, trained on inputs multiplied by `scale`, take and reconstruct the raw inputs: every
        pre-activation, code, bias and threshold divides by `scale`; W_enc and the (unit) decoder rows stay."""
        self.b_enc.div_(scale)
        self.b_dec.div_(scale)

    def folded(self, scale: float) -> SAE:
        """Gives a copy of this stack that takes and reconstructs raw inputs, this one having been trained on inputs
        multiplied by scale (see fold_input_scale)."""
        with uninitialised():  # its state is loaded next
            copy = type(self)(self.d_in, self.d_sae, self._hparams, **self.stack_options())
        copy.load_state_dict(self.state_dict())
        copy.precision = self.precision
        copy.fold_input_scale(scale)
        return copy.to(self.b_dec.device)

    def latent_parameters(self) -> list[nn.Parameter]:
        """The parameters with a row per latent ([M, d_sae, ...]): what re-initialising a latent touches."""
        return [p for name, p in self.named_parameters() if name in ("W_enc", "b_enc", "W_dec")]

    def resample(self, x: Tensor, window: int, generator: torch.Generator) -> Tensor:
        """Re-initialises the latents silent for `window` steps, drawing on inputs x [N, d_in]; gives the mask of
        those latents, [M, d_sae]. Only architectures with can_resample implement it."""
        raise NotImplementedError(f"{self.architecture} does not resample dead latents")

    @torch.no_grad()
    def export(self, m: int) -> dict[str, Tensor]:
        """Gives model m's effective weights in the SAELens layout (W_enc [d_in, d_sae], W_dec [d_sae, d_in])."""
        if self.shard is not None:
            raise ValueError("a sharded stack is exported once put back together (training/distributed.gather_stack)")
        tensors = {
            "W_enc": self.encoder()[m].T.contiguous(),
            "b_enc": self.encoder_bias()[m].clone(),
            "W_dec": self.decoder()[m].contiguous().clone(),
            "b_dec": self.b_dec[m].clone(),
        }
        if self.skip:
            tensors["W_skip"] = self.W_skip[m].clone()  # [d_out, d_in], as SAELens
        return tensors

    def weight_files(self, m: int) -> dict[str, dict[str, Tensor]]:
        """Gives model m's exported weights as the files of its saved folder: SAELens' one file."""
        return {WEIGHTS_FILE: self.export(m)}

    @torch.no_grad()
    def load_exported(self, m: int, tensors: dict[str, Tensor]) -> None:
        """Puts exported weights back into slot m (inverse of `export`, for continuing from saved SAEs)."""
        self.W_enc[m].copy_(tensors["W_enc"].T)
        self.b_enc[m].copy_(tensors["b_enc"])
        self.W_dec[m].copy_(tensors["W_dec"])
        self.b_dec[m].copy_(tensors["b_dec"])
        if self.skip:
            self.W_skip[m].copy_(tensors["W_skip"])

    def saelens_name(self) -> str:
        """Gives cfg.json's `architecture`: SAELens' name for this SAE or transcoder (or ours where it has none)."""
        if not self.transcoder:
            return self.saelens_architecture
        if self.saelens_transcoder is not None:
            return self.saelens_transcoder[self.skip]
        return f"{self.architecture}_{'skip_' if self.skip else ''}transcoder"


class PenaltySAE(SAE):
    """An architecture whose knob weighs a sparsity penalty (relu and gated: l1_alpha; jumprelu: l0_coef): its
    values come from the config's coefficient grid, and the trainer's warm-up scales it through sparsity_scale."""

    tag_prefix: ClassVar[str]  # the run-name prefix of the knob's value, e.g. "l1" in relu_d128_l1_0.1

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        decoder_bias: bool = True,
        decoder_init_norm: float = 0.0,
        d_out: int | None = None,
        skip: bool = False,
        shard: LatentShard | None = None,
    ):
        super().__init__(d_in, d_sae, hparams, decoder_bias, decoder_init_norm, d_out, skip, shard)
        self.register_buffer(self.knob, torch.tensor([float(h[self.knob]) for h in hparams]))

    @classmethod
    def knob_values(cls, cfg: SweepConfig) -> list[float]:
        return cfg.l1_grid()

    def tag(self, m: int) -> str:
        return f"{self.tag_prefix}_{self._hparams[m][self.knob]:.4g}"

    def coefficient(self) -> Tensor:
        """Gives each model's penalty weight at this step, [M]: its knob times the warm-up's fraction."""
        return getattr(self, self.knob) * self.sparsity_scale


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
