"""What every SAE sweep shares, toy or real: the architecture and its knob grid, the dictionary sizes, the
optimiser and the checkpoint cadence."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from sparse_coding.config import Config, option
from sparse_coding.errors import ConfigError
from sparse_coding.saes import SAE, SAES, sae_class, single_hook_archs
from sparse_coding.saes.precision import TRAIN_DTYPES

LR_DECAYS = ("linear", "cosine")
PARALLEL_MODES = ("models", "data", "latents")


def torchrun_world() -> int | None:
    """The number of processes torchrun started (None outside torchrun), read from the environment it sets."""
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world is not None else None


@dataclass
class SweepConfig(Config):
    arch: str = option(
        "relu", "SAE architecture, one of sparse_coding.saes.SAES (relu, topk, batchtopk, jumprelu, gated, matryoshka)"
    )
    l1_exp_low: int = option(-8, "sparsity-coefficient grid: l1_alpha (or l0_coef) = l1_exp_base ** e for e from ...")
    l1_exp_high: int = option(
        8, "... l1_exp_low to l1_exp_high (inclusive); for relu, gated (l1_alpha), jumprelu (l0_coef)"
    )
    l1_exp_base: float = option(10**0.25, "base of the l1 grid's powers", gt=0)
    k_values: list[int] = option([2, 4, 8, 16], "k grid: one SAE per k, for topk, batchtopk and matryoshka", gt=0)
    dict_ratio_exp_low: int = option(-3, "dictionary sizes: d_sae = round(d_in * dict_ratio_exp_base ** e) ...")
    dict_ratio_exp_high: int = option(5, "... for e from dict_ratio_exp_low to dict_ratio_exp_high (inclusive)")
    dict_ratio_exp_base: float = option(2.0, "base of the dictionary-ratio powers", gt=0)
    tied: bool = option(False, "relu: the encoder is the decoder's transpose")
    l1_norm: str = option(
        "dict_size",
        "relu, gated: 'dict_size' divides the L1 term by d_sae (the original code; one l1 grid suits every size), "
        "'none' uses the plain sum",
        choices=("dict_size", "none"),
    )
    decoder_bias: bool = option(True, "learn b_dec (subtracted from the input before encoding, as SAELens does)")
    decoder_init_norm: float | None = option(
        None,
        "0: decoder rows kept at unit norm; > 0: rows start at this norm and train freely, each latent's sparsity "
        "penalty (relu, gated, jumprelu) or code (TopK family) weighted by its row's norm; 0.1 is SAELens' default "
        "(relu then takes SAELens' whole recipe: its init, gradient clip and Adam ε on our loss's scale); default: "
        "the architecture's (relu 0.1 unless tied, the others 0)",
        ge=0,
    )
    auxk_alpha: float = option(1 / 32, "topk, batchtopk, matryoshka: weight of the AuxK loss on dead latents", ge=0)
    dead_tokens_threshold: int = option(
        10_000_000, "topk family, jumprelu: a latent silent this many tokens counts as dead", gt=0
    )
    matryoshka_widths: list[int] | None = option(
        None, "matryoshka: nested prefix sizes (a width ≥ d_sae is skipped; default d_sae/16, /8, /4, /2)", gt=0
    )
    jumprelu_bandwidth: float = option(0.05, "jumprelu: width ε of the threshold's straight-through kernel", gt=0)
    jumprelu_init_threshold: float = option(0.01, "jumprelu: every latent's threshold at the start", ge=0)
    jumprelu_pre_act_coef: float = option(0.0, "jumprelu: weight of the pre-act loss on dead latents (0: off)", ge=0)
    lr: float = option(1e-3, "Adam learning rate", gt=0)
    grad_clip: float | None = option(
        None,
        "largest gradient norm of each SAE per step (0: none; default: 0.025 for the TopK family, whose loss is FVU; "
        "1/d_in for relu with a free decoder, SAELens' bound on our loss's scale; none for the others)",
        ge=0,
    )
    lr_warmup_steps: int = option(0, "steps over which the learning rate rises linearly to lr", ge=0)
    lr_decay_steps: int = option(0, "the last steps, over which the learning rate falls to lr_end (0: none)", ge=0)
    lr_decay: str = option("linear", "shape of the learning rate's fall", choices=LR_DECAYS)
    lr_end: float = option(0.0, "learning rate at the last step, with lr_decay_steps", ge=0)
    sparsity_warmup_steps: int = option(
        0, "steps over which the sparsity coefficient (l1_alpha, l0_coef) rises linearly from 0", ge=0
    )
    normalize_activations: bool = option(
        False,
        "scale inputs to mean norm √d_in (estimated from norm_batches batches drawn before training); the saved "
        "SAEs take and reconstruct the raw activations",
    )
    norm_batches: int = option(10, "batches the normalisation's scale is estimated from (not trained on)", gt=0)
    resample_every: int | None = option(
        None,
        "relu: resample dead latents every this many steps (0: never; default: the architecture's, relu every 50, "
        "where every architecture of the sweep resamples)",
        ge=0,
    )
    resample_window: int = option(0, "relu: a latent silent this many steps is dead (0: resample_every)", ge=0)
    resample_batches: int = option(8, "relu: batches of inputs scored to choose the resampled directions", gt=0)
    batch_size: int = option(1024, "activations per training step", gt=0)
    n_steps: int = option(3000, "training steps", gt=0)
    checkpoint_every: int = option(500, "steps between checkpoints (0: none)", ge=0)
    log_every: int = option(100, "steps between lines of the training log (train_log.jsonl, wandb)", gt=0)
    train_dtype: str = option(
        "fp32",
        "precision of the big matmuls (encoder, decoder and their gradients): bf16/fp16 operands with fp32 results; "
        "weights, Adam, the loss and metrics stay fp32. Native on CUDA; emulated (rounded operands, fp32 speed) on "
        "CPUs without bf16/fp16 matmul units",
        choices=tuple(TRAIN_DTYPES),
    )
    seed: int = option(0, "random seed of the SAEs' initialisation and of the data order", ge=0)
    device: str = option("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    parallel: str = option(
        "models",
        "under torchrun: 'models' splits the sweep's SAEs over the processes, 'data' splits every batch, 'latents' "
        "splits every SAE's latents (weights, gradients and Adam state: SAEs bigger than one process)",
        choices=PARALLEL_MODES,
    )

    def check(self) -> None:
        super().check()
        self.sae_classes()  # an unknown architecture fails here, listing the known ones
        if self.l1_exp_low > self.l1_exp_high or self.dict_ratio_exp_low > self.dict_ratio_exp_high:
            raise ConfigError("each *_exp_low must be at most its *_exp_high")
        for name, grid in (("l1", self.l1_grid), ("dict_ratio", self.dict_ratios)):
            try:
                values = grid()
            except OverflowError:
                values = [math.inf]
            if not all(0 < v < math.inf for v in values):
                raise ConfigError(f"the {name} grid's powers leave the floating-point range; narrow its exponents")
        if self.lr_warmup_steps + self.lr_decay_steps > self.n_steps:
            raise ConfigError("lr_warmup_steps + lr_decay_steps must not exceed n_steps")
        if self.resample_every and not all(cls.can_resample for cls in self.sae_classes()):
            able = ", ".join(a for a, cls in SAES.items() if cls.can_resample)
            raise ConfigError(f"--resample_every: only these architectures resample dead latents: {able}")
        if self.parallel == "latents" and torchrun_world() is None:
            raise ConfigError(
                "--parallel latents splits one SAE over several processes: start it with torchrun, e.g. "
                "torchrun --standalone --nproc_per_node 2 <script> ... --parallel latents"
            )

    def resample_steps(self) -> int:
        """Steps between resamplings of dead latents: --resample_every, else the architectures' own default when
        every one of the sweep resamples (0: never)."""
        if self.resample_every is not None:
            return self.resample_every
        classes = self.sae_classes()
        return min(cls.default_resample_every for cls in classes) if all(c.can_resample for c in classes) else 0

    def arch_names(self) -> list[str]:
        """Gives the architectures of the sweep: `arch` is one name, several joined by commas, or 'all'."""
        names = single_hook_archs() if self.arch == "all" else [a.strip() for a in self.arch.split(",")]
        return list(dict.fromkeys(names))

    def sae_classes(self) -> list[type[SAE]]:
        return [sae_class(a) for a in self.arch_names()]

    @property
    def sae_cls(self) -> type[SAE]:
        """The architecture of a one-architecture sweep."""
        classes = self.sae_classes()
        if len(classes) != 1:
            raise ConfigError(f"this entry trains one architecture at a time, got --arch {self.arch}")
        return classes[0]

    def l1_grid(self) -> list[float]:
        """Gives the sparsity coefficients of the sweep (for architectures whose knob is a penalty's weight)."""
        return [self.l1_exp_base**e for e in range(self.l1_exp_low, self.l1_exp_high + 1)]

    def hparam_grid(self, cls: type[SAE] | None = None) -> list[dict[str, Any]]:
        """Gives the per-model knob values every dictionary size of architecture cls is trained with."""
        cls = cls or self.sae_cls
        return [{cls.knob: v} for v in cls.knob_values(self)]

    def dict_ratios(self) -> list[float]:
        return [self.dict_ratio_exp_base**e for e in range(self.dict_ratio_exp_low, self.dict_ratio_exp_high + 1)]

    def dict_sizes(self, d_in: int) -> list[int]:
        return [round(d_in * r) for r in self.dict_ratios()]

    def sae_options(self, cls: type[SAE] | None = None) -> dict[str, Any]:
        """Gives the stack-wide options architecture cls reads from this config (an option the config has no
        field for keeps the architecture's own default)."""
        cls = cls or self.sae_cls
        chosen = {name: getattr(self, name) for name in cls.options if hasattr(self, name)}
        defaults = cls.default_options(self)  # for options the config leaves to the architecture (None)
        return {
            name: defaults.get(name) if v is None else v
            for name, v in chosen.items()
            if v is not None or name in defaults
        }

    def check_sizes(self, d_in: int) -> None:
        """Raises ConfigError when the dictionary sizes for inputs of width d_in cannot be trained."""
        sizes = self.dict_sizes(d_in)
        if min(sizes) < 1:
            raise ConfigError(f"dictionary ratios give a dictionary of size {min(sizes)}; every size must be ≥ 1")
        if len(set(sizes)) != len(sizes):
            raise ConfigError(f"dictionary sizes repeat ({sizes}); use a larger dict_ratio_exp_base or fewer ratios")
        world = torchrun_world() or 1
        if self.parallel == "latents" and any(size % world for size in sizes):
            uneven = [size for size in sizes if size % world]
            raise ConfigError(
                f"--parallel latents over {world} processes needs dictionary sizes divisible by {world}; "
                f"{', '.join(map(str, uneven))} are not (change the dictionary ratios or the process count)"
            )
        for cls in self.sae_classes():
            cls.check_sweep(self, sizes)


# The sweep part of every entry's `smoke` preset (seconds, for tests): a few small grid points on the CPU.
SMOKE_SWEEP: dict[str, Any] = {
    "l1_exp_low": -4,
    "l1_exp_high": 0,
    "l1_exp_base": 10.0,
    "k_values": [2, 4],
    "dict_ratio_exp_low": 0,
    "device": "cpu",
}
