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
from tqdm import tqdm

from sparse_coding import metrics
from sparse_coding.io import save_sae, save_tensors, write_json
from sparse_coding.plots import heatmap
from sparse_coding.saes import SAE
from sparse_coding.toy import ToyDataConfig, ToyGenerator, check_toy_config
from sparse_coding.train import (
    RESUMABLE_CHANGES,
    CheckpointMismatch,
    SweepConfig,
    Trainer,
    build_stacks,
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


@torch.no_grad()
def evaluate(stacks: list[SAE], x_eval: Tensor, batch_size: int) -> list[metrics.ReconstructionStats]:
    """Gives reconstruction statistics of every stack on the held-out set."""
    meters = [metrics.ReconstructionMeter() for _ in stacks]
    for xb in x_eval.split(batch_size):
        for sae, meter in zip(stacks, meters, strict=True):
            codes = sae.encode(xb)
            meter.update(xb, sae.decode(codes), codes)
    return [m.result() for m in meters]


def sae_name(sae: SAE, m: int) -> str:
    knob = sae.hparams(m)
    tag = f"k{knob['k']}" if "k" in knob else f"l1_{knob['l1_alpha']:.4g}"
    return f"{sae.architecture}_d{sae.d_sae}_{tag}"


def run_toy(cfg: ToyRunConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Trains the sweep (resuming a killed run in out_dir), evaluates it and writes everything there."""
    check_config(cfg)
    if (out_dir / "results.json").exists():
        raise UserError(f"{out_dir} already holds a finished run (results.json); choose another --out")
    device = resolve_device(cfg.device)
    data_cfg = ToyDataConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ToyDataConfig)})
    gen = ToyGenerator(data_cfg, seed=cfg.seed, device=device)
    write_json(out_dir / "config.json", asdict(cfg))
    save_tensors(out_dir / "ground_truth.safetensors", {"features": gen.features, "probs": gen.probs})

    stacks = build_stacks(cfg, cfg.activation_dim, device)
    trainer = Trainer(stacks, lr=cfg.lr)
    fingerprint = config_fingerprint(asdict(cfg), RESUMABLE_CHANGES)
    try:
        train(trainer, ToySource(gen), cfg, out_dir / "checkpoint", fingerprint, progress=progress)
    except CheckpointMismatch as e:
        raise UserError(str(e)) from e

    eval_gen = ToyGenerator(data_cfg, seed=cfg.seed, device=device, sample_seed=cfg.seed + 1_000_003)
    x_eval = torch.cat([eval_gen.sample(cfg.batch_size)[0] for _ in range(-(-cfg.n_eval // cfg.batch_size))])
    x_eval = x_eval[: cfg.n_eval]
    stats = evaluate(stacks, x_eval, cfg.batch_size)
    runs = collect_runs(cfg, stacks, stats, gen.features, out_dir, progress)
    results = {"config": asdict(cfg), "runs": runs}
    write_json(out_dir / "results.json", results)
    plot_results(cfg, runs, out_dir)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)  # the SAEs are saved; the optimizer state is not needed
    return results


def collect_runs(
    cfg: ToyRunConfig,
    stacks: list[SAE],
    stats: list[metrics.ReconstructionStats],
    truth: Tensor,
    out_dir: Path,
    progress: bool,
) -> list[dict[str, Any]]:
    """Gives one results row per grid point, saving each SAE on the way."""
    ratios = cfg.dict_ratios()
    runs = []
    pairs = [(i, m) for m in range(stacks[0].n_models) for i in range(len(stacks))]
    for i, m in tqdm(pairs, desc="metrics", disable=not progress):
        sae, st = stacks[i], stats[i]
        dec = sae.decoder()[m].detach()
        larger = None
        if i + 1 < len(stacks):
            larger = metrics.mmcs_with_larger(dec, stacks[i + 1].decoder()[m].detach(), cfg.mmcs_threshold)
        knob = sae.hparams(m)
        runs.append(
            {
                "arch": sae.architecture,
                "l1_alpha": knob.get("l1_alpha"),
                "k": knob.get("k"),
                "dict_ratio": ratios[i],
                "dict_size": sae.d_sae,
                "mmcs": float(metrics.mmcs(truth, dec)),
                "mmcs_share_above": float(metrics.share_above(truth, dec, cfg.mmcs_threshold)),
                "dead_features": int(st.dead_features[m]),
                "fvu": float(st.fvu[m]),
                "mse": float(st.mse[m]),
                "l0": float(st.l0[m]),
                "mmcs_with_larger": None if larger is None else larger["plain"],
                "mmcs_with_larger_hungarian": None if larger is None else larger["hungarian"],
                "mmcs_with_larger_share_above": None if larger is None else larger["share_above"],
            }
        )
        if cfg.save_saes:
            meta = {
                "model_name": "toy",
                "hook_name": "toy",
                "context_size": 1,
                "dataset_path": "toy",
                "dict_ratio": ratios[i],
                "seed": cfg.seed,
                "lr": cfg.lr,
                "n_steps": cfg.n_steps,
                "batch_size": cfg.batch_size,
                "l1_norm": cfg.l1_norm,
                "tied": cfg.tied,
            }
            save_sae(out_dir / "saes" / sae_name(sae, m), sae, m, meta, st.feature_density[m])
    return runs


def plot_results(cfg: ToyRunConfig, runs: list[dict[str, Any]], out_dir: Path) -> None:
    """Writes the four heatmaps of the report (rows: l1 or k, columns: dictionary ratio)."""
    knob = "k" if cfg.arch == "topk" else "l1_alpha"
    rows = sorted({r[knob] for r in runs})
    cols = sorted({r["dict_ratio"] for r in runs})
    cell = {(r[knob], r["dict_ratio"]): r for r in runs}

    def grid(key: str) -> list[list[float | None]]:
        return [[cell[(a, b)][key] for b in cols] for a in rows]

    row_labels = [f"{v:.3g}" for v in rows]
    col_labels = [f"{v:g}" for v in cols]
    truth = cfg.n_ground_truth / cfg.activation_dim
    for key, name, title, fmt in (
        ("mmcs", "mmcs_matrix.png", "MMCS with ground truth", "{:.2f}"),
        ("dead_features", "dead_features_matrix.png", "dead features (never fired on eval)", "{:.0f}"),
        ("fvu", "recon_loss_matrix.png", "reconstruction loss (FVU)", "{:.3f}"),
        ("mmcs_with_larger", "mmcs_with_larger_matrix.png", "MMCS with next larger dictionary", "{:.2f}"),
    ):
        heatmap(
            grid(key),
            row_labels,
            col_labels,
            f"{title}; true features at ratio {truth:g}",
            out_dir / name,
            row_name=knob,
            fmt=fmt,
        )
