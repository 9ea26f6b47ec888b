"""What a sweep will need, estimated before any work starts, so an absurd size is refused at once with a figure
instead of a traceback after minutes of allocation."""

from __future__ import annotations

import os

import torch

from sparse_coding.errors import ConfigError
from sparse_coding.training.config import SweepConfig

FLOAT_BYTES = 4
GiB = 2**30


def sweep_memory_bytes(cfg: SweepConfig, d_in: int, shards: int = 1, d_out: int | None = None) -> int:
    """Gives an upper estimate of the memory training takes in one process: every parameter four times (value,
    gradient, Adam's two moments) and, per stack, three [n_models, batch, d_sae] tensors (the codes or
    pre-activations of a step, their gradient, and one more for evaluation), all in fp32. With the latents split
    over `shards` processes each holds that share of every per-latent tensor; b_dec is whole on each. d_out: a
    transcoder's output width (default d_in)."""
    sizes, d_out = cfg.dict_sizes(d_in), d_out or d_in
    params = scratch = 0
    for cls in cfg.sae_classes():
        n_models, per_latent = len(cfg.hparam_grid(cls)), cls.weights_per_latent(d_in, d_out, cfg)
        params += sum(n_models * (int(f * per_latent) // shards + d_out) for f in sizes)
        scratch += sum(3 * n_models * cfg.batch_size * f // shards for f in sizes)
    return FLOAT_BYTES * (4 * params + scratch)


def n_grid_points(cfg: SweepConfig) -> int:
    """Gives the SAEs per dictionary size: every architecture's knob values."""
    return sum(len(cfg.hparam_grid(cls)) for cls in cfg.sae_classes())


def device_memory_bytes(device: torch.device) -> int:
    """Gives the memory of the device the sweep trains on: the GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_sweep_fits(
    cfg: SweepConfig, d_in: int, device: torch.device, shards: int = 1, d_out: int | None = None
) -> str:
    """Raises ConfigError when the sweep's estimated memory (per process, its latents split over `shards`) exceeds
    the device's; gives a one-line summary for the run's header."""
    need, have = sweep_memory_bytes(cfg, d_in, shards, d_out), device_memory_bytes(device)
    sizes = cfg.dict_sizes(d_in)
    what = f"{n_grid_points(cfg) * len(sizes)} SAEs of d_in {d_in}, d_sae {min(sizes)}..{max(sizes)}"
    if shards > 1:
        what += f", latents split over {shards} processes"
    if need > have:
        raise ConfigError(
            f"the sweep needs about {need / GiB:.1f} GiB ({what}, batch {cfg.batch_size}) but {device} has "
            f"{have / GiB:.1f} GiB; use fewer or smaller dictionaries (dict_ratio_exp_high) or a smaller batch_size"
        )
    each = " per process" if shards > 1 else ""
    return (
        f"{what}: about {need / GiB:.2f} GiB{each} for weights, Adam and step buffers "
        f"({have / GiB:.0f} GiB on {device})"
    )
