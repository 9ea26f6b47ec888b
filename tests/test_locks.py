"""One run owns an output folder (and one caching process an activation store) at a time: a second real process
is refused with one line naming the first; a killed holder's lock is taken over."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparse_coding.errors import BusyError, CheckpointError
from sparse_coding.locks import store_lock

ROOT = Path(__file__).resolve().parents[1]
HOLDER = ".sparse_coding.holder.json"


def _toy(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "replicate_toy_models.py", "--preset", "smoke", "--out", str(out), *extra]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, "the first run ended before it held the folder"
        time.sleep(0.05)


def test_a_second_run_on_the_same_out_is_refused_and_a_killed_one_is_taken_over(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_toy(out, "--seed", "0", "--n_steps", "100000", "--checkpoint_every", "5"), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for(out / "checkpoint" / "state.safetensors", first)
        second = subprocess.run(_toy(out, "--seed", "1"), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and str(out) in lines[0], second.stderr
        assert json.loads((out / "config.json").read_text())["seed"] == 0  # the first run's files, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / HOLDER).exists()  # what a killed run leaves: its holder note (the kernel dropped its lock)
    rerun = subprocess.run(_toy(out, "--seed", "0", "--n_steps", "20"), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"taking over output folder {out} from a run that was killed (pid {first.pid}" in rerun.stderr
    assert (out / "results.json").exists() and not (out / HOLDER).exists()
    assert not (out / ".sparse_coding.lock").exists()


def test_an_activation_store_being_written_is_refused_to_a_second_writer(tmp_path):
    store = tmp_path / "acts" / "store"
    hold = (
        "import pathlib, sys, time\nfrom sparse_coding.locks import store_lock\n"
        "lock = store_lock(pathlib.Path(sys.argv[1]))\nlock.acquire()\nprint('held', flush=True)\ntime.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(store)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=rf"activation store {store} is in use by pid {holder.pid}"):
            store_lock(store).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = store_lock(store)
    lock.acquire()  # the kernel let go when the holder died
    lock.release()
    assert sorted(p.name for p in store.parent.iterdir()) == []  # nothing left beside the store


def test_a_folder_another_rank_is_claiming_reads_as_ours(tmp_path):
    """Under torchrun every rank checks --out while rank 0 claims it: the lock's holder file and the marker are
    then half-written under atomic_write's temporary names ('.' + their names), which must not read as a stranger's
    files ("not empty and was not made by this tool" failed a two-rank run once), nor the marker as a foreign run."""
    from utils import RUN_MARKER, check_claimable, claim_folder

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".sparse_coding.lock").touch()
    (folder / "..sparse_coding.holder.json.tmp123").write_text("{")
    (folder / f".{RUN_MARKER}.tmp123").write_text("")
    check_claimable(folder, "toy")
    claim_folder(folder, "toy")
    assert json.loads((folder / RUN_MARKER).read_text()) == {"kind": "toy"}
    (folder / "results.json").write_text("{}")  # a stranger's file still refuses an unmarked folder
    (folder / RUN_MARKER).unlink()
    with pytest.raises(CheckpointError, match="not made by this tool"):
        check_claimable(folder, "toy")
