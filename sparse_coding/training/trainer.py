"""Lockstep training of a sweep of SAEs: one stack per dictionary size, every stack fed the same batch,
one fused Adam over all stacked tensors (Adam is elementwise, so stacking changes nothing), checkpoints
that resume exactly after a kill."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from sparse_coding.errors import ConfigError
from sparse_coding.files import load_optimizer_tensors, optimizer_tensors
from sparse_coding.saes import SAE
from sparse_coding.training.checkpoint import load_checkpoint, save_checkpoint
from sparse_coding.training.config import SweepConfig

# Per stack, per model [M]: the loss and its parts (mse, l0, l1 or fvu/auxk, ...), as the SAE gives them.
StepLog = list[dict[str, Tensor]]


def build_stacks(
    cfg: SweepConfig, d_in: int, device: torch.device, d_out: int | None = None, skip: bool = False
) -> list[SAE]:
    """Gives one stack per dictionary size, smallest first, each holding every grid point's SAE (transcoders
    to width d_out, with a skip connection if asked, when d_out is given)."""
    torch.manual_seed(cfg.seed)
    grid, options = cfg.hparam_grid(), cfg.sae_options()
    if d_out is not None:
        if not cfg.sae_cls.trains_transcoders():
            raise ConfigError(f"architecture {cfg.arch!r} does not train as a transcoder yet")
        options = {**options, "d_out": d_out, "skip": skip}
    return [cfg.sae_cls(d_in, size, grid, **options).to(device) for size in cfg.dict_sizes(d_in)]


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

    def step(self, batch: Tensor, stats: bool = False) -> StepLog:
        """One optimizer step on a batch [B, d_in] (transcoders: [B, d_in + d_out], input and target); gives
        per-stack training stats when asked (else empty dicts)."""
        x, target = self.stacks[0].split_batch(batch)
        if self.step_count == 0 and self.init_b_dec:
            for s in self.stacks:
                s.init_b_dec(target)
            if self.sync is not None:
                self.sync([s.b_dec.data for s in self.stacks])
        logs = []
        for s in self.stacks:  # backward per stack frees its activations before the next stack runs
            out = s.train_forward(x, stats=stats, **({"target": target} if s.transcoder else {}))
            out.loss.sum().backward()
            logs.append({"loss": out.loss.detach(), **out.parts} if stats else {})
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

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"stack{i}.{k}": v for i, s in enumerate(self.stacks) for k, v in s.state_dict().items()}
        return {**tensors, **optimizer_tensors(self.opt, "opt")}

    def load_state_tensors(self, tensors: dict[str, Tensor], step: int) -> None:
        for i, s in enumerate(self.stacks):
            prefix = f"stack{i}."
            s.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        load_optimizer_tensors(self.opt, tensors, "opt")
        self.step_count = step


def train(
    trainer: Trainer,
    source: BatchSource,
    cfg: SweepConfig,
    ckpt_dir: Path | None,
    fingerprint: str,
    on_log: Callable[[int, StepLog], None] | None = None,
    progress: bool = True,
) -> None:
    """Runs trainer to cfg.n_steps, resuming from ckpt_dir when a checkpoint of the same fingerprint is there;
    calls on_log(step, logs) every cfg.log_every steps and at the last."""
    if ckpt_dir is not None:
        resume(trainer, source, ckpt_dir, fingerprint)
    bar = tqdm(total=cfg.n_steps, initial=trainer.step_count, desc="training", disable=not progress, unit="step")
    for step in range(trainer.step_count, cfg.n_steps):
        log_now = on_log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.n_steps)
        logs = trainer.step(source.next_batch(cfg.batch_size), stats=log_now)
        if log_now and on_log is not None:
            on_log(step + 1, logs)
        bar.update(1)
        if ckpt_dir is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            data = {f"data.{k}": v for k, v in source.get_state().items()}
            save_checkpoint(ckpt_dir, fingerprint, trainer.step_count, {**trainer.state_tensors(), **data})
    bar.close()


def resume(trainer: Trainer, source: BatchSource, ckpt_dir: Path, fingerprint: str) -> None:
    """Loads the checkpoint in ckpt_dir, if there is one, into the trainer and the batch source."""
    found = load_checkpoint(ckpt_dir, fingerprint, trainer.params[0].device)
    if found is not None:
        step, tensors = found
        trainer.load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("data.")}, step)
        source.set_state({k[5:]: v.cpu() for k, v in tensors.items() if k.startswith("data.")})
