"""One writer per folder: a run holds its output folder, and caching holds an activation store, for as long as it
writes there, so two processes never interleave their files.

The lock is the kernel's (flock, through `filelock`): when its holder dies, even by SIGKILL, the kernel lets go and
the next process takes the folder over. Beside the lock a small JSON names the holder (pid, host, start time,
command) for the one line a refused process prints; finding it on taking the lock means the last holder was
killed, which is said once on stderr.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sparse_coding.errors import BusyError, UserError
from sparse_coding.files import read_json, write_json


class FolderLock:
    """An exclusive, non-blocking lock on one folder, held from `acquire` to `release`.

    lock_path and holder_path: the lock file and the holder's JSON (inside the folder for run folders; beside it for
    an activation store, which must stay a folder of chunks only). `what` names the folder in messages."""

    def __init__(self, lock_path: Path, holder_path: Path, what: str):
        self.lock_path, self.holder_path, self.what = lock_path, holder_path, what
        self._lock = FileLock(str(lock_path), timeout=0)

    def acquire(self) -> None:
        """Takes the lock, or raises BusyError naming the process that holds it."""
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where a folder should be, no permission: the user's to fix
            raise UserError(f"cannot write to {self.what}: {e.strerror or e}") from None
        try:
            self._lock.acquire()
        except Timeout:
            holder_now = describe(read_holder(self.holder_path))
            raise BusyError(f"{self.what} is in use by {holder_now}; wait for it to finish or use another") from None
        stale = read_holder(self.holder_path)
        if stale is not None:
            print(f"note: taking over {self.what} from a run that was killed ({describe(stale)})", file=sys.stderr)
        write_json(self.holder_path, holder())

    def release(self) -> None:
        """Lets go, leaving no file behind. The lock file goes while still locked: a process that opened it before
        is refused, one that opens it after creates a new one, and by then this process writes nothing more."""
        self.holder_path.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        self._lock.release()

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_folder_lock(folder: Path) -> FolderLock:
    """The lock of a run folder (its files inside it)."""
    return FolderLock(folder / ".sparse_coding.lock", folder / ".sparse_coding.holder.json", f"output folder {folder}")


def store_lock(folder: Path) -> FolderLock:
    """The lock of an activation store while it is written (its files beside the folder)."""
    return FolderLock(
        folder.with_name(folder.name + ".lock"),
        folder.with_name(folder.name + ".holder.json"),
        f"activation store {folder}",
    )


def holder() -> dict[str, Any]:
    """Who this process is, for the message another process prints."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": sys.argv}


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, UserError):
        return None  # unreadable: nothing to say about its holder


def describe(h: dict[str, Any] | None) -> str:
    """One phrase naming a holder: pid, host, start time and command."""
    if not h:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h.get("started", 0))))
    command = " ".join(Path(str(a)).name if i == 0 else str(a) for i, a in enumerate(h.get("command") or []))
    return f"pid {h.get('pid')} on {h.get('host')} since {started} ({command})"
