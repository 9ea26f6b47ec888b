"""The toy-data replication: train an l1 (or k) × dictionary-size sweep on synthetic activations with known
ground truth, then measure how well each SAE recovers it and how well agreement with the next larger
dictionary predicts that without the ground truth. With several architectures (`--arch all` or a list) every one
trains in the same lockstep sweep on the same batches, and the run also writes the comparison table and figure
from its rows: the `hierarchy` preset asks which of them recover parents and children."""

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
from sparse_coding.errors import CheckpointError, ConfigError
from sparse_coding.eval.comparison import write_comparison
from sparse_coding.eval.plots import metrics_against_l0
from sparse_coding.eval.reconstruction import evaluate, layer_fields, truth_meters
from sparse_coding.eval.report import plot_grid, save_saes, sweep_rows
from sparse_coding.files import save_tensors, write_json
from sparse_coding.saes import SAE
from sparse_coding.saes.precision import Precision
from sparse_coding.training.checkpoint import check_resumable, check_world, checkpoint_dir, config_fingerprint
from sparse_coding.training.config import SMOKE_SWEEP, SweepConfig, torchrun_world
from sparse_coding.training.distributed import DistInfo, barrier, gather_stack, init_distributed, shutdown
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
    threads: int = option(
        0, "CPU threads torch may use (0: its default); 1 suits small problems, above all on a busy machine", ge=0
    )
    # The toy replication keeps the original research code's relu recipe (unit decoder rows, no resampling): its
    # dead-feature heatmap shows where surplus latents die, which resampling would hide.
    decoder_init_norm: float | None = option(
        0.0, "0: decoder rows kept at unit norm; > 0: rows start at this norm and train freely (SAELens' 0.1)", ge=0
    )
    resample_every: int | None = option(0, "relu: resample dead latents every this many steps (0: never)", ge=0)

    def check(self) -> None:
        super().check()
        classes = self.sae_classes()
        cross = [cls.cross_layer for cls in classes]
        if any(cross) != all(cross) or any(cross) != bool(self.n_layers):
            raise ConfigError(
                "cross-layer dictionaries (--arch clt, clt_batchtopk, clt_jumprelu, crosscoder) train on the "
                "cross-layer toy (--n_layers L) and only they do: give both, or neither"
            )
        if len({cls.layer_transcoder for cls in classes}) > 1:
            raise ConfigError("CLTs and crosscoders read different data: train them in separate runs")
        if self.n_layers:
            self.layer_inputs = classes[0].layer_transcoder  # a crosscoder reads the layers' outputs alone
        self.check_sizes(self.widths()[0])

    def widths(self) -> tuple[int, int | None]:
        """The SAEs' input width and a transcoder's output width (None: SAEs): every layer's, on the cross-layer toy."""
        if self.n_layers:
            return (
                self.n_layers * self.activation_dim,
                self.n_layers * self.activation_dim if self.layer_inputs else None,
            )
        return self.activation_dim, None

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


ARCHS_PLOT = "archs_vs_l0.png"


def hierarchy() -> ToyRunConfig:
    """Which architectures recover parents and children: 8 trees (a root, 2 children, 4 grandchildren; when a
    parent fires, one of its children fires 70 % of the time; a child's vector is half its parent's plus its own)
    beside 40 free features, 96 true features in all, in 48 dimensions; every registered architecture at the true
    dictionary size, three knob values each (L0 from about 2 to 6; 4 true features fire on average). Minutes on
    2 cores (one thread: at these sizes a second one only adds waiting)."""
    return ToyRunConfig(
        preset="hierarchy",
        arch="all",
        activation_dim=48,
        n_ground_truth=96,
        mean_active=4.0,
        hierarchy_roots=8,
        hierarchy_branching=2,
        hierarchy_depth=2,
        child_prob=0.7,
        child_mix=0.5,
        l1_exp_low=-2,
        l1_exp_high=0,
        k_values=[3, 4, 6],
        dict_ratio_exp_low=1,
        dict_ratio_exp_high=1,
        n_steps=2000,
        batch_size=1024,
        checkpoint_every=500,
        n_eval=20_000,
        threads=1,
    )


def clt() -> ToyRunConfig:
    """The cross-layer toy: 3 layers of 32 dimensions, 192 true features (64 read in each layer, 2× superposition)
    writing into their own layer and, each with probability 1/2, into every later one; a TopK CLT with 64 latents per
    layer (the true count), k per layer swept around the 2 features that fire per layer on average. About a minute
    on 2 cores. --arch clt_batchtopk or clt_jumprelu trains the other activations on the same problem."""
    return dataclasses.replace(
        cpu(),
        preset="clt",
        arch="clt",
        n_layers=3,
        activation_dim=32,
        n_ground_truth=192,
        mean_active=6.0,
        k_values=[2, 3, 4],
        l1_exp_low=-3,
        l1_exp_high=-1,
        dict_ratio_exp_low=1,
        dict_ratio_exp_high=1,
        n_steps=2000,
        dead_tokens_threshold=200_000,
        threads=1,
    )


