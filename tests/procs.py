"""Killing a real run mid-way, as a user's Ctrl-C or a preempted box would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Runs the body on one thread, as torchrun runs each of its processes (OMP_NUM_THREADS=1): a one-process
    reference run made here then uses the same kernels as the ranks it is compared with."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Exit:
    returncode: int
    stderr: str
    stdout: str = ""


def in_process(capsys: Any, main: Callable[[list[str]], object], *args: str) -> Exit:
    """An entry's main in this process, through run_main as its script runs it (the same one error line and exit
    code), which spares each failing case an interpreter's start-up (~3 s)."""
    from utils import run_main

    capsys.readouterr()
    try:
        run_main(lambda: main(list(args)))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return Exit(code, out.err, out.out)
