"""Lockstep training of a sweep of SAEs: one stack per dictionary size, every stack fed the same batch,
one fused Adam over all stacked tensors (Adam is elementwise, so stacking changes nothing), checkpoints
that resume exactly after a kill."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from sparse_coding.errors import ConfigError
from sparse_coding.files import load_optimizer_tensors, optimizer_tensors
from sparse_coding.saes import SAE
from sparse_coding.saes.precision import Precision
from sparse_coding.training.checkpoint import load_checkpoint, save_checkpoint
from sparse_coding.training.config import SweepConfig
from sparse_coding.training.distributed import DistInfo, latent_shard
from sparse_coding.training.schedule import Schedule, input_scale

# Per stack, per model [M]: the loss and its parts (mse, l0, l1 or fvu/auxk, ...), as the SAE gives them.
StepLog = list[dict[str, Tensor]]


def build_stacks(
    cfg: SweepConfig,
    d_in: int,
    device: torch.device,
    d_out: int | None = None,
    skip: bool = False,
    info: DistInfo | None = None,
) -> list[SAE]:
    """Gives one stack per architecture and dictionary size (architecture-major, smallest size first), each
    holding every grid point's SAE (transcoders to width d_out, with a skip connection if asked, when d_out is
    given); under --parallel latents (info: this process's place) only this process's share of the latents."""
    torch.manual_seed(cfg.seed)
    classes = cfg.sae_classes()
    shape: dict[str, Any] = {}
    if d_out is not None:
        for cls in classes:
            if not cls.trains_transcoders():
                raise ConfigError(f"architecture {cls.architecture!r} does not train as a transcoder yet")
        shape = {"d_out": d_out, "skip": skip}
    sharded = info is not None and info.active and cfg.parallel == "latents"
    stacks = [
        cls(
            d_in, size, cfg.hparam_grid(cls), **cfg.sae_options(cls), **shape,
            **({"shard": latent_shard(size, info)} if sharded and info is not None else {}),
        ).to(device)
        for cls in classes
        for size in cfg.dict_sizes(d_in)
    ]  # fmt: skip
    for s in stacks:
        s.precision = Precision(cfg.train_dtype)
    return stacks


class BatchSource(Protocol):
    """Where training batches come from; its state is checkpointed so a resumed run sees the same data."""

    def next_batch(self, batch_size: int) -> Tensor: ...
    def get_state(self) -> dict[str, Tensor]: ...
    def set_state(self, state: dict[str, Tensor]) -> None: ...


class Trainer:
    """Steps every stack on the same batch; one fused Adam over all parameters; the learning rate and the
    sparsity coefficients follow `schedule`; inputs are multiplied by `input_scale` once it is set."""

    def __init__(
        self,
        stacks: list[SAE],
        lr: float,
        sync: Callable[[list[Tensor]], None] | None = None,
        init_b_dec: bool = True,
        schedule: Schedule | None = None,
        grad_clip: float | None = None,
    ):
        """sync, when given, averages tensors in place across data-parallel processes (b_dec's data-mean start,
        the input scale, then every step's gradients). init_b_dec=False keeps b_dec as loaded (continuing
        saved SAEs). Without a schedule the learning rate stays lr and the sparsity coefficients whole. grad_clip:
        the largest gradient norm of each SAE per step (0: none; None: its architecture's `default_grad_clip`)."""
        self.stacks, self.sync, self.init_b_dec = stacks, sync, init_b_dec
        self.grad_clips = [s.default_grad_clip() if grad_clip is None else grad_clip for s in stacks]
        self.schedule = schedule or Schedule(n_steps=1, lr=lr)
        self.params = [p for s in stacks for p in s.parameters()]
        fused = all(p.device.type in ("cpu", "cuda") for p in self.params)
        groups = [{"params": list(s.parameters()), "eps": s.adam_eps()} for s in stacks]
        self.opt = torch.optim.Adam(groups, lr=lr, fused=fused)
        self.step_count = 0
        self.input_scale: Tensor | None = None  # [1] float64, once normalisation is estimated

    def step(self, batch: Tensor, stats: bool = False) -> StepLog:
        """One optimizer step on a batch [B, d_in] (transcoders: [B, d_in + d_out], input and target); gives
        per-stack training stats when asked (else empty dicts)."""
        if self.input_scale is not None:  # one scale for a transcoder's input and target: folding stays exact
            batch = batch * self.input_scale.to(batch.dtype)
        x, target = self.stacks[0].split_batch(batch)
        if self.step_count == 0 and self.init_b_dec:
            for s in self.stacks:
                s.init_b_dec(target)
            if self.sync is not None:
                self.sync([s.b_dec.data for s in self.stacks])
        self.apply_schedule()
        logs = []
        for s in self.stacks:  # backward per stack frees its activations before the next stack runs
            out = s.train_forward(x, stats=stats, **({"target": target} if s.transcoder else {}))
            out.loss.sum().backward()
            logs.append({"loss": out.loss.detach(), **out.parts} if stats else {})
        if self.sync is not None:
            self.sync([p.grad for p in self.params if p.grad is not None])
        for s, clip in zip(self.stacks, self.grad_clips, strict=True):
            s.constrain_grads()
            if clip > 0:
                s.clip_grads(clip)
        self.opt.step()
        for s in self.stacks:
            s.constrain_weights()
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1
        return logs

    def apply_schedule(self) -> None:
        """Sets this step's learning rate and sparsity-coefficient fraction (both functions of the step)."""
        if not self.schedule.constant_lr:
            for group in self.opt.param_groups:
                group["lr"] = self.schedule.lr_at(self.step_count)
        for s in self.stacks:
            s.sparsity_scale = self.schedule.sparsity_at(self.step_count)

    def set_input_scale(self, scale: Tensor) -> None:
        """Starts multiplying inputs by scale ([1]; averaged across data-parallel processes). SAEs continued from
        saved ones, which take raw inputs, are first moved into the scaled space."""
        scale = scale.to(self.params[0].device, torch.float64)
        if self.sync is not None:
            self.sync([scale])
        self.input_scale = scale
        if not self.init_b_dec:
            for s in self.stacks:
                s.fold_input_scale(1 / float(scale))

    def export_stacks(self) -> list[SAE]:
        """Gives the stacks as they should be evaluated and saved: on raw activations (copies with the input scale
        folded in), or the stacks themselves when inputs are not scaled."""
        if self.input_scale is None:
            return self.stacks
        return [s.folded(float(self.input_scale)) for s in self.stacks]

    @torch.no_grad()
    def resample(self, batches: list[Tensor], window: int, seed: int) -> None:
        """Re-initialises each stack's latents silent for `window` steps towards inputs from batches that it
        reconstructs badly, and clears those rows' Adam moments (architectures that resample; see relu.py)."""
        x = torch.cat(batches)
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        generator = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + self.step_count)
        for s in self.stacks:
            dead = s.resample(x, window, generator)
            for p in s.latent_parameters():
                state = self.opt.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][dead] = 0

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"stack{i}.{k}": v for i, s in enumerate(self.stacks) for k, v in s.state_dict().items()}
        if self.input_scale is not None:
            tensors["trainer.input_scale"] = self.input_scale
        return {**tensors, **optimizer_tensors(self.opt, "opt")}

    def load_state_tensors(self, tensors: dict[str, Tensor], step: int) -> None:
        for i, s in enumerate(self.stacks):
            prefix = f"stack{i}."
            s.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        load_optimizer_tensors(self.opt, tensors, "opt")
        self.input_scale = tensors.get("trainer.input_scale")
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
    calls on_log(step, logs) every cfg.log_every steps and at the last. Before the first step it estimates the
    input scale (normalize_activations); after every resample_steps()-th it resamples dead latents."""
    if ckpt_dir is not None:
        resume(trainer, source, ckpt_dir, fingerprint)
    if cfg.normalize_activations and trainer.input_scale is None:
        trainer.set_input_scale(input_scale([source.next_batch(cfg.batch_size) for _ in range(cfg.norm_batches)]))
    every = cfg.resample_steps()
    for s in trainer.stacks:
        s.track_firing = every > 0
    bar = tqdm(total=cfg.n_steps, initial=trainer.step_count, desc="training", disable=not progress, unit="step")
    for step in range(trainer.step_count, cfg.n_steps):
        log_now = on_log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.n_steps)
        logs = trainer.step(source.next_batch(cfg.batch_size), stats=log_now)
        if log_now and on_log is not None:
            on_log(step + 1, logs)
        if every and (step + 1) % every == 0 and step + 1 < trainer.schedule.n_steps:
            batches = [source.next_batch(cfg.batch_size) for _ in range(cfg.resample_batches)]
            trainer.resample(batches, cfg.resample_window or every, cfg.seed)
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
