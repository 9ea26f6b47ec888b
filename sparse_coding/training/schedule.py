"""What changes over a run besides the weights: the learning rate (warm-up, then a linear or cosine fall to lr_end
over the last steps), the fraction of each sparsity coefficient in use (a linear warm-up), and the input scale
that normalises activations to mean norm √d_in.

The two schedules are pure functions of the step, so a resumed run gets them right from the step alone; the input
scale is estimated once, before the first step, and lives in the checkpoint (Trainer.state_tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from sparse_coding.training.config import SweepConfig


@dataclass(frozen=True)
class Schedule:
    """Step s counts optimizer steps from 0; n_steps is the whole run's, whatever part of it one call trains."""

    n_steps: int
    lr: float
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 0
    lr_decay: str = "linear"
    lr_end: float = 0.0
    sparsity_warmup_steps: int = 0

    @classmethod
    def from_config(cls, cfg: SweepConfig) -> Schedule:
        return cls(
            n_steps=cfg.n_steps,
            lr=cfg.lr,
            lr_warmup_steps=cfg.lr_warmup_steps,
            lr_decay_steps=cfg.lr_decay_steps,
            lr_decay=cfg.lr_decay,
            lr_end=cfg.lr_end,
            sparsity_warmup_steps=cfg.sparsity_warmup_steps,
        )

    @property
    def constant_lr(self) -> bool:
        return self.lr_warmup_steps == 0 and self.lr_decay_steps == 0

    def lr_at(self, step: int) -> float:
        """Warm-up: lr·(s+1)/warm-up steps; the last lr_decay_steps fall to lr_end (linear or half a cosine),
        reaching it at the last step; lr between."""
        if step < self.lr_warmup_steps:
            return self.lr * (step + 1) / self.lr_warmup_steps
        decay_start = self.n_steps - self.lr_decay_steps
        if self.lr_decay_steps == 0 or step < decay_start:
            return self.lr
        t = min(1.0, (step - decay_start + 1) / self.lr_decay_steps)
        if self.lr_decay == "cosine":
            t = (1 - math.cos(math.pi * t)) / 2
        return self.lr + (self.lr_end - self.lr) * t

    def sparsity_at(self, step: int) -> float:
        """The fraction of each sparsity coefficient used at step s: (s+1)/warm-up steps, then 1."""
        if step >= self.sparsity_warmup_steps:
            return 1.0
        return (step + 1) / self.sparsity_warmup_steps


def input_scale(batches: list[Tensor]) -> Tensor:
    """Gives the factor that brings the mean norm of these activations (each [B, d]) to √d, as a [1] float64
    tensor (SAELens' `expected_average_only_in`; Anthropic's April 2024 update)."""
    x = torch.cat([b.double() for b in batches])
    return (math.sqrt(x.shape[1]) / x.norm(dim=-1).mean()).reshape(1)
