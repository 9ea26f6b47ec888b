"""Checkpoints of a sweep: one safetensors file with every stack, the optimizer and the data position, plus the
fingerprint of the settings it belongs to, so a killed run resumes exactly and a changed one is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_coding.errors import CheckpointError
from sparse_coding.files import load_tensors, read_json, save_tensors, tensor_metadata, write_json

STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"

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
    "mini_runs",
)


def config_fingerprint(config: dict[str, Any], ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> str:
    """Hash of the settings that shape the trained weights; a checkpoint only resumes under the same one."""
    kept = {k: v for k, v in sorted(config.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_dir(root: Path, rank: int, world: int) -> Path:
    """Where one process keeps its checkpoint: root itself, or root/rank<r> when several processes each keep one."""
    return root / f"rank{rank}" if world > 1 else root


def check_world(root: Path, world: int) -> None:
    """Raises CheckpointError if the checkpoint under root was written by another number of processes (each kept
    its own part of the state, so it resumes only with as many)."""
    written = 1 if (root / STATE_JSON).is_file() else len([p for p in root.glob("rank*") if (p / STATE_JSON).is_file()])
    if written and written != world:
        raise CheckpointError(
            f"the checkpoint in {root} was written by {written} process{'es' if written > 1 else ''} and this run "
            f"has {world}; resume it with the same number (torchrun --nproc_per_node {written}), or use another --out"
        )


def check_resumable(ckpt_dir: Path, fingerprint: str) -> None:
    """Raises CheckpointError if ckpt_dir holds a checkpoint made with other settings; call it before writing
    anything into a run folder, so a refused rerun leaves the folder as it was."""
    state = ckpt_dir / STATE_JSON
    if state.is_file() and read_json(state).get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"the checkpoint in {ckpt_dir} was made with different settings; rerun with the same settings to "
            "resume it, or use another output folder"
        )


def save_checkpoint(ckpt_dir: Path, fingerprint: str, step: int, tensors: dict[str, Tensor]) -> None:
    """One atomic safetensors file holds the whole state and, in its header, the step it belongs to, so a
    kill at any moment leaves either the old checkpoint or the new one, never a mix."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(ckpt_dir / STATE_JSON, {"fingerprint": fingerprint})
    save_tensors(ckpt_dir / STATE_TENSORS, tensors, metadata={"step": str(step)})


def load_checkpoint(ckpt_dir: Path, fingerprint: str, device: torch.device) -> tuple[int, dict[str, Tensor]] | None:
    """Gives (step, tensors) of the checkpoint in ckpt_dir, None if there is none."""
    path = ckpt_dir / STATE_TENSORS
    if not path.is_file():
        return None
    check_resumable(ckpt_dir, fingerprint)
    step = int(tensor_metadata(path)["step"])
    return step, load_tensors(path, device=device)
