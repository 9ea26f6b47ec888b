"""The toy-data replication: train an l1 (or k) × dictionary-size sweep on synthetic activations with known
ground truth, then measure how well each SAE recovers it and how well agreement with the next larger
dictionary predicts that without the ground truth."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparse_coding.config import option
from sparse_coding.data.toy import ToyDataConfig, ToyGenerator
from sparse_coding.errors import CheckpointError
from sparse_coding.eval import metrics
from sparse_coding.eval.plots import metrics_against_l0
from sparse_coding.eval.reconstruction import evaluate
from sparse_coding.eval.report import plot_grid, save_saes, sweep_rows
from sparse_coding.files import save_tensors, write_json
from sparse_coding.saes import SAE
from sparse_coding.saes.precision import Precision
from sparse_coding.training.checkpoint import check_resumable, config_fingerprint
from sparse_coding.training.config import SMOKE_SWEEP, SweepConfig
from sparse_coding.training.log import LOG_FILE, TrainLog
from sparse_coding.training.memory import check_sweep_fits
from sparse_coding.training.schedule import Schedule
from sparse_coding.training.trainer import Trainer, build_stacks, train
from utils import resolve_device


@dataclass
class ToyRunConfig(SweepConfig, ToyDataConfig):
    preset: str = option("cpu", "the preset this config started from")
    out: str = option("", "run folder; empty: outputs/<timestamp>_toy_<preset>/")
    n_eval: int = option(20_000, "held-out examples every metric is computed on", gt=0)
    mmcs_threshold: float = option(
        0.9, "a feature counts as matched when its best cosine similarity exceeds this", gt=0, lt=1
    )
    save_saes: bool = option(True, "write every SAE in the SAELens layout under saes/")

    def check(self) -> None:
        super().check()
        self.check_sizes(self.activation_dim)

    def data_config(self) -> ToyDataConfig:
        return ToyDataConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ToyDataConfig)})


def paper() -> ToyRunConfig:
    """The report's grid at full size: l1 = 10^(e/4), e in -8..8; ratio 2^e, e in -3..5; 20 000 steps (GPU)."""
    return ToyRunConfig(preset="paper", n_steps=20_000, batch_size=1024, checkpoint_every=1000)


def cpu() -> ToyRunConfig:
    """The same question on 2 cores in a few minutes: 64 dimensions and 128 true features (the paper's 2×
    superposition, sparsity and decay), ratios 1/4..8 and l1 = 10^(e/4), e in -4..2 (below that nothing is
    sparse enough to recover features at this size)."""
    return ToyRunConfig(
        preset="cpu",
        activation_dim=64,
        n_ground_truth=128,
        l1_exp_low=-4,
        l1_exp_high=2,
        dict_ratio_exp_low=-2,
        dict_ratio_exp_high=3,
        n_steps=2500,
        batch_size=1024,
        checkpoint_every=500,
        n_eval=20_000,
    )


def archs() -> ToyRunConfig:
    """Every architecture on the cpu preset's problem at the true dictionary size (ratio 2: 128 latents for 128
    true features), each with its knob swept, plotted as MMCS, FVU and dead latents against L0 on one figure."""
    return dataclasses.replace(
        cpu(),
        preset="archs",
        arch="all",
        dict_ratio_exp_low=1,
        dict_ratio_exp_high=1,
        k_values=[2, 3, 4, 5, 6, 8, 12],
        dead_tokens_threshold=200_000,
    )


def smoke() -> ToyRunConfig:
    """Seconds, for tests."""
    return ToyRunConfig(
        **SMOKE_SWEEP,
        preset="smoke",
        activation_dim=16,
        n_ground_truth=32,
        mean_active=3.0,
        dict_ratio_exp_high=2,
        n_steps=60,
        batch_size=256,
        checkpoint_every=20,
        log_every=20,
        n_eval=2048,
    )


PRESETS = {"paper": paper, "cpu": cpu, "archs": archs, "smoke": smoke}


ARCHS_PLOT = "archs_vs_l0.png"


class ToySource:
    """Training batches from the toy generator, with its RNG state checkpointed."""

    def __init__(self, gen: ToyGenerator):
        self.gen = gen

    def next_batch(self, batch_size: int) -> Tensor:
        return self.gen.sample(batch_size)[0]

    def get_state(self) -> dict[str, Tensor]:
        return {"rng": self.gen.get_state()}

    def set_state(self, state: dict[str, Tensor]) -> None:
        self.gen.set_state(state["rng"])


