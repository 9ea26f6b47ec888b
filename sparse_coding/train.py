"""Lockstep training of a sweep of SAEs: one stack per dictionary size, every stack fed the same batch,
one fused Adam over all stacked tensors (Adam is elementwise, so stacking changes nothing), checkpoints
that resume exactly after a kill."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm import tqdm

from sparse_coding.io import load_tensors, read_json, save_tensors, write_json
from sparse_coding.saes import SAE, SAES, build_sae


@dataclass
class SweepConfig:
    arch: str = "relu"  # one of sparse_coding.saes.SAES
    # l1 grid (relu): l1_alpha = l1_exp_base ** e for e in l1_exp_low..l1_exp_high (inclusive)
    l1_exp_low: int = -8
    l1_exp_high: int = 8
    l1_exp_base: float = 10**0.25
    # k grid (topk): one SAE per k
    k_values: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    # dictionary sizes: d_sae = round(d_in * dict_ratio_exp_base ** e) for e in low..high (inclusive)
    dict_ratio_exp_low: int = -3
    dict_ratio_exp_high: int = 5
    dict_ratio_exp_base: float = 2.0
    tied: bool = False  # relu: encoder = decoder transpose
    l1_norm: str = "dict_size"  # relu: 'dict_size' divides the L1 term by d_sae (original code), 'none'
    decoder_bias: bool = True  # learn b_dec (subtracted from the input before encoding, as SAELens does)
    auxk_alpha: float = 1 / 32  # topk: weight of the AuxK loss on dead latents
    dead_tokens_threshold: int = 10_000_000  # topk: a latent silent this many tokens counts as dead
    lr: float = 1e-3
    batch_size: int = 1024
    n_steps: int = 3000
    checkpoint_every: int = 500  # steps between checkpoints (0: none)
    log_every: int = 100
    seed: int = 0
    device: str = "auto"

    def hparam_grid(self) -> list[dict[str, Any]]:
        """Gives the per-model knob values every dictionary size is trained with."""
        if self.arch == "topk":
            return [{"k": int(k)} for k in self.k_values]
        return [{"l1_alpha": self.l1_exp_base**e} for e in range(self.l1_exp_low, self.l1_exp_high + 1)]

    def dict_ratios(self) -> list[float]:
        return [self.dict_ratio_exp_base**e for e in range(self.dict_ratio_exp_low, self.dict_ratio_exp_high + 1)]

    def dict_sizes(self, d_in: int) -> list[int]:
        return [round(d_in * r) for r in self.dict_ratios()]

    def sae_options(self) -> dict[str, Any]:
        return {
            "tied": self.tied,
            "l1_norm": self.l1_norm,
            "decoder_bias": self.decoder_bias,
            "auxk_alpha": self.auxk_alpha,
            "dead_tokens_threshold": self.dead_tokens_threshold,
        }


def check_sweep_config(cfg: SweepConfig, d_in: int) -> None:
    """Raises ValueError with a plain message for a sweep that cannot run."""
    if cfg.arch not in SAES:
        raise ValueError(f"unknown architecture {cfg.arch!r}; known: {', '.join(SAES)}")
    if cfg.l1_exp_low > cfg.l1_exp_high or cfg.dict_ratio_exp_low > cfg.dict_ratio_exp_high:
        raise ValueError("each *_exp_low must be at most its *_exp_high")
    if cfg.dict_ratio_exp_base <= 0 or cfg.l1_exp_base <= 0:
        raise ValueError("dict_ratio_exp_base and l1_exp_base must be positive")
    sizes = cfg.dict_sizes(d_in)
    if min(sizes) < 1:
        raise ValueError(f"dictionary ratios give a dictionary of size {min(sizes)}; every size must be ≥ 1")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"dictionary sizes repeat ({sizes}); use a larger dict_ratio_exp_base or fewer ratios")
    if cfg.arch == "topk":
        if not cfg.k_values or any(k <= 0 for k in cfg.k_values):
            raise ValueError("k_values must be positive integers")
        if max(cfg.k_values) > min(sizes):
            raise ValueError(f"k={max(cfg.k_values)} is larger than the smallest dictionary ({min(sizes)})")
    for name in ("lr", "batch_size", "n_steps"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive")
    if cfg.checkpoint_every < 0 or cfg.log_every <= 0:
        raise ValueError("checkpoint_every must be ≥ 0 and log_every positive")


def build_stacks(cfg: SweepConfig, d_in: int, device: torch.device) -> list[SAE]:
    """Gives one stack per dictionary size, smallest first, each holding every grid point's SAE."""
    torch.manual_seed(cfg.seed)
    grid = cfg.hparam_grid()
    return [build_sae(cfg.arch, d_in, size, grid, **cfg.sae_options()).to(device) for size in cfg.dict_sizes(d_in)]


class BatchSource(Protocol):
    """Where training batches come from; its state is checkpointed so a resumed run sees the same data."""

    def next_batch(self, batch_size: int) -> Tensor: ...
    def get_state(self) -> dict[str, Tensor]: ...
    def set_state(self, state: dict[str, Tensor]) -> None: ...


