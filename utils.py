"""Small shared helpers: user-facing errors, seeding, device choice and run folders."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong shape): printed as one line, exit 2."""


def run_main(main: Callable[[], object]) -> None:
    """Runs an entry point, turning a UserError into one plain message and a non-zero exit."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """Gives the torch device for 'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r} (use auto, cpu or cuda)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def make_run_dir(out: str | None, name: str, root: str = "outputs") -> Path:
    """Gives a writable run folder: `out` as given, or outputs/<timestamp>_<name>/."""
    path = Path(out) if out else Path(root) / f"{datetime.now():%Y%m%d_%H%M%S}_{name}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {str(path)!r}: {e.strerror or e}") from e
    return path


def tune_allocator() -> None:
    """Keeps freed blocks up to 32 MiB in glibc's heap instead of returning them to the OS.

    Why: every fresh large tensor otherwise costs a page fault per 4 KiB on first touch; on the 2-core
    sandboxes we run on that was ~20 ms for a 16 MiB gradient, as slow as the arithmetic on it. Larger
    scratch tensors are reused by the SAE code itself. A no-op where glibc's mallopt is absent.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return
    if mallopt is None:
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    mallopt(M_TOP_PAD, 256 * 2**20)
