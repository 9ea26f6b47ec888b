"""Files on disk: SAEs in the SAELens layout, JSON and safetensors written atomically. Never pickle."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sparse_coding.saes import SAE, arch_for_saelens_name, build_sae

CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_json(path: str | Path, obj: Any) -> None:
    """Writes JSON to a temporary name, then renames: a reader never sees half a file."""
    path = Path(path)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors, written to a temporary name and renamed."""
    path = Path(path)
    tmp = _tmp(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    return load_file(str(path), device=str(device))


def finite_or_none(v: float | None) -> float | None:
    """JSON has no NaN: a metric that could not be computed is written as null."""
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def save_sae(
    folder: str | Path,
    sae: SAE,
    m: int,
    metadata: dict[str, Any],
    feature_density: Tensor | None = None,
) -> Path:
    """Writes model m of a stack as a SAELens folder: cfg.json + sae_weights.safetensors (+ sparsity)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = sae.export(m)
    cfg = {
        "architecture": sae.saelens_architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": str(weights["W_enc"].dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.decoder_bias,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.saelens_cfg(m),
        "metadata": {"arch": sae.architecture, **sae.hparams(m), **metadata},
    }
    save_tensors(folder / WEIGHTS_FILE, weights)
    if feature_density is not None:  # SAELens stores log10 of each feature's firing frequency
        save_tensors(folder / SPARSITY_FILE, {"sparsity": torch.log10(feature_density.float() + 1e-10)})
    write_json(folder / CFG_FILE, cfg)  # last: a folder with cfg.json is complete
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> tuple[SAE, dict[str, Any]]:
    """Reads a SAELens folder written by `save_sae` (or a compatible one) as a one-model stack."""
    folder = Path(folder)
    if not (folder / CFG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not an SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE})")
    cfg = read_json(folder / CFG_FILE)
    meta = cfg.get("metadata") or {}
    arch = meta.get("arch") or arch_for_saelens_name(cfg["architecture"])
    hparams = {"k": cfg["k"]} if "k" in cfg else {"l1_alpha": meta.get("l1_alpha", 0.0)}
    sae = build_sae(arch, cfg["d_in"], cfg["d_sae"], [hparams], decoder_bias=cfg.get("apply_b_dec_to_input", True))
    sae.load_exported(0, load_tensors(folder / WEIGHTS_FILE))
    return sae.to(device), cfg
