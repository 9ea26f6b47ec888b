"""SAE architectures, one file each, registered by the name used in configs and our cfg.json metadata.
A new architecture is a new file plus one line in SAES."""

from __future__ import annotations

import inspect
from typing import Any

from sparse_coding.saes.base import SAE, TrainOutput
from sparse_coding.saes.relu import ReluSAE
from sparse_coding.saes.topk import TopKSAE

SAES: dict[str, type[SAE]] = {
    "relu": ReluSAE,
    "topk": TopKSAE,
}


def build_sae(arch: str, d_in: int, d_sae: int, hparams: list[dict[str, Any]], **options: Any) -> SAE:
    """Gives a stack of len(hparams) SAEs of one architecture; options a class does not take are ignored,
    so one sweep config can carry every architecture's options."""
    if arch not in SAES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(SAES)}")
    cls = SAES[arch]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(d_in, d_sae, hparams, **{k: v for k, v in options.items() if k in accepted})


def arch_for_saelens_name(name: str) -> str:
    """Maps SAELens' architecture name in cfg.json back to ours."""
    for arch, cls in SAES.items():
        if cls.saelens_architecture == name:
            return arch
    raise ValueError(f"no architecture here matches SAELens' {name!r}")


__all__ = ["SAE", "SAES", "TrainOutput", "build_sae", "arch_for_saelens_name"]
