"""Small shared helpers of the entry scripts: the one error exit, seeding, device choice and run folders."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparse_coding.errors import CheckpointError, ConfigError, UserError
from sparse_coding.files import write_text
from sparse_coding.locks import run_folder_lock

# Environment faults a user fixes (disk full, no permission, read-only disk): one line, not a traceback.
_ENV_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}
RUN_MARKER = ".sparse_coding_run"  # in every run folder this tool made: only those are ever written into again
OWN_FILES = ".sparse_coding"  # the prefix of the marker's and the lock's files (locks.py)


def is_own_file(p: Path) -> bool:
    """The marker, the lock's files, and their temporaries while atomic_write writes them ('.' + the name)."""
    return p.name.startswith(OWN_FILES) or p.name.startswith("." + OWN_FILES)


def run_main(main: Callable[[], object]) -> None:
    """Runs an entry point, turning a UserError (or a full disk, a missing permission) into one plain line on
    stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        _fail(str(e))
    except OSError as e:
        if e.errno not in _ENV_ERRNOS:
            raise
        _fail(f"{e.filename}: {e.strerror}" if e.filename else str(e.strerror or e))
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)


def _fail(message: str) -> None:
    """One line on stderr (a multi-line message from a library is folded), exit code 2. Progress bars the error
    interrupted are closed first, so the line starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(2)


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
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def claim_folder(path: Path, kind: str) -> bool:
    """Makes `path` a folder of `kind` runs; gives whether it was created here.

    A run writes only into a folder it may own: a new or empty one (which it then marks as its own), or one an
    earlier run of the same kind marked (to resume it, or to be refused there if it is finished). Anything else
    is refused with one line and left untouched.
    """
    check_claimable(path, kind)
    created = not path.exists()
    with _writing(path):
        path.mkdir(parents=True, exist_ok=True)
        write_text(path / RUN_MARKER, json.dumps({"kind": kind}) + "\n")  # whole, for another rank reading it now
    return created


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Says a failure to write into output folder `path` as the user error it is."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write to output folder {str(path)!r}: {e.strerror or e}") from None


def check_claimable(path: Path, kind: str) -> None:
    """Raises unless `path` is new, empty, or marked by a run of `kind` (see claim_folder); writes nothing."""
    marker = path / RUN_MARKER
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is a file, not a folder")
    if marker.is_file():
        owner = json.loads(marker.read_text() or "{}").get("kind")
        if owner != kind:
            raise CheckpointError(f"{path} holds a {owner} run, not a {kind} run; choose another --out")
    elif path.exists() and not all(is_own_file(p) for p in path.iterdir()):
        raise CheckpointError(f"{path} is not empty and was not made by this tool; choose a new or empty --out")


def is_main_process() -> bool:
    """Whether this is the process that owns the run's files: the only one, or torchrun's rank 0 (read from the
    environment, before any process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def run_folder(out: str | None, name: str, kind: str, root: str = "outputs") -> Iterator[Path]:
    """Gives the claimed run folder `out` (default outputs/<timestamp>_<name>/) for a run of `kind`, locked for the
    run (locks.py: a second process is refused with one line naming the first); a folder made here and left holding
    nothing but its mark when the run fails is removed again."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not out:
        raise ConfigError("under torchrun give --out: every process must write into the same folder")
    path = Path(out) if out else Path(root) / f"{datetime.now():%Y%m%d_%H%M%S}_{name}"
    check_claimable(path, kind)
    lock = run_folder_lock(path) if is_main_process() else None
    created = not path.exists()
    if lock is not None:
        lock.acquire()  # refused: nothing of ours to undo, and the folder is another run's
    try:
        claim_folder(path, kind)
        yield path
    except BaseException:
        if lock is not None:
            lock.release()
        if created and all(is_own_file(p) for p in path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)
        raise
    if lock is not None:
        lock.release()


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