PRESETS = {"paper": paper, "cpu": cpu, "archs": archs, "smoke": smoke, "hierarchy": hierarchy, "clt": clt}


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
    """Trains the sweep (resuming a killed run in out_dir), evaluates it and writes everything there. Under torchrun
    with --parallel latents every SAE's latents are split over the processes; rank 0 writes the run folder (the
    others give {})."""
    if (out_dir / "results.json").exists():
        raise CheckpointError(f"{out_dir} already holds a finished run (results.json); choose another --out")
    if torchrun_world() is not None and cfg.parallel != "latents":
        raise ConfigError("replicate_toy_models.py under torchrun splits each SAE's latents: add --parallel latents")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info, device = init_distributed(resolve_device(cfg.device))
    try:
        return train_and_score(cfg, out_dir, info, device, progress and info.is_main)
    finally:
        shutdown(info)


def train_and_score(
    cfg: ToyRunConfig, out_dir: Path, info: DistInfo, device: torch.device, progress: bool
) -> dict[str, Any]:
    """run_toy's work in one process, or in each of several sharing every SAE's latents."""
    shards = info.world if cfg.parallel == "latents" else 1
    if info.is_main:
        print(f"sweep: {check_sweep_fits(cfg, cfg.widths()[0], device, shards, cfg.widths()[1])}")
        print(Precision(cfg.train_dtype).describe(device))
    gen = ToyGenerator(cfg.data_config(), seed=cfg.seed, device=device)
    fingerprint = config_fingerprint({**asdict(cfg), "world": info.world})
    check_world(out_dir / "checkpoint", info.world)
    ckpt_dir = checkpoint_dir(out_dir / "checkpoint", info.rank, info.world)
    check_resumable(ckpt_dir, fingerprint)
    if info.is_main:
        write_json(out_dir / "config.json", asdict(cfg))
        truth = {"features": gen.features, "probs": gen.probs, "parent": gen.parent, "depth": gen.depth}
        save_tensors(out_dir / "ground_truth.safetensors", truth)

    d_in, d_out = cfg.widths()
    stacks = build_stacks(cfg, d_in, device, d_out, info=info)
    log = TrainLog(out_dir / LOG_FILE if info.is_main else None, stacks)
    trainer = Trainer(stacks, lr=cfg.lr, schedule=Schedule.from_config(cfg), grad_clip=cfg.grad_clip)
    train(trainer, ToySource(gen), cfg, ckpt_dir, fingerprint, log, progress)
    whole = [gather_stack(s) for s in trainer.export_stacks()]  # the stacks themselves in one process
    results: dict[str, Any] = {}
    if info.is_main:
        runs = score_against_truth(cfg, gen, [s for s in whole if s is not None], out_dir, progress)
        results = {"config": asdict(cfg), "runs": runs}
        write_json(out_dir / "results.json", results)
        plot_results(cfg, runs, out_dir)
    barrier(info)
    if info.is_main:  # the SAEs are saved; the optimizer state is not needed
        shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    return results


def toy_eval_set(
    config: dict[str, Any], device: torch.device | str, n_eval: int = 0
) -> tuple[ToyGenerator, Tensor, Tensor]:
    """The held-out evaluation set of a toy run with this config (config.json's fields): its generator, and
    n_eval (default: the run's) examples (activations [n_eval, d], true codes [n_eval, n]) from a stream
    training never sees, drawn in the run's batches so the same settings give the same examples."""
    n_eval, batch_size = n_eval or int(config["n_eval"]), int(config["batch_size"])
    data_cfg = ToyDataConfig(**{f.name: config[f.name] for f in dataclasses.fields(ToyDataConfig) if f.name in config})
    seed = int(config.get("seed", 0))
    gen = ToyGenerator(data_cfg, seed=seed, device=device, sample_seed=seed + 1_000_003)
    batches = [gen.sample(batch_size) for _ in range(-(-n_eval // batch_size))]
    x_eval, true_eval = (torch.cat(parts)[:n_eval] for parts in zip(*batches, strict=True))
    return gen, x_eval, true_eval


def score_against_truth(
    cfg: ToyRunConfig, gen: ToyGenerator, stacks: list[SAE], out_dir: Path, progress: bool
) -> list[dict[str, Any]]:
    """Evaluates every SAE on fresh held-out examples and against the true features and activations (see
    eval/synthetic.py); saves the SAEs; gives the result rows."""
    _, x_eval, true_eval = toy_eval_set(asdict(cfg), gen.device)
    stats = evaluate(stacks, x_eval, cfg.batch_size)
    meters = truth_meters(stacks, gen.features, gen.parent, x_eval, true_eval, cfg.batch_size)

    by_layer = layer_fields(stacks, x_eval, cfg.batch_size)

    def truth_metrics(i: int, m: int) -> dict[str, Any]:
        return {**meters[i].result(m, gen.depth, cfg.mmcs_threshold), **by_layer(i, m)}

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
    of several architectures, one figure of MMCS, FVU and dead latents against L0 and the comparison table and
    absorption figure (eval/comparison.py) instead."""
    truth = f"; true features at ratio {cfg.n_ground_truth / cfg.widths()[0]:g}"
    if len(cfg.arch_names()) > 1:
        keys = [("mmcs", "MMCS with ground truth"), ("fvu", "FVU"), ("dead_features", "dead latents")]
        metrics_against_l0(runs, keys, "arch", "architectures" + truth, out_dir / ARCHS_PLOT)
        write_comparison(runs, out_dir)
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