class Trainer:
    """Steps every stack on the same batch; one fused Adam over all parameters."""

    def __init__(
        self,
        stacks: list[SAE],
        lr: float,
        sync: Callable[[list[Tensor]], None] | None = None,
        init_b_dec: bool = True,
    ):
        """sync, when given, averages tensors in place across data-parallel processes (b_dec's data-mean start,
        then every step's gradients). init_b_dec=False keeps b_dec as loaded (continuing saved SAEs)."""
        self.stacks, self.sync, self.init_b_dec = stacks, sync, init_b_dec
        self.params = [p for s in stacks for p in s.parameters()]
        fused = all(p.device.type in ("cpu", "cuda") for p in self.params)
        self.opt = torch.optim.Adam(self.params, lr=lr, fused=fused)
        self.step_count = 0

    def step(self, x: Tensor, stats: bool = False) -> list[dict[str, Tensor]]:
        """One optimizer step on x: [B, d_in]; gives per-stack training stats when asked (else empty dicts)."""
        if self.step_count == 0 and self.init_b_dec:
            for s in self.stacks:
                s.init_b_dec(x)
            if self.sync is not None:
                self.sync([s.b_dec.data for s in self.stacks])
        logs = []
        for s in self.stacks:  # backward per stack frees its activations before the next stack runs
            out = s.train_forward(x, stats=stats)
            out.loss.sum().backward()
            logs.append({"loss": out.loss.detach(), "mse": out.mse, "l0": out.l0} if stats else {})
        if self.sync is not None:
            self.sync([p.grad for p in self.params if p.grad is not None])
        for s in self.stacks:
            s.constrain_grads()
        self.opt.step()
        for s in self.stacks:
            s.constrain_weights()
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1
        return logs

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"stack{i}.{k}": v for i, s in enumerate(self.stacks) for k, v in s.state_dict().items()}
        for i, st in self.opt.state_dict()["state"].items():
            for k, v in st.items():
                tensors[f"opt.{i}.{k}"] = v if isinstance(v, Tensor) else torch.tensor(v)
        return tensors

    def load_state_tensors(self, tensors: dict[str, Tensor], step: int) -> None:
        for i, s in enumerate(self.stacks):
            prefix = f"stack{i}."
            s.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        opt_state = self.opt.state_dict()
        state: dict[int, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        opt_state["state"] = state
        self.opt.load_state_dict(opt_state)
        self.step_count = step


def config_fingerprint(config: dict[str, Any], ignore: tuple[str, ...]) -> str:
    """Hash of the settings that shape the trained weights; a checkpoint only resumes under the same one."""
    kept = {k: v for k, v in sorted(config.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Settings that may change between a run and its resumption without changing what it computes.
RESUMABLE_CHANGES = (
    "n_steps",
    "checkpoint_every",
    "log_every",
    "out",
    "device",
    "preset",
    "config",
    "use_wandb",
)


class CheckpointMismatch(ValueError):
    pass


def train(
    trainer: Trainer,
    source: BatchSource,
    cfg: SweepConfig,
    ckpt_dir: Path | None,
    fingerprint: str,
    on_log: Callable[[int, list[dict[str, Tensor]]], None] | None = None,
    progress: bool = True,
) -> None:
    """Runs trainer to cfg.n_steps, resuming from ckpt_dir when a checkpoint of the same fingerprint is there."""
    found = load_checkpoint(ckpt_dir, fingerprint, trainer.params[0].device) if ckpt_dir is not None else None
    if found is not None:
        step, tensors = found
        trainer.load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("data.")}, step)
        source.set_state({k[5:]: v.cpu() for k, v in tensors.items() if k.startswith("data.")})
    bar = tqdm(total=cfg.n_steps, initial=trainer.step_count, desc="training", disable=not progress, unit="step")
    for step in range(trainer.step_count, cfg.n_steps):
        x = source.next_batch(cfg.batch_size)
        log_now = on_log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.n_steps)
        logs = trainer.step(x, stats=log_now)
        if log_now and on_log is not None:
            on_log(step + 1, logs)
        bar.update(1)
        if ckpt_dir is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(trainer, source, ckpt_dir, fingerprint)
    bar.close()


def save_checkpoint(trainer: Trainer, source: BatchSource, ckpt_dir: Path, fingerprint: str) -> None:
    """One atomic safetensors file holds the whole state and, in its header, the step it belongs to, so a
    kill at any moment leaves either the old checkpoint or the new one, never a mix."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(ckpt_dir / "state.json", {"fingerprint": fingerprint})
    tensors = trainer.state_tensors()
    tensors.update({f"data.{k}": v for k, v in source.get_state().items()})
    save_tensors(ckpt_dir / "state.safetensors", tensors, metadata={"step": str(trainer.step_count)})


def check_resumable(ckpt_dir: Path, fingerprint: str) -> None:
    """Raises CheckpointMismatch if ckpt_dir holds a checkpoint made with other settings; call it before
    writing anything into a run folder, so a refused rerun leaves the folder as it was."""
    state = ckpt_dir / "state.json"
    if state.is_file() and read_json(state)["fingerprint"] != fingerprint:
        raise CheckpointMismatch(
            f"the checkpoint in {ckpt_dir} was made with different settings; rerun with the same settings to "
            "resume it, or use another output folder"
        )


def load_checkpoint(ckpt_dir: Path, fingerprint: str, device: torch.device) -> tuple[int, dict[str, Tensor]] | None:
    """Gives (step, tensors) of the checkpoint in ckpt_dir, None if there is none."""
    if not (ckpt_dir / "state.safetensors").is_file():
        return None
    check_resumable(ckpt_dir, fingerprint)
    with safe_open(str(ckpt_dir / "state.safetensors"), framework="pt") as f:
        step = int(f.metadata()["step"])
    return step, load_tensors(ckpt_dir / "state.safetensors", device=device)
