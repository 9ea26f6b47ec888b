"""Stage 4, SAE architectures, one file each, registered by the name used in configs and our cfg.json metadata.
A new architecture is a new file plus one line in SAES (or a `register` call)."""

from __future__ import annotations

from typing import Any

from sparse_coding.errors import ConfigError, SAEFolderError
from sparse_coding.saes.base import SAE, TrainOutput
from sparse_coding.saes.batchtopk import BatchTopKSAE
from sparse_coding.saes.clt import BatchTopKCLT, CrossLayerTranscoder, JumpReLUCLT
from sparse_coding.saes.crosscoder import Crosscoder
from sparse_coding.saes.gated import GatedSAE
from sparse_coding.saes.jumprelu import JumpReLUSAE
from sparse_coding.saes.matryoshka import MatryoshkaSAE
from sparse_coding.saes.relu import ReluSAE
from sparse_coding.saes.topk import TopKSAE

SAES: dict[str, type[SAE]] = {
    "relu": ReluSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
    "matryoshka": MatryoshkaSAE,
    "clt": CrossLayerTranscoder,
    "clt_batchtopk": BatchTopKCLT,
    "clt_jumprelu": JumpReLUCLT,
    "crosscoder": Crosscoder,
}


def register(cls: type[SAE]) -> type[SAE]:
    """Adds an architecture to the registry (usable as a class decorator)."""
    SAES[cls.architecture] = cls
    return cls


def single_hook_archs() -> list[str]:
    """The architectures that train on one hook's activations (all but the cross-layer families): --arch all."""
    return [arch for arch, cls in SAES.items() if not cls.cross_layer]


def sae_class(arch: str) -> type[SAE]:
    """Gives the class registered as `arch`, or a ConfigError listing the known ones."""
    if arch not in SAES:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(SAES)}")
    return SAES[arch]


def build_sae(arch: str, d_in: int, d_sae: int, hparams: list[dict[str, Any]], **options: Any) -> SAE:
    """Gives a stack of len(hparams) SAEs of one architecture with the given stack-wide options."""
    return sae_class(arch)(d_in, d_sae, hparams, **options)


def arch_for_saelens_name(name: str) -> str:
    """Maps SAELens' architecture name in cfg.json back to ours (the architecture of that name first: SAELens
    saves BatchTopK SAEs as `jumprelu`, and a folder without our metadata is read in its inference form)."""
    if name in SAES and SAES[name].saelens_architecture == name:
        return name
    for arch, cls in SAES.items():
        if name == cls.saelens_architecture or name in (cls.saelens_transcoder or ()):
            return arch
    raise SAEFolderError(f"no architecture here matches SAELens' {name!r}")


__all__ = [
    "SAE",
    "SAES",
    "TrainOutput",
    "arch_for_saelens_name",
    "build_sae",
    "register",
    "sae_class",
    "single_hook_archs",
]
