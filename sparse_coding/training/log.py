"""The training log: each SAE's loss and its parts every `log_every` steps, as JSON lines in the run folder
(`train_log.jsonl`: {"step", "sae", "loss", "mse", "l0", ...}) and, when a wandb run is given, in wandb."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparse_coding.files import write_text
from sparse_coding.saes import SAE
from sparse_coding.training.trainer import StepLog

LOG_FILE = "train_log.jsonl"


class TrainLog:
    """Callable as train()'s on_log. A resumed run first drops the lines it is about to write again (those
    after its checkpoint), so the file reads as one unbroken run."""

    def __init__(self, path: Path | None, stacks: list[SAE], wandb_run: Any = None):
        self.path, self.stacks, self.wandb_run = path, stacks, wandb_run
        self._started = False

    def __call__(self, step: int, logs: StepLog) -> None:
        rows = [
            {"step": step, "sae": sae.name(m), **{k: float(v[m]) for k, v in log.items()}}
            for sae, log in zip(self.stacks, logs, strict=True)
            for m in range(sae.n_models)
        ]
        if self.path is not None:
            if not self._started:
                self._drop_from(step)
            with self.path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        self._started = True
        if self.wandb_run is not None:
            self.wandb_run.log(
                {f"train/{r['sae']}/{k}": v for r in rows for k, v in r.items() if k not in ("step", "sae")},
                step=step,
            )

    def _drop_from(self, step: int) -> None:
        if self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        write_text(self.path, "".join(line for line in lines if json.loads(line)["step"] < step))
