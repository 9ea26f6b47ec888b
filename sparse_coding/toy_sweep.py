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

from sparse_coding import metrics
from sparse_coding.io import save_tensors, write_json
from sparse_coding.report import evaluate, plot_grid, save_saes, sweep_rows
from sparse_coding.toy import ToyDataConfig, ToyGenerator, check_toy_config
from sparse_coding.train import (
    RESUMABLE_CHANGES,
    CheckpointMismatch,
    SweepConfig,
    Trainer,
    build_stacks,
    check_resumable,
    check_sweep_config,
    config_fingerprint,
    train,
)
from utils import UserError, resolve_device


@dataclass
class ToyRunConfig(SweepConfig, ToyDataConfig):
    preset: str = "cpu"
    out: str = ""  # run folder; empty: outputs/<timestamp>_toy/
    n_eval: int = 20_000  # held-out examples for every metric
    mmcs_threshold: float = 0.9  # for the share of features matched above it
    save_saes: bool = True  # write every SAE in the SAELens layout


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


def smoke() -> ToyRunConfig:
    """Seconds, for tests."""
    return ToyRunConfig(
        preset="smoke",
        activation_dim=16,
        n_ground_truth=32,
        mean_active=3.0,
        l1_exp_low=-4,
        l1_exp_high=0,
        l1_exp_base=10.0,
        k_values=[2, 4],
        dict_ratio_exp_low=0,
        dict_ratio_exp_high=2,
        n_steps=60,
        batch_size=256,
        checkpoint_every=20,
        log_every=20,
        n_eval=2048,
        device="cpu",
    )


PRESETS = {"paper": paper, "cpu": cpu, "smoke": smoke}


def check_config(cfg: ToyRunConfig) -> None:
    try:
        check_toy_config(cfg)
        check_sweep_config(cfg, cfg.activation_dim)
    except ValueError as e:
        raise UserError(str(e)) from e
    if cfg.n_eval <= 0:
        raise UserError("n_eval must be positive")
    if not 0 < cfg.mmcs_threshold < 1:
        raise UserError("mmcs_threshold must be in (0, 1)")


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
    check_config(cfg)
    if (out_dir / "results.json").exists():
        raise UserError(f"{out_dir} already holds a finished run (results.json); choose another --out")
    device = resolve_device(cfg.device)
    data_cfg = ToyDataConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ToyDataConfig)})
    gen = ToyGenerator(data_cfg, seed=cfg.seed, device=device)
    fingerprint = config_fingerprint(asdict(cfg), RESUMABLE_CHANGES)
    try:
        check_resumable(out_dir / "checkpoint", fingerprint)
    except CheckpointMismatch as e:
        raise UserError(str(e)) from e
    write_json(out_dir / "config.json", asdict(cfg))
    save_tensors(out_dir / "ground_truth.safetensors", {"features": gen.features, "probs": gen.probs})

    stacks = build_stacks(cfg, cfg.activation_dim, device)
    trainer = Trainer(stacks, lr=cfg.lr)
    try:
        train(trainer, ToySource(gen), cfg, out_dir / "checkpoint", fingerprint, progress=progress)
    except CheckpointMismatch as e:
        raise UserError(str(e)) from e

    eval_gen = ToyGenerator(data_cfg, seed=cfg.seed, device=device, sample_seed=cfg.seed + 1_000_003)
    x_eval = torch.cat([eval_gen.sample(cfg.batch_size)[0] for _ in range(-(-cfg.n_eval // cfg.batch_size))])
    x_eval = x_eval[: cfg.n_eval]
    stats = evaluate(stacks, x_eval, cfg.batch_size)

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
            "l1_norm": cfg.l1_norm,
            "tied": cfg.tied,
        }
        save_saes(stacks, stats, out_dir / "saes", meta)
    results = {"config": asdict(cfg), "runs": runs}
    write_json(out_dir / "results.json", results)
    plot_results(cfg, runs, out_dir)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)  # the SAEs are saved; the optimizer state is not needed
    return results


def plot_results(cfg: ToyRunConfig, runs: list[dict[str, Any]], out_dir: Path) -> None:
    """Writes the four heatmaps of the report (rows: l1 or k, columns: dictionary ratio)."""
    truth = f"; true features at ratio {cfg.n_ground_truth / cfg.activation_dim:g}"
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
