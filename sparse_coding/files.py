"""Files on disk, written so a reader never sees half of one: JSON, text and safetensors go to a temporary name
and are renamed when whole. Never pickle. Also the one (de)serializer of optimizer state into tensors, for the
SAE trainer's and the GPT trainer's checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from sparse_coding.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Calls write(tmp) on a temporary name beside `path`, then renames it over `path`: a kill at any moment
    leaves the old file or the new one, never a mix. Every file gets the same mode (0666 less the umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def read_json(path: str | Path) -> Any:
    """Gives the JSON in `path`; a damaged file is a UserError that names it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); repair or delete it") from None


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """safetensors, written whole or not at all."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(cpu, str(tmp), metadata=metadata)
        except SafetensorError as e:  # its I/O errors (a full disk) become the OSError they are
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None

    return atomic_write(path, write)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    return load_file(str(path), device=str(device))


def tensor_metadata(path: str | Path) -> dict[str, str]:
    """Gives the string metadata in a safetensors header (without reading the tensors)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


def finite_or_none(v: float | None) -> float | None:
    """JSON has no NaN: a metric that could not be computed is written as null."""
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


# ---- optimizer state as flat tensors: "<prefix>.<param index>.<name>" ----


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, Tensor]:
    """Gives the optimizer's per-parameter state (Adam's moments and step) as named tensors."""
    tensors = {}
    for i, state in opt.state_dict()["state"].items():
        for name, v in state.items():
            tensors[f"{prefix}.{i}.{name}"] = (
                v.detach().cpu().contiguous() if isinstance(v, Tensor) else torch.tensor(v)
            )
    return tensors


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], prefix: str) -> None:
    """Restores what `optimizer_tensors` gave; the learning rate and other group settings stay as configured."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
