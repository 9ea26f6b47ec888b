"""Killing a real run mid-way, as a user's Ctrl-C or a preempted box would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def kill_after_checkpoint(cmd: list[str], out: Path, cwd: Path, timeout: float = 120, grace: float = 0.0) -> None:
    """Starts cmd, SIGKILLs it once out/checkpoint/state.safetensors exists (plus `grace` seconds), and checks
    that it had not finished by then."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (out / "checkpoint" / "state.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(grace)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILLs proc and every process it started (torchrun's workers live in sessions of their own), as a
    preempted box would."""
    import psutil

    family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
