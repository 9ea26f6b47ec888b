"""`crosscoder`: one dictionary over several layers of a model (Lindsey et al. 2024, "Sparse crosscoders for
cross-layer features and model diffing"), the acausal form: every latent reads every layer and writes every layer.

Its input is the L hooks' activations side by side, [B, L·d] (run.py's --layers at --layer_loc, joined in layer
order), and it reconstructs all of them: a = ReLU(Σ_l W_enc[l]·x_l + b_enc) — one encoder over the concatenation —
and x̂_l = W_dec[:, l]ᵀ·a + b_dec[l]. Loss: the squared error over every layer (a mean over L·d, as the relu SAE's)
plus l1 · Σ_i a_i · Σ_l ‖W_dec[i, l]‖, the paper's decoder-norm-weighted penalty: each latent pays the L1 norm over
layers of its per-layer decoder norms, so a latent that belongs to one layer is not pushed to write into the others
(an L2 over the whole row, the relu SAE's weight, would let it spread thinly over every layer for free).

So it is the relu SAE — its free-decoder recipe, sparse path and resampling — with that L1 weight and a layer
count; W_dec is [M, d_sae, L·d], layer-major in each row. Saved in the SAELens layout with `architecture`
"crosscoder" and `n_layers` (only `load_sae` reads it: SAELens has no crosscoder).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from sparse_coding.errors import ConfigError
from sparse_coding.saes.relu import ReluSAE
from sparse_coding.saes.shard import LatentShard


class Crosscoder(ReluSAE):
    architecture = "crosscoder"
    saelens_architecture = "crosscoder"
    saelens_transcoder = None
    saelens_trainer = None
    cross_layer = True
    options = ("n_layers", "l1_norm", "decoder_init_norm", "decoder_bias")

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        hparams: list[dict[str, Any]],
        n_layers: int = 1,
        l1_norm: str = "dict_size",
        decoder_init_norm: float = 0.0,
        decoder_bias: bool = True,
        d_out: int | None = None,
        skip: bool = False,
        shard: LatentShard | None = None,
    ):
        if d_out is not None:
            raise ConfigError("a crosscoder reconstructs the layers it reads; it has no transcoder form")
        if n_layers < 1 or d_in % n_layers:
            raise ValueError(f"a crosscoder's input width {d_in} is not {n_layers} layers of one width")
        self.n_layers = n_layers
        super().__init__(d_in, d_sae, hparams, False, l1_norm, decoder_init_norm, decoder_bias, None, False, shard)

    def layer_norms(self) -> Tensor:
        """Each latent's decoder norm in each layer, [M, d_local, L]."""
        M, F_, L = self.n_models, self.d_local, self.n_layers
        return self.W_dec.view(M, F_, L, -1).norm(dim=-1)

    def l1_weights(self) -> Tensor:
        """The L1 weight of each latent: its per-layer decoder norms summed (see the module docstring), with unit
        rows too (it then ranges over [1, √L] and still keeps a latent to the layers it needs)."""
        return self.layer_norms().sum(-1)