def run_toy(cfg: ToyRunConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Trains the sweep (resuming a killed run in out_dir), evaluates it and writes everything there."""
    if (out_dir / "results.json").exists():
        raise CheckpointError(f"{out_dir} already holds a finished run (results.json); choose another --out")
    device = resolve_device(cfg.device)
    print(f"sweep: {check_sweep_fits(cfg, cfg.activation_dim, device)}")
    print(Precision(cfg.train_dtype).describe(device))
    gen = ToyGenerator(cfg.data_config(), seed=cfg.seed, device=device)
    fingerprint = config_fingerprint(asdict(cfg))
    check_resumable(out_dir / "checkpoint", fingerprint)
    write_json(out_dir / "config.json", asdict(cfg))
    save_tensors(out_dir / "ground_truth.safetensors", {"features": gen.features, "probs": gen.probs})

    stacks = build_stacks(cfg, cfg.activation_dim, device)
    log = TrainLog(out_dir / LOG_FILE, stacks)
    trainer = Trainer(stacks, lr=cfg.lr, schedule=Schedule.from_config(cfg))
    train(trainer, ToySource(gen), cfg, out_dir / "checkpoint", fingerprint, log, progress)
    runs = score_against_truth(cfg, gen, trainer.export_stacks(), out_dir, progress)
    results = {"config": asdict(cfg), "runs": runs}
    write_json(out_dir / "results.json", results)
    plot_results(cfg, runs, out_dir)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)  # the SAEs are saved; the optimizer state is not needed
    return results


def score_against_truth(
    cfg: ToyRunConfig, gen: ToyGenerator, stacks: list[SAE], out_dir: Path, progress: bool
) -> list[dict[str, Any]]:
    """Evaluates every SAE on fresh held-out examples and against the true features; saves the SAEs; gives
    the result rows."""
    eval_gen = ToyGenerator(cfg.data_config(), seed=cfg.seed, device=gen.device, sample_seed=cfg.seed + 1_000_003)
    x_eval = torch.cat([eval_gen.sample(cfg.batch_size)[0] for _ in range(-(-cfg.n_eval // cfg.batch_size))])
    stats = evaluate(stacks, x_eval[: cfg.n_eval], cfg.batch_size)

    def truth_metrics(i: int, m: int) -> dict[str, float]:
        dec = stacks[i].decoder()[m].detach()
        return {
            "mmcs": float(metrics.mmcs(gen.features, dec)),
            "mmcs_share_above": float(metrics.share_above(gen.features, dec, cfg.mmcs_threshold)),
        }

    runs = sweep_rows(stacks, stats, cfg.dict_ratios(), cfg.mmcs_threshold, truth_metrics, progress)
    if cfg.save_saes:
        meta = {
            "model_name": "toy",
            "hook_name": "toy",
            "context_size": 1,
            "dataset_path": "toy",
            "seed": cfg.seed,
            "lr": cfg.lr,
            "n_steps": cfg.n_steps,
            "batch_size": cfg.batch_size,
        }
        save_saes(stacks, stats, out_dir / "saes", meta)
    return runs


def plot_results(cfg: ToyRunConfig, runs: list[dict[str, Any]], out_dir: Path) -> None:
    """Writes the four heatmaps of the report (rows: the knob, l1 or k; columns: dictionary ratio); for a sweep
    of several architectures, one figure of MMCS, FVU and dead latents against L0 instead."""
    truth = f"; true features at ratio {cfg.n_ground_truth / cfg.activation_dim:g}"
    if len(cfg.arch_names()) > 1:
        keys = [("mmcs", "MMCS with ground truth"), ("fvu", "FVU"), ("dead_features", "dead latents")]
        metrics_against_l0(runs, keys, "arch", "architectures" + truth, out_dir / ARCHS_PLOT)
        return
    plot_grid(runs, "mmcs", "MMCS with ground truth" + truth, out_dir / "mmcs_matrix.png")
    plot_grid(
        runs,
        "dead_features",
        "dead features (never fired on eval)" + truth,
        out_dir / "dead_features_matrix.png",
        fmt="{:.0f}",
    )
    plot_grid(runs, "fvu", "reconstruction loss (FVU)" + truth, out_dir / "recon_loss_matrix.png", fmt="{:.3f}")
    plot_grid(
        runs, "mmcs_with_larger", "MMCS with next larger dictionary" + truth, out_dir / "mmcs_with_larger_matrix.png"
    )
