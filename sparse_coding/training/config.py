"""What every SAE sweep shares, toy or real: the architecture and its knob grid, the dictionary sizes, the
optimiser and the checkpoint cadence."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sparse_coding.config import Config, option
from sparse_coding.errors import ConfigError
from sparse_coding.saes import SAE, sae_class


@dataclass
class SweepConfig(Config):
    arch: str = option("relu", "SAE architecture, one of sparse_coding.saes.SAES (relu, topk, ...)")
    l1_exp_low: int = option(-8, "l1 grid: l1_alpha = l1_exp_base ** e for e from l1_exp_low ...")
    l1_exp_high: int = option(8, "... to l1_exp_high (inclusive); used by l1-penalty architectures such as relu")
    l1_exp_base: float = option(10**0.25, "base of the l1 grid's powers", gt=0)
    k_values: list[int] = option([2, 4, 8, 16], "k grid: one SAE per k, for TopK-style architectures", gt=0)
    dict_ratio_exp_low: int = option(-3, "dictionary sizes: d_sae = round(d_in * dict_ratio_exp_base ** e) ...")
    dict_ratio_exp_high: int = option(5, "... for e from dict_ratio_exp_low to dict_ratio_exp_high (inclusive)")
    dict_ratio_exp_base: float = option(2.0, "base of the dictionary-ratio powers", gt=0)
    tied: bool = option(False, "relu: the encoder is the decoder's transpose")
    l1_norm: str = option(
        "dict_size",
        "relu: 'dict_size' divides the L1 term by d_sae (the original code; one l1 grid suits every size), "
        "'none' uses the plain sum",
        choices=("dict_size", "none"),
    )
    decoder_bias: bool = option(True, "learn b_dec (subtracted from the input before encoding, as SAELens does)")
    auxk_alpha: float = option(1 / 32, "topk: weight of the AuxK loss on dead latents", ge=0)
    dead_tokens_threshold: int = option(10_000_000, "topk: a latent silent this many tokens counts as dead", gt=0)
    lr: float = option(1e-3, "Adam learning rate", gt=0)
    batch_size: int = option(1024, "activations per training step", gt=0)
    n_steps: int = option(3000, "training steps", gt=0)
    checkpoint_every: int = option(500, "steps between checkpoints (0: none)", ge=0)
    log_every: int = option(100, "steps between lines of the training log (train_log.jsonl, wandb)", gt=0)
    seed: int = option(0, "random seed of the SAEs' initialisation and of the data order", ge=0)
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N")

    def check(self) -> None:
        super().check()
        sae_class(self.arch)  # an unknown architecture fails here, listing the known ones
        if self.l1_exp_low > self.l1_exp_high or self.dict_ratio_exp_low > self.dict_ratio_exp_high:
            raise ConfigError("each *_exp_low must be at most its *_exp_high")
        for name, grid in (("l1", self.l1_grid), ("dict_ratio", self.dict_ratios)):
            try:
                values = grid()
            except OverflowError:
                values = [math.inf]
            if not all(0 < v < math.inf for v in values):
                raise ConfigError(f"the {name} grid's powers leave the floating-point range; narrow its exponents")

    @property
    def sae_cls(self) -> type[SAE]:
        return sae_class(self.arch)

    def l1_grid(self) -> list[float]:
        """Gives the l1 coefficients of the sweep (for architectures whose knob is an l1-style penalty)."""
        return [self.l1_exp_base**e for e in range(self.l1_exp_low, self.l1_exp_high + 1)]

    def hparam_grid(self) -> list[dict[str, Any]]:
        """Gives the per-model knob values every dictionary size is trained with."""
        return [{self.sae_cls.knob: v} for v in self.sae_cls.knob_values(self)]

    def dict_ratios(self) -> list[float]:
        return [self.dict_ratio_exp_base**e for e in range(self.dict_ratio_exp_low, self.dict_ratio_exp_high + 1)]

    def dict_sizes(self, d_in: int) -> list[int]:
        return [round(d_in * r) for r in self.dict_ratios()]

    def sae_options(self) -> dict[str, Any]:
        """Gives the stack-wide options the architecture reads from this config (an option the config has no
        field for keeps the architecture's own default)."""
        return {name: getattr(self, name) for name in self.sae_cls.options if hasattr(self, name)}

    def check_sizes(self, d_in: int) -> None:
        """Raises ConfigError when the dictionary sizes for inputs of width d_in cannot be trained."""
        sizes = self.dict_sizes(d_in)
        if min(sizes) < 1:
            raise ConfigError(f"dictionary ratios give a dictionary of size {min(sizes)}; every size must be ≥ 1")
        if len(set(sizes)) != len(sizes):
            raise ConfigError(f"dictionary sizes repeat ({sizes}); use a larger dict_ratio_exp_base or fewer ratios")
        self.sae_cls.check_sweep(self, sizes)


# The sweep part of every entry's `smoke` preset (seconds, for tests): a few small grid points on the CPU.
SMOKE_SWEEP: dict[str, Any] = {
    "l1_exp_low": -4,
    "l1_exp_high": 0,
    "l1_exp_base": 10.0,
    "k_values": [2, 4],
    "dict_ratio_exp_low": 0,
    "device": "cpu",
}
