"""SAEs on disk in the SAELens layout: a folder with cfg.json + sae_weights.safetensors (+ sparsity.safetensors),
which SAELens' `SAE.load_from_disk` reads. What is architecture-specific comes from the SAE class, the weight files
too: a cross-layer transcoder writes circuit-tracer's W_enc_{i}/W_dec_{i} files instead (saes/clt.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_coding.errors import SAEFolderError
from sparse_coding.files import load_tensors, read_json, save_tensors, write_json
from sparse_coding.saes import SAE, arch_for_saelens_name, sae_class
from sparse_coding.saes.base import WEIGHTS_FILE

CFG_FILE, SPARSITY_FILE = "cfg.json", "sparsity.safetensors"
HEADS_FILE = "head_attribution.safetensors"  # attn_z dictionaries: each latent's share per head (eval/heads.py)
DIFF_FILE = "model_diff.safetensors"  # model-diffing crosscoders: relative decoder norms (eval/model_diff.py)
NOT_WEIGHTS = (SPARSITY_FILE, HEADS_FILE, DIFF_FILE)  # what an SAE folder holds beside its weights
SAELENS_LAYOUT = "6.0.0"


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
    files = sae.weight_files(m)
    dtype = next(t.dtype for tensors in files.values() for t in tensors.values() if t.is_floating_point())
    cfg = {
        "architecture": sae.saelens_name(),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **({"d_out": sae.d_out} if sae.transcoder else {}),
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": sae.centers_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.saelens_cfg(m),
        # sae_lens_version names the layout (SAELens 6: metadata nested here); without it SAELens reads the file
        # as a pre-6 config and drops the metadata, hook_name included
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT,
            "arch": sae.architecture,
            "training_architecture": sae.saelens_training_architecture or sae.saelens_architecture,
            **sae.hparams(m),
            **sae.stack_options(),
            **metadata,
        },
    }
    for name, tensors in files.items():
        save_tensors(folder / name, tensors)
    if feature_density is not None:  # SAELens stores log10 of each feature's firing frequency
        save_tensors(folder / SPARSITY_FILE, {"sparsity": torch.log10(feature_density.float() + 1e-10)})
    write_json(folder / CFG_FILE, cfg)  # last: a folder with cfg.json is complete
    return folder


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> tuple[SAE, dict[str, Any]]:
    """Reads a SAELens folder written by `save_sae` (or a compatible one) as a one-model stack; gives it and
    its cfg.json."""
    folder = Path(folder)
    weight_files = sorted(p for p in folder.glob("*.safetensors") if p.name not in NOT_WEIGHTS)
    if not (folder / CFG_FILE).is_file() or not weight_files:
        raise SAEFolderError(f"{folder} is not an SAE folder (needs {CFG_FILE} and {WEIGHTS_FILE})")
    cfg = read_json(folder / CFG_FILE)
    try:
        meta = cfg.get("metadata") or {}
        cls = sae_class(meta.get("arch") or arch_for_saelens_name(cfg["architecture"]))
        weights = {name: t for path in weight_files for name, t in load_tensors(path).items()}
        options = {k: meta[k] for k in cls.options if k in meta}
        if "d_out" in cfg:  # a transcoder: b_dec is never applied to the input, whether trained or not
            options.update(d_out=cfg["d_out"], skip="W_skip" in weights, decoder_bias=meta.get("decoder_bias", True))
        else:
            options["decoder_bias"] = cfg.get("apply_b_dec_to_input", True)
        sae = cls(cfg["d_in"], cfg["d_sae"], [cls.hparams_from_saelens(cfg)], **options)
        sae.load_exported(0, weights)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise SAEFolderError(f"cannot load the SAE in {folder}: {type(e).__name__}: {e}") from None
    return sae.to(device), cfg
