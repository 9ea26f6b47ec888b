"""Cross-layer transcoders (CLTs; Ameisen et al. 2025, "Circuit tracing", the dictionary behind attribution graphs).

A CLT over layers 0..L-1 (the layers given to run.py's --layers, in order) reads each layer's MLP input and
writes every MLP output from that layer on: layer i's F latents encode its input x_i alone,
a_i = σ(W_enc[i] x_i + b_enc[i]), and the output of layer j is ŷ_j = Σ_{i ≤ j} W_dec[i→j] a_i + b_dec[j]. The loss
is summed over the target layers: Σ_j FVU_j, each layer's squared error over its own target variance (MLP outputs
differ in scale by orders of magnitude across depth; a pooled FVU would train the last layers only).

It is a transcoder like the others to the rest of the code: its batches hold every layer's input then every
layer's output side by side, [B, L·d_in + L·d_out] (one store or stream over several hooks), d_in/d_out/d_sae of the
stack are the totals (L·d_in, L·d_out, L·F; run.py's dictionary ratios give L·F latents, F per layer) and codes are
[M, B, L·F], layer-major. Inside, the weights follow circuit-tracer's layout, which is also how a CLT is saved
(`weight_files`): W_enc [M, L, F, d_in], b_enc [M, L, F], and per source layer i a decoder W_dec_{i}
[M, F, L − i, d_out] (its latents' vectors into layers i..L-1), so the decoder holds L(L+1)/2 blocks, not L².
Each latent's decoder, all its target layers together, is kept at unit norm (the projected-gradient way of
saes/base.py).

Three activations, three registry names:
- `clt` (TopK, the knob k): each layer keeps its k largest pre-activations per token (k·L latents per token in
  all); training takes the TopK family's sparse path (saes/sparse.py) with the L layers as L more rows of the
  model axis: one dense matmul per layer forward, then O(B·k·L²·d) work. AuxK (α = --auxk_alpha) asks each layer's
  dead latents to reconstruct what the whole CLT leaves, through their own decoders.
- `clt_batchtopk`: each layer keeps its k·B largest pre-activations of the batch, and learns a threshold θ per
  layer as BatchTopK does (saes/batchtopk.py); encode (evaluation, export) is JumpReLU with θ.
- `clt_jumprelu` (the knob l0_coef): JumpReLU with a threshold per latent and the straight-through estimators of
  saes/jumprelu.py; loss Σ_j FVU_j + l0_coef · Σ_i L0_i / d_out. Dense, like the JumpReLU SAE's step.

Latent sharding (--parallel latents) splits every layer's F latents over the processes (rank r holds latents
[r·F/N, (r+1)·F/N) of each layer, so every rank encodes every layer and the work stays balanced); selections are
the exact global ones (saes/shard.py), partial outputs are summed.

Saved as circuit-tracer's folder: W_enc_{i}.safetensors (W_enc_{i} [F, d_in], b_enc_{i}, b_dec_{i}, threshold_{i}
for the JumpReLU forms) and W_dec_{i}.safetensors (W_dec_{i} [F, L − i, d_out]), which circuit-tracer's
`load_clt` reads; plus our cfg.json. circuit-tracer's CLTs are ReLU or JumpReLU: `clt_batchtopk` and
`clt_jumprelu` read there exactly as they compute, a TopK `clt` reads as ReLU (per-token top-k has no place in
that format). circuit-tracer counts the layers from the files, so it expects a CLT over all of a model's layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sparse_coding.errors import ConfigError
from sparse_coding.saes.base import SAE, BufferCache, TrainOutput, target_variance
from sparse_coding.saes.batchtopk import THRESHOLD_LR
from sparse_coding.saes.kernels import batch_topk, topk_last_dim
from sparse_coding.saes.precision import FP32
from sparse_coding.saes.shard import LatentShard
from sparse_coding.saes.sparse import SparseEncode, sparse_decode, split_flat

if TYPE_CHECKING:
    from sparse_coding.training.config import SweepConfig


class CrossLayerTranscoder(SAE):
    """The TopK CLT, and what every CLT shares (see the module docstring)."""

    architecture = "clt"
    saelens_architecture = "clt"  # SAELens has no CLT: the folder is circuit-tracer's, with our cfg.json
    knob = "k"
    options = ("n_layers", "auxk_alpha", "dead_tokens_threshold", "decoder_bias")
    cross_layer = True
    layer_transcoder = True
    lowers_decoder = False  # evaluation decodes in fp32, as the TopK SAE's
    selects_bf16 = True  # its top-k kernels read a native bf16 product with the fp32 bias, as the TopK SAE's
    activation_function: ClassVar[str] = "topk"  # cfg.json's name of the nonlinearity

    def default_grad_clip(self) -> float:
        return 0.025 * self.n_layers  # the TopK family's clip on FVU; the loss here sums L of them

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        n_layers: int = 1,
        auxk_alpha: float = 1 / 32,
        dead_tokens_threshold: int = 10_000_000,
        decoder_bias: bool = True,
        decoder_init_norm: float = 0.0,
        d_out: int | None = None,
        skip: bool = False,
        shard: LatentShard | None = None,
    ):
        L = n_layers
        if L < 1 or d_in % L or d_sae % L or (d_out is not None and d_out % L):
            raise ValueError(f"a CLT over {L} layers needs d_in, d_out and d_sae divisible by {L}")
        if d_out is None:
            raise ValueError("a cross-layer transcoder maps MLP inputs to MLP outputs: give d_out")
        if skip or decoder_init_norm:
            raise ValueError("cross-layer transcoders keep unit decoder norms and have no skip connection yet")
        # A shard of the whole dictionary (training's latent_shard) becomes the same share of each layer's latents.
        if shard is not None and L > 1 and shard.d_sae == d_sae:
            shard = LatentShard(shard.rank, shard.world, d_sae // L, shard.group)
        self.n_layers, self.d_layer, self.F = L, d_in // L, d_sae // L
        self.F_local = shard.size if shard is not None else self.F
        super().__init__(d_in, d_sae, hparams, decoder_bias, 0.0, d_out, False, None)
        self.shard, self.d_local = shard, L * self.F_local
        self.e = self.d_out // L  # one layer's output width
        self.auxk_alpha, self.dead_tokens_threshold = auxk_alpha, dead_tokens_threshold
        self.register_buffer("tokens_since_fired", torch.zeros(self.n_models, L, self.F_local, dtype=torch.long))
        self.latent_tensors = (*SAE.latent_tensors, *self.dec_names(), "tokens_since_fired")
        self.init_knob(hparams)
        self.init_weights()
        self._cache = BufferCache()

    def init_knob(self, hparams: list[dict[str, Any]]) -> None:
        ks = [int(h["k"]) for h in hparams]
        if not all(0 < k <= self.F for k in ks):
            raise ValueError(f"every k must be in 1..{self.F} (the latents of one layer), got {ks}")
        self.ks, self.k_max = ks, max(ks)
        self.register_buffer("k", torch.tensor(ks))

    # --- the weights, circuit-tracer's layout ---------------------------------------------------------------
    def dec_names(self) -> list[str]:
        return [f"W_dec_{i}" for i in range(self.n_layers)]

    def make_weights(self) -> None:
        M, L, F_, e = self.n_models, self.n_layers, self.F_local, self.d_out // self.n_layers
        self.W_enc = nn.Parameter(torch.empty(M, L, F_, self.d_layer))
        self.b_enc = nn.Parameter(torch.zeros(M, L, F_))
        for i, name in enumerate(self.dec_names()):
            setattr(self, name, nn.Parameter(torch.empty(M, F_, L - i, e)))

    def decoders(self) -> list[Tensor]:
        """W_dec_{i} for each source layer i, [M, F_local, L − i, d_out]."""
        return [getattr(self, name) for name in self.dec_names()]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Each layer's encoder uniform on ±1/√d_in (a transcoder's init), each latent's decoder uniform on
        ±1/√d_out in every target layer, then the latent's whole decoder scaled to unit norm; drawn in blocks of
        latents per layer (base.init_rows), so the start does not depend on the sharding."""
        lo = self.shard.start if self.shard is not None else 0
        span = (lo, lo + self.F_local, self.F)
        a, b = self.e**-0.5, self.d_layer**-0.5
        for i in range(self.n_layers):
            self.W_enc[:, i] = self.init_rows(
                f"W_enc{i}", (self.d_layer,), lambda t, g: t.uniform_(-b, b, generator=g), span
            )
            n_t = self.n_layers - i
            dec = self.init_rows(f"W_dec{i}", (n_t, self.e), lambda t, g: t.uniform_(-a, a, generator=g), span)
            self.decoders()[i].copy_(dec)
        self.constrain_weights()

    def latent_axis(self, name: str) -> int | None:
        if name not in self.latent_tensors:
            return None
        return 1 if name.startswith("W_dec_") else 2  # [M, F, ...] decoders, [M, L, F, ...] the rest

    @torch.no_grad()
    def constrain_grads(self) -> None:
        """Removes from each decoder's gradient its component along the latent's (unit) decoder, all target layers
        together."""
        for W in self.decoders():
            if W.grad is not None:
                w, g = W.flatten(2), W.grad.flatten(2)
                g.addcmul_(w, torch.einsum("mfd,mfd->mf", g, w).unsqueeze(-1), value=-1.0)

    @torch.no_grad()
    def constrain_weights(self) -> None:
        for W in self.decoders():
            W.div_(W.flatten(2).norm(dim=-1)[..., None, None].clamp_min(1e-12))

    def latent_parameters(self) -> list[nn.Parameter]:
        return [self.W_enc, self.b_enc, *self.decoders()]

    # --- the CLT math ------------------------------------------------------------------------------------------
    def layer_inputs(self, x: Tensor) -> Tensor:
        """x [B, L·d_in] (or [M, B, L·d_in]) → each model's input to each layer's encoder, [M·L, B, d_in]."""
        M, L, d = self.n_models, self.n_layers, self.d_layer
        xs = x.reshape(*x.shape[:-1], L, d).movedim(-2, -3)  # [(M,) L, B, d]
        return xs.expand(M, L, *xs.shape[-2:]).reshape(M * L, xs.shape[-2], d)

    def layer_pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations of every layer's latents held here, [M·L, B, F_local]."""
        W = self.W_enc.reshape(-1, self.F_local, self.d_layer)
        return self.precision.baddbmm(self.b_enc.reshape(-1, self.F_local)[:, None, :], self.layer_inputs(x), W.mT)

    def to_codes(self, per_layer: Tensor) -> Tensor:
        """[M, L, B, F_local] → the stack's codes [M, B, L·F_local], layer-major."""
        return per_layer.movedim(1, 2).flatten(2)

    def activate(self, pre: Tensor, layers: range) -> Tensor:
        """Pre-activations [M, n, B, F_local] of the layers `layers` → their codes (inference: here each layer's
        per-token top k)."""
        M, n, B, F_ = pre.shape
        vals, idx = self.select(pre.reshape(M * n, B, F_))
        return torch.zeros(M * n, B, F_, device=pre.device, dtype=vals.dtype).scatter_add_(-1, idx, vals).view_as(pre)

    def replacement(self) -> Callable[[int, Tensor], Tensor]:
        """A fresh replacement of the MLPs for one forward pass: called for layers 0, 1, ... in order with each
        layer's MLP input [M, N, d_in], it gives that layer's output [M, N, d_out] from the codes of this layer and
        every earlier one (CE loss recovered with all the CLT's layers spliced in at once)."""
        codes: list[Tensor] = []
        b_dec = self.b_dec.view(self.n_models, self.n_layers, self.e)

        def layer(j: int, x: Tensor) -> Tensor:
            if j != len(codes):
                raise ValueError(f"the replacement's layers come in order; got layer {j} after {len(codes)} layers")
            pre = self.precision.baddbmm(self.b_enc[:, j, None, :], x, self.W_enc[:, j].mT)
            codes.append(self.activate(pre[:, None], range(j, j + 1))[:, 0])
            out = b_dec[:, j, None, :]
            for i, W in enumerate(self.decoders()[: j + 1]):
                out = out + self.precision.bmm(codes[i], W[:, :, j - i])
            return out

        return layer

    def encoder(self) -> Tensor:
        return self.W_enc.flatten(1, 2)  # [M, L·F, d_in]: each latent's encoder, in its own layer's input space

    def encoder_bias(self) -> Tensor:
        return self.b_enc.flatten(1)

    def decoder(self) -> Tensor:
        """Every latent's decoder over all target layers, zeros before its own, [M, L·F, L·d_out] (dense: for
        analysis, MMCS and pages; training never forms it)."""
        M, L, F_, e = self.n_models, self.n_layers, self.F_local, self.e
        out = self.W_enc.new_zeros(M, L, F_, L, e)
        for i, W in enumerate(self.decoders()):
            out[:, i, :, i:] = W
        return out.view(M, L * F_, L * e)

    def encode(self, x: Tensor) -> Tensor:
        pre = self.layer_pre_acts(x)
        per_layer = pre.view(self.n_models, self.n_layers, *pre.shape[1:])
        return self.to_codes(self.activate(per_layer, range(self.n_layers)))

    def select(self, pre: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Each layer's per-token top k, as TopKSAE.select with the layers as more rows of the model axis
        (pre: [M·n, B, F_local], model-major)."""
        vals, idx = topk_last_dim(pre, min(self.k_max, self.F_local), bias)
        if self.shard is not None:
            vals, idx = self.shard.topk_rows(vals, idx, self.k_max)
        vals = vals.relu()
        if any(k != self.k_max for k in self.ks):
            k_rows = self.k.repeat_interleave(pre.shape[0] // self.n_models)  # [M·n]
            vals = vals * (torch.arange(self.k_max, device=pre.device) < k_rows[:, None, None])
        return vals, idx

    def decode(self, codes: Tensor, x: Tensor | None = None) -> Tensor:
        M, B, L, F_ = self.n_models, codes.shape[1], self.n_layers, self.F_local
        per_layer = codes.reshape(M, B, L, F_)
        precision = self.precision if self.lowers_decoder else FP32
        outs = [
            precision.bmm(per_layer[:, :, i], W.reshape(M, F_, -1)).view(M, B, L - i, self.e)
            for i, W in enumerate(self.decoders())
        ]
        return self.decoded_layers(outs)

    def decoded_layers(self, outs: list[Tensor]) -> Tensor:
        """Per source layer i its latents' output into layers i..L-1, [M, B, L − i, d_out] → the CLT's output
        [M, B, L·d_out]: summed per target layer, over the shards, plus b_dec."""
        M, B, L = self.n_models, outs[0].shape[1], self.n_layers
        per_target = []
        for j in range(L):
            parts = [outs[i][:, :, j - i] for i in range(j + 1)]
            per_target.append(sum(parts[1:], parts[0]))
        partial = torch.stack(per_target, dim=2).view(M, B, L * self.e)
        return self.decoded(partial) if self.shard is not None else partial + self.b_dec[:, None, :]

    def decode_entries(self, vals: Tensor, idx: Tensor, n_tokens: int) -> Tensor:
        """Selected entries, per row [M·L, B, K] (or flat [M·L, N] with n_tokens rows) → the output, [M, B, L·d_out],
        through the sparse decoder of each source layer (embedding bags over its [F·(L − i), d_out] table)."""
        M, L, e = self.n_models, self.n_layers, self.e
        vals, idx = vals.view(M, L, *vals.shape[1:]), idx.view(M, L, *idx.shape[1:])
        outs = []
        for i, W in enumerate(self.decoders()):
            n_t = L - i
            table = W.reshape(M, -1, e)  # row f·(L − i) + t: latent f's vector into layer i + t
            t = torch.arange(n_t, device=idx.device)
            if idx.dim() == 4:  # per row: the token's entries once per target layer, a bag per (token, target)
                B, K = idx.shape[2:]
                lat = (idx[:, i, :, None, :] * n_t + t[:, None]).reshape(M, B * n_t, K)
                v = vals[:, i, :, None, :].expand(M, B, n_t, K).reshape(M, B * n_t, K)
                outs.append(sparse_decode(v, lat, table, precision=self.precision).view(M, B, n_t, e))
            else:  # flat, in index order: bags (target, token), so each target's entries keep that order
                rows, f = split_flat(idx[:, i], self.F_local)
                N = rows.shape[-1]
                lat = (f[:, None, :] * n_t + t[:, None]).reshape(M, n_t * N)
                bags = (t[:, None] * n_tokens + rows[:, None, :]).reshape(M, n_t * N)
                v = vals[:, i, None, :].expand(M, n_t, N).reshape(M, n_t * N)
                out = sparse_decode(v, lat, table, bags, n_t * n_tokens, self.precision)
                outs.append(out.view(M, n_t, n_tokens, e).transpose(1, 2))
        return self.decoded_layers(outs)

    def layer_fvu(self, err: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """err [M, B, L·d_out] against target [B, L·d_out] → (Σ_j FVU_j [M], squared error [M, L], target
        variance [L])."""
        M, B, L = self.n_models, target.shape[0], self.n_layers
        variance = target_variance(target, L)
        sq = err.pow(2).view(M, B, L, self.e).sum(dim=(1, 3))
        return (sq / variance).sum(-1), sq, variance

    def train_forward(self, x: Tensor, stats: bool = True, target: Tensor | None = None) -> TrainOutput:
        assert target is not None, "a CLT trains on MLP outputs (its batches' second half)"
        M, L, B = self.n_models, self.n_layers, x.shape[0]
        dead = (self.tokens_since_fired >= self.dead_tokens_threshold).view(M * L, self.F_local)
        n_dead = dead.sum(-1)
        if self.shard is not None:
            n_dead = self.shard.all_reduce_(n_dead.clone())
        k_aux = min(self.e // 2, int(n_dead.max()))
        W = self.W_enc.view(M * L, self.F_local, self.d_layer)
        vals, idx, aux_vals, aux_idx = SparseEncode.apply(
            self.layer_inputs(x), W, self.b_enc.view(M * L, -1), self.b_dec, self, dead if k_aux > 0 else None, k_aux
        )
        err = self.decode_entries(vals, idx, B) - target
        loss, sq, variance = self.layer_fvu(err, target)
        parts: dict[str, Tensor] = {}
        if k_aux > 0:
            aux = self.decode_entries(aux_vals, aux_idx, B) - self.b_dec[:, None, :]  # the dead latents' part alone
            auxk = self.layer_fvu(aux + err.detach(), target)[0]
            scale = (n_dead.view(M, L).float().sum(-1) / (L * (self.e // 2))).clamp(max=1.0)
            loss = loss + self.auxk_alpha * scale * auxk
            parts["auxk"] = auxk.detach()
        self.record_firing(vals.detach(), idx, B)
        if not stats:
            return TrainOutput(loss)
        l0 = self.across_latents((vals > 0).reshape(M, -1).sum(-1).float()) / B
        return TrainOutput(
            loss,
            {
                **parts,
                "mse": sq.detach().sum(-1) / (B * self.d_out),
                "fvu": sq.detach().sum(-1) / variance.sum(),
                "l0": l0,
                "dead": n_dead.view(M, L).sum(-1).float(),
            },
        )

    def latents_of(self, idx: Tensor) -> Tensor:
        """The latent (within its layer) of each selected entry: the index itself per row, r·F + f flat."""
        return idx if idx.dim() == 3 else idx % self.F_local

    @torch.no_grad()
    def record_firing(self, vals: Tensor, idx: Tensor, n_tokens: int) -> None:
        """Restarts the silence count of every latent some token's code used."""
        ML = vals.shape[0]
        fires = torch.zeros(ML, self.F_local, device=vals.device, dtype=torch.float32)
        lat = self.latents_of(idx).reshape(ML, -1)
        fired = fires.scatter_add_(-1, lat, (vals > 0).reshape(ML, -1).float()) > 0
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired.view_as(self.tokens_since_fired), 0)

    # --- what the architecture owns ------------------------------------------------------------------------
    @classmethod
    def knob_values(cls, cfg: SweepConfig) -> list[Any]:
        return [int(k) for k in cfg.k_values]

    @classmethod
    def check_sweep(cls, cfg: SweepConfig, dict_sizes: list[int]) -> None:
        L = getattr(cfg, "n_layers", 0)
        if L < 1:
            raise ConfigError(
                f"--arch {cls.architecture} trains over several layers: give them with --layers (the toy: --n_layers)"
            )
        if any(size % L for size in dict_sizes):
            raise ConfigError(f"a CLT over {L} layers needs dictionary sizes divisible by {L}, got {dict_sizes}")
        if cls.knob == "k" and max(cfg.k_values) > min(dict_sizes) // L:
            raise ConfigError(f"k={max(cfg.k_values)} is larger than one layer's latents ({min(dict_sizes) // L})")

    @classmethod
    def weights_per_latent(cls, d_in: int, d_out: int, cfg: SweepConfig) -> float:
        L = max(getattr(cfg, "n_layers", 1), 1)  # one layer's encoder; decoders into (L + 1) / 2 layers on average
        return (d_in + d_out * (L + 1) / 2) / L + 1

    def tag(self, m: int) -> str:
        return f"k{self.ks[m]}"

    def saelens_name(self) -> str:
        return self.architecture

    def saelens_cfg(self, m: int) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "d_transcoder": self.F,
            "d_model": self.d_layer,
            "d_model_out": self.e,
            "activation_function": self.activation_function,
            **self.hparams(m),
        }

    @classmethod
    def hparams_from_saelens(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {cls.knob: cfg[cls.knob]}

    # --- circuit-tracer's files --------------------------------------------------------------------------------
    def thresholds(self, m: int) -> Tensor | None:
        """Model m's JumpReLU thresholds as circuit-tracer stores them, [L, F]; None for a plain ReLU read."""
        return None

    @torch.no_grad()
    def export(self, m: int) -> dict[str, Tensor]:
        if self.shard is not None:
            raise ValueError("a sharded stack is exported once put back together (training/distributed.gather_stack)")
        b_dec, theta = self.b_dec[m].view(self.n_layers, self.e), self.thresholds(m)
        out: dict[str, Tensor] = {}
        for i, W in enumerate(self.decoders()):
            out |= {f"W_enc_{i}": self.W_enc[m, i].clone(), f"b_enc_{i}": self.b_enc[m, i].clone()}
            out |= {f"b_dec_{i}": b_dec[i].clone(), f"W_dec_{i}": W[m].clone()}
            if theta is not None:
                out[f"threshold_{i}"] = theta[i].clone()
        return out

    def weight_files(self, m: int) -> dict[str, dict[str, Tensor]]:
        tensors = self.export(m)
        files: dict[str, dict[str, Tensor]] = {}
        for name, t in tensors.items():
            kind, i = ("W_dec", name.split("_")[-1]) if name.startswith("W_dec_") else ("W_enc", name.split("_")[-1])
            files.setdefault(f"{kind}_{i}.safetensors", {})[name] = t
        return files

    @torch.no_grad()
    def load_exported(self, m: int, tensors: dict[str, Tensor]) -> None:
        b_dec = self.b_dec[m].view(self.n_layers, self.e)
        for i, W in enumerate(self.decoders()):
            self.W_enc[m, i].copy_(tensors[f"W_enc_{i}"])
            self.b_enc[m, i].copy_(tensors[f"b_enc_{i}"])
            b_dec[i].copy_(tensors[f"b_dec_{i}"])
            W[m].copy_(tensors[f"W_dec_{i}"])
        self.load_thresholds(m, tensors)

    def load_thresholds(self, m: int, tensors: dict[str, Tensor]) -> None:
        """Reads model m's thresholds back from the exported tensors (the JumpReLU forms)."""

    def shard_of(self, exported: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.shard is None:
            return exported
        lo, hi = self.shard.start, self.shard.stop
        return {k: t if k.startswith("b_dec_") else t[lo:hi] for k, t in exported.items()}


class BatchTopKCLT(CrossLayerTranscoder):
    """`clt_batchtopk`: each layer keeps its k·B largest pre-activations of the batch; a threshold per layer."""

    architecture = "clt_batchtopk"
    saelens_architecture = "clt_batchtopk"
    activation_function = "jump_relu"

    def __init__(self, d_in: int, d_sae: int, hparams: list[dict[str, Any]], **options: Any):
        super().__init__(d_in, d_sae, hparams, **options)
        self.register_buffer("threshold", torch.full((self.n_models, self.n_layers), -1.0, dtype=torch.float64))

    def select(self, pre: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, counts = pre.shape[1], [k * pre.shape[1] for k in self.ks for _ in range(self.n_layers)]
        vals, idx = batch_topk(pre, [min(c, B * self.F_local) for c in counts], bias)
        if self.shard is not None:
            vals, idx = self.shard.batch_topk(vals, idx, counts, B)
        return vals.relu(), idx

    def activate(self, pre: Tensor, layers: range) -> Tensor:
        theta = self.threshold[:, layers.start : layers.stop].to(pre.dtype)[:, :, None, None]
        return pre.relu() * (pre > theta)

    @torch.no_grad()
    def record_firing(self, vals: Tensor, idx: Tensor, n_tokens: int) -> None:
        """Also moves each layer's θ towards its smallest kept positive value (BatchTopKSAE's rule)."""
        super().record_firing(vals, idx, n_tokens)
        smallest = vals.masked_fill(vals <= 0, float("inf")).amin(-1).double().view_as(self.threshold)
        if self.shard is not None:
            self.shard.all_reduce_(smallest, op=dist.ReduceOp.MIN)
        moved = (1 - THRESHOLD_LR) * self.threshold + THRESHOLD_LR * smallest
        moved = torch.where(self.threshold < 0, smallest, moved)
        self.threshold.copy_(torch.where(torch.isfinite(smallest), moved, self.threshold))

    def thresholds(self, m: int) -> Tensor:
        theta = self.threshold[m].clamp(min=0.0).to(self.W_enc.dtype)  # unset (−1): ReLU
        return theta[:, None].expand(self.n_layers, self.F).contiguous()

    def load_thresholds(self, m: int, tensors: dict[str, Tensor]) -> None:
        for i in range(self.n_layers):
            self.threshold[m, i] = tensors[f"threshold_{i}"].double().mean()

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.threshold.div_(scale)


class JumpReLUCLT(CrossLayerTranscoder):
    """`clt_jumprelu`: JumpReLU with a learned threshold per latent and an L0 penalty (the knob l0_coef)."""

    architecture = "clt_jumprelu"
    saelens_architecture = "clt_jumprelu"
    activation_function = "jump_relu"
    knob = "l0_coef"
    options = (
        "n_layers",
        "jumprelu_bandwidth",
        "jumprelu_init_threshold",
        "dead_tokens_threshold",
        "decoder_bias",
    )
    lowers_decoder = True

    def default_grad_clip(self) -> float:
        return 0.0

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        n_layers: int = 1,
        jumprelu_bandwidth: float = 0.05,
        jumprelu_init_threshold: float = 0.01,
        dead_tokens_threshold: int = 10_000_000,
        decoder_bias: bool = True,
        decoder_init_norm: float = 0.0,
        d_out: int | None = None,
        skip: bool = False,
        shard: LatentShard | None = None,
    ):
        super().__init__(
            d_in, d_sae, hparams, n_layers, 0.0, dead_tokens_threshold, decoder_bias, decoder_init_norm, d_out, skip,
            shard,
        )  # fmt: skip
        self.jumprelu_bandwidth, self.jumprelu_init_threshold = jumprelu_bandwidth, jumprelu_init_threshold
        self.threshold = nn.Parameter(
            torch.full((self.n_models, n_layers, self.F_local), float(jumprelu_init_threshold))
        )
        self.latent_tensors = (*self.latent_tensors, "threshold")

    def init_knob(self, hparams: list[dict[str, Any]]) -> None:
        self.register_buffer("l0_coef", torch.tensor([float(h["l0_coef"]) for h in hparams]))

    @classmethod
    def knob_values(cls, cfg: SweepConfig) -> list[Any]:
        return cfg.l1_grid()

    def tag(self, m: int) -> str:
        return f"l0_{self._hparams[m]['l0_coef']:.4g}"

    def activate(self, pre: Tensor, layers: range) -> Tensor:
        return pre.relu() * (pre > self.threshold[:, layers.start : layers.stop, None, :])

    def train_forward(self, x: Tensor, stats: bool = True, target: Tensor | None = None) -> TrainOutput:
        assert target is not None, "a CLT trains on MLP outputs (its batches' second half)"
        M, L, B = self.n_models, self.n_layers, x.shape[0]
        pre = self.layer_pre_acts(x)  # [M·L, B, F], differentiable (the emulated precision where not fp32)
        codes, active = _JumpGate.apply(pre, self.threshold.view(M * L, 1, self.F_local), self.jumprelu_bandwidth)
        per_layer = codes.view(M, L, B, self.F_local)
        outs = [
            self.precision.bmm(per_layer[:, i], W.reshape(M, self.F_local, -1)).view(M, B, L - i, self.e)
            for i, W in enumerate(self.decoders())
        ]
        err = self.decoded_layers(outs) - target
        fvu, sq, variance = self.layer_fvu(err, target)
        l0 = self.across_latents(active.view(M, -1).sum(-1)) / B  # Σ over layers of each layer's L0
        loss = fvu + self.l0_coef * self.sparsity_scale * l0 / self.e
        with torch.no_grad():
            fires = (active.detach() > 0).sum(1).view_as(self.tokens_since_fired)  # [M, L, F]
            self.tokens_since_fired.add_(B).masked_fill_(fires > 0, 0)
        if not stats:
            return TrainOutput(loss)
        dead = (self.tokens_since_fired >= self.dead_tokens_threshold).view(M, -1).sum(-1).float()
        return TrainOutput(
            loss,
            {
                "mse": sq.detach().sum(-1) / (B * self.d_out),
                "fvu": sq.detach().sum(-1) / variance.sum(),
                "l0": l0.detach(),
                "dead": self.across_latents(dead),
            },
        )

    @torch.no_grad()
    def constrain_weights(self) -> None:
        super().constrain_weights()
        if hasattr(self, "threshold"):  # (the first call, from init_weights, comes before θ exists)
            self.threshold.clamp_(min=0.0)

    def thresholds(self, m: int) -> Tensor:
        return self.threshold[m].clone()

    def load_thresholds(self, m: int, tensors: dict[str, Tensor]) -> None:
        for i in range(self.n_layers):
            self.threshold[m, i].copy_(tensors[f"threshold_{i}"])

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.threshold.div_(scale)


class _JumpGate(torch.autograd.Function):
    """codes = pre·H(pre − θ) and H(pre − θ) itself (for the L0 term), with JumpReLU's straight-through estimators
    of a rectangle kernel of width ε for θ (saes/jumprelu.py): pre gets H(pre − θ), θ gets −(θ/ε)·K from the codes
    and −(1/ε)·K from the step, K = 1 where |pre − θ| < ε/2."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        active = (pre > theta).to(pre.dtype)
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * active, active

    @staticmethod
    def backward(ctx, g_codes: Tensor, g_active: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        window = ((pre - theta).abs() < eps / 2).to(pre.dtype)
        g_pre = g_codes * (pre > theta)
        g_theta = (-(theta / eps) * g_codes * window - g_active * window / eps).sum(1, keepdim=True)
        return g_pre, g_theta, None
