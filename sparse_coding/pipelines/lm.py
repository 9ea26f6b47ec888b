"""Real-model sweeps: text → tokens → activations at a hook (cached on disk, resumable) → a lockstep sweep of
SAEs over them → metrics on held-out activations, including CE loss recovered and KL through the model.

`run_lm` reads as the table of contents: load the model, make sure the activations are stored, claim the
checkpoint, build the stacks and the trainer, then train and report (`mini_runs` times)."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from sparse_coding.activations.batches import ChunkSource
from sparse_coding.activations.caching import (
    DEFAULT_DATASET,
    DEFAULT_MODEL,
    CacheConfig,
    activations_folder,
    hook_width,
    prepare_activations,
)
from sparse_coding.activations.store import ActivationDataset
from sparse_coding.config import option
from sparse_coding.errors import CheckpointError, ConfigError, UserError
from sparse_coding.eval.core import core_metrics, weight_metrics
from sparse_coding.eval.plots import density_histograms
from sparse_coding.eval.reconstruction import ce_and_kl, evaluate
from sparse_coding.eval.report import plot_grid, save_saes, sweep_rows
from sparse_coding.files import load_tensors, write_json
from sparse_coding.models.language_model import LanguageModel, load_language_model
from sparse_coding.saes import SAE
from sparse_coding.saes.saelens import load_sae
from sparse_coding.training.checkpoint import check_resumable, config_fingerprint
from sparse_coding.training.config import SMOKE_SWEEP, SweepConfig
from sparse_coding.training.distributed import (
    PARALLEL_MODES,
    DistInfo,
    RankSlice,
    average_tensors,
    barrier,
    gather_json,
    init_distributed,
    my_models,
    shutdown,
    slice_stack,
)
from sparse_coding.training.log import LOG_FILE, TrainLog
from sparse_coding.training.memory import check_sweep_fits
from sparse_coding.training.trainer import Trainer, build_stacks, train
from utils import resolve_device


@dataclass
class RunConfig(SweepConfig, CacheConfig):
    preset: str = option("default", "the preset this config started from")
    out: str = option("", "run folder; empty: outputs/<timestamp>_lm_<preset>/")
    n_eval_chunks: int = option(1, "the last chunks are held out for evaluation, never trained on", gt=0)
    mix_chunks: int = option(2, "chunks pooled and shuffled together for training batches", gt=0)
    mini_runs: int = option(1, "training passes, each followed by metrics and plots", gt=0)
    load_autoencoders: str = option("", "a run folder (or its saes/) to continue from, matched by size and knob")
    ce_eval_rows: int = option(32, "held-out context rows for CE loss recovered and KL (0: skip)", ge=0)
    mmcs_threshold: float = option(
        0.9, "share of features whose best match in the next larger dictionary exceeds this", gt=0, lt=1
    )
    use_wandb: bool = option(False, "log to wandb (key from WANDB_API_KEY or `wandb login`; WANDB_MODE=offline works)")
    parallel: str = option(
        "models",
        "under torchrun: 'models' splits the sweep's SAEs over ranks, 'data' splits every batch",
        choices=PARALLEL_MODES,
    )
    wandb_project: str = option("sparse_coding", "wandb project name")
    # The sweep, sized for the offline default on 2 cores (minutes): l1 = 10^(e/4), e in -2..1, which spans
    # L0 ≈ 2..60 on the tiny model's MLP neurons; dictionaries 1×, 2×, 4× the activation width. On a GPU and a
    # real model widen both (e.g. --l1_exp_low -8 --l1_exp_high 4 --dict_ratio_exp_high 5 --n_steps 20000).
    l1_exp_low: int = option(-2, "l1 grid: l1_alpha = l1_exp_base ** e for e from l1_exp_low ...")
    l1_exp_high: int = option(1, "... to l1_exp_high (inclusive); used by l1-penalty architectures such as relu")
    dict_ratio_exp_low: int = option(0, "dictionary sizes: d_sae = round(d_in * dict_ratio_exp_base ** e) ...")
    dict_ratio_exp_high: int = option(2, "... for e from dict_ratio_exp_low to dict_ratio_exp_high (inclusive)")
    k_values: list[int] = option([8, 16, 32], "k grid: one SAE per k, for TopK-style architectures", gt=0)
    n_steps: int = option(600, "training steps", gt=0)
    batch_size: int = option(512, "activations per training step", gt=0)
    checkpoint_every: int = option(100, "steps between checkpoints (0: none)", ge=0)
    dead_tokens_threshold: int = option(200_000, "topk: a latent silent this many tokens counts as dead", gt=0)

    def check(self) -> None:
        super().check()
        if self.n_eval_chunks >= self.n_chunks:
            raise ConfigError("n_eval_chunks must leave at least one chunk for training")
        n_train = self.n_chunks - self.n_eval_chunks
        smallest_group = (n_train % self.mix_chunks or min(self.mix_chunks, n_train)) * self.chunk_size_tokens
        if self.batch_size > smallest_group:
            raise ConfigError(
                f"batch_size {self.batch_size} exceeds the {smallest_group} tokens of the smallest chunk group "
                "(raise chunk_size_tokens or mix_chunks, or lower batch_size)"
            )


def default() -> RunConfig:
    """The offline embedded default: our tiny model on the offline corpus, minutes on 2 cores."""
    return RunConfig()


def smoke() -> RunConfig:
    """Seconds, for tests (expects --model_name and --dataset_name pointing at small local things)."""
    return RunConfig(
        **SMOKE_SWEEP,
        preset="smoke",
        max_length=16,
        n_chunks=3,
        chunk_size_tokens=512,
        model_batch_size=8,
        dict_ratio_exp_high=1,
        n_steps=40,
        batch_size=128,
        checkpoint_every=10,
        log_every=10,
        ce_eval_rows=8,
        dead_tokens_threshold=2000,
    )


PRESETS = {"default": default, "smoke": smoke}


@dataclass
class Run:
    """What every stage of one run needs to know."""

    cfg: RunConfig
    out_dir: Path
    device: torch.device
    info: DistInfo
    progress: bool

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoint" / (f"rank{self.info.rank}" if self.info.active else "")


def run_lm(cfg: RunConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Caches activations (or reuses them), trains the sweep with resume, evaluates and writes the run folder.
    Under torchrun every rank calls this; see training/distributed.py for how the work is split."""
    if (out_dir / "results.json").exists() and not (out_dir / "checkpoint").exists():
        raise CheckpointError(f"{out_dir} already holds a finished run (results.json); choose another --out")
    for given, default in ((cfg.model_name, DEFAULT_MODEL), (cfg.dataset_name, DEFAULT_DATASET)):
        if given == default and not Path(default).exists():
            raise UserError(f"the offline default {default} is missing; `make tiny` prepares the corpus and model")
    info, device = init_distributed(resolve_device(cfg.device))
    run = Run(cfg, out_dir, device, info, progress and info.is_main)
    try:
        lm, hook = load_model(run)
        d = hook_width(lm, hook)
        cfg.check_sizes(d)
        if info.is_main:
            print(f"sweep on {hook}: {check_sweep_fits(cfg, d, device)}")
        data = ensure_activations(run, lm, hook)
        fingerprint = claim_checkpoint(run, data.d)
        stacks = make_stacks(run, data.d)
        trainer, source = make_trainer(run, stacks, data)
        return train_and_report(run, lm, hook, data, stacks, trainer, source, fingerprint)
    finally:
        shutdown(info)


def load_model(run: Run) -> tuple[LanguageModel, str]:
    """Gives the language model and the hook the sweep reads, checked against the context length asked for."""
    cfg = run.cfg
    lm = load_language_model(cfg.model_name, run.device)
    hook = cfg.hook_name or lm.hook_for(cfg.layer, cfg.layer_loc)
    lm.check_hook(hook)
    context = lm.context_length()
    if context is not None and cfg.max_length > context:
        raise ConfigError(f"max_length {cfg.max_length} is longer than {lm.name}'s context of {context} tokens")
    return lm, hook


def ensure_activations(run: Run, lm: LanguageModel, hook: str) -> ActivationDataset:
    """Gives the stored activations; one process computes them while the others wait for its word."""
    error = None
    if run.info.is_main:
        try:
            prepare_activations(run.cfg, lm, hook, run.progress)
        except UserError as e:
            error = str(e)
    errors = [e for e in gather_json(error, run.info, run.device) if e]
    if errors:
        raise UserError(errors[0])
    return ActivationDataset.open(activations_folder(run.cfg, lm, hook))


def claim_checkpoint(run: Run, d: int) -> str:
    """Refuses a checkpoint of other settings before anything is written; writes config.json; gives the
    fingerprint a resumed run must match."""
    fingerprint = config_fingerprint({**asdict(run.cfg), "d": d, "world": run.info.world})
    check_resumable(run.ckpt_dir, fingerprint)
    if run.info.is_main:
        write_json(run.out_dir / "config.json", asdict(run.cfg))
    return fingerprint


def make_stacks(run: Run, d: int) -> list[SAE]:
    """Gives this process's stacks: the whole sweep, or its share of the grid under --parallel models, loaded
    from saved SAEs when asked."""
    cfg, info = run.cfg, run.info
    stacks = build_stacks(cfg, d, run.device)
    if cfg.load_autoencoders:
        n = len(load_into_stacks(stacks, Path(cfg.load_autoencoders)))
        if info.is_main:
            print(f"continuing from {n} saved SAEs")
    if info.active and cfg.parallel == "models":
        if stacks[0].n_models < info.world:  # decided alike on every rank, so none is left waiting
            raise ConfigError(f"{info.world} processes but only {stacks[0].n_models} grid points; use --parallel data")
        stacks = [slice_stack(s, my_models(stacks[0].n_models, info)) for s in stacks]
    return stacks


def make_trainer(run: Run, stacks: list[SAE], data: ActivationDataset) -> tuple[Trainer, Any]:
    """Gives the trainer and its batch source (this rank's slice of each batch under --parallel data)."""
    cfg, info = run.cfg, run.info
    data_parallel = info.active and cfg.parallel == "data"
    if data_parallel and cfg.batch_size % info.world:
        raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly over {info.world} processes")
    sync = (lambda ts: average_tensors(ts, info)) if data_parallel else None
    trainer = Trainer(stacks, lr=cfg.lr, sync=sync, init_b_dec=not cfg.load_autoencoders)
    source: Any = ChunkSource(data, list(range(cfg.n_chunks - cfg.n_eval_chunks)), cfg.seed, run.device, cfg.mix_chunks)
    return trainer, RankSlice(source, info) if data_parallel else source


def load_into_stacks(stacks: list[SAE], folder: Path) -> list[str]:
    """Copies saved SAEs into the stacks' slots of the same architecture, size and knob; gives the names used."""
    folder = folder / "saes" if (folder / "saes").is_dir() else folder
    if not folder.is_dir():
        raise ConfigError(f"--load_autoencoders: {folder} not found")
    loaded = []
    for sub in sorted(p for p in folder.iterdir() if (p / "cfg.json").is_file()):
        sae, _ = load_sae(sub)
        for stack in stacks:
            if stack.architecture != sae.architecture or stack.d_sae != sae.d_sae or stack.d_in != sae.d_in:
                continue
            for m in range(stack.n_models):
                if same_hparams(stack.hparams(m), sae.hparams(0)):
                    stack.load_exported(m, sae.export(0))
                    loaded.append(sub.name)
    if not loaded:
        raise ConfigError(f"--load_autoencoders: no SAE in {folder} matches this sweep's architecture, sizes and knobs")
    return loaded


def same_hparams(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(float(a[k]), float(b[k]), rel_tol=1e-6) for k in a)


def train_and_report(
    run: Run,
    lm: LanguageModel,
    hook: str,
    data: ActivationDataset,
    stacks: list[SAE],
    trainer: Trainer,
    source: Any,
    fingerprint: str,
) -> dict[str, Any]:
    """Trains in `mini_runs` passes, each followed by metrics, saved SAEs and plots; gives the last results."""
    cfg, info = run.cfg, run.info
    eval_parts = [data.load_chunk(i) for i in range(cfg.n_chunks - cfg.n_eval_chunks, cfg.n_chunks)]
    all_tokens = torch.cat([t for _, t in eval_parts]).long()
    keep = ~torch.isin(all_tokens.flatten(), torch.tensor(lm.tokenizer.special_ids, dtype=torch.long))
    x_eval = torch.cat([a for a, _ in eval_parts])[keep].to(run.device)  # special tokens left out, as SAELens
    eval_tokens = all_tokens[: cfg.ce_eval_rows]
    wandb_run = start_wandb(cfg, run.out_dir) if info.is_main else None
    log = TrainLog(run.out_dir / LOG_FILE if info.is_main else None, stacks, wandb_run)
    results: dict[str, Any] = {}
    for n in range(1, cfg.mini_runs + 1):
        steps = cfg.n_steps * n // cfg.mini_runs
        train(trainer, source, replace(cfg, n_steps=steps), run.ckpt_dir, fingerprint, log, run.progress)
        if trainer.step_count > steps:  # resumed past this pass: its weights are gone, report at a later pass
            continue
        sharded = info.active and cfg.parallel == "models"
        rows = (
            evaluate_and_save(run, lm, hook, data, stacks, x_eval, eval_tokens, steps)
            if info.is_main or sharded
            else []
        )
        all_rows = [r for part in gather_json(rows, info, run.device) for r in part]  # data parallel: rank 0's
        if info.is_main:
            results = write_report(cfg, hook, data, all_rows, run.out_dir, steps)
            if wandb_run is not None:
                wandb_run.log(
                    {
                        f"eval/{r['name']}/{k}": v
                        for r in results["runs"]
                        for k, v in r.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                    },
                    step=steps,
                )
            print(f"pass {n}/{cfg.mini_runs}: step {steps}, results in {run.out_dir / 'results.json'}")
    if wandb_run is not None:
        wandb_run.finish()
    barrier(info)
    if info.is_main:
        shutil.rmtree(run.out_dir / "checkpoint", ignore_errors=True)
    return results


def evaluate_and_save(
    run: Run,
    lm: LanguageModel,
    hook: str,
    data: ActivationDataset,
    stacks: list[SAE],
    x_eval: Tensor,
    eval_tokens: Tensor,
    steps: int,
) -> list[dict[str, Any]]:
    """Evaluates this process's SAEs, saves them, and gives their results rows."""
    cfg = run.cfg
    stats = evaluate(stacks, x_eval, cfg.batch_size)
    special = lm.tokenizer.special_ids
    through_model: list[dict[str, Tensor] | None] = [None] * len(stacks)
    if lm.has_lm_head and cfg.ce_eval_rows > 0:
        through_model = [
            ce_and_kl(lm, hook, s, eval_tokens, special) for s in tqdm(stacks, desc="CE/KL", disable=not run.progress)
        ]

    def model_metrics(i: int, m: int) -> dict[str, Any]:
        t = through_model[i]
        names = {
            "ce_loss_recovered": "ce_loss_recovered",
            "kl": "kl",
            "ce_loss_clean": "ce_clean",
            "ce_loss_zero_ablation": "ce_zero",
            "ce_loss_spliced": "ce_sae",
        }
        legacy = {key: None if t is None else float(t[name][m]) for key, name in names.items()}
        tokens = (eval_tokens.numel(), cfg.n_eval_chunks * cfg.chunk_size_tokens)  # special tokens included
        core = core_metrics(stats[i], m, weight_metrics(stacks[i], m), t, tokens)
        return {**legacy, "core": core}

    rows = sweep_rows(stacks, stats, cfg.dict_ratios(), cfg.mmcs_threshold, model_metrics, run.progress)
    meta = {
        "model_name": lm.name,
        "hook_name": hook,
        "context_size": cfg.max_length,
        "dataset_path": cfg.dataset_name,
        "activations_dir": str(data.folder),
        "seed": cfg.seed,
        "lr": cfg.lr,
        "n_steps": steps,
        "batch_size": cfg.batch_size,
    }
    save_saes(stacks, stats, run.out_dir / "saes", meta)
    return rows


def write_report(
    cfg: RunConfig, hook: str, data: ActivationDataset, rows: list[dict[str, Any]], out_dir: Path, steps: int
) -> dict[str, Any]:
    """Writes results.json (rows in grid order, whichever process trained them) and the plots; gives the results."""
    grid = cfg.hparam_grid()
    runs = sorted(
        rows,
        key=lambda r: (next(i for i, h in enumerate(grid) if same_hparams(h, {k: r[k] for k in h})), r["dict_size"]),
    )
    results = {
        "config": asdict(cfg),
        "steps_trained": steps,
        "hook_name": hook,
        "d_in": data.d,
        "activations_dir": str(data.folder),
        "runs": runs,
    }
    write_json(out_dir / "results.json", results)
    plot_grid(runs, "mmcs_with_larger", "MMCS with next larger dictionary", out_dir / "mmcs_with_larger_matrix.png")
    plot_grid(
        runs,
        "dead_features",
        "dead features (never fired on held-out)",
        out_dir / "dead_features_matrix.png",
        fmt="{:.0f}",
    )
    plot_grid(runs, "fvu", "fraction of variance unexplained", out_dir / "fvu_matrix.png", fmt="{:.3f}")
    plot_grid(runs, "l0", "L0 (active features per token)", out_dir / "l0_matrix.png", fmt="{:.1f}")
    if runs[0]["ce_loss_recovered"] is not None:
        plot_grid(runs, "ce_loss_recovered", "CE loss recovered", out_dir / "ce_loss_recovered_matrix.png")
    for size in sorted({r["dict_size"] for r in runs}):  # densities from the saved SAEs, whoever trained them
        densities = {
            r["name"]: 10 ** load_tensors(out_dir / "saes" / r["name"] / "sparsity.safetensors")["sparsity"].double()
            for r in runs
            if r["dict_size"] == size
        }
        density_histograms(densities, f"feature density, d_sae={size}", out_dir / f"feature_density_d{size}.png")
    return results


def start_wandb(cfg: RunConfig, out_dir: Path) -> Any:
    if not cfg.use_wandb:
        return None
    import wandb

    return wandb.init(project=cfg.wandb_project, config=asdict(cfg), dir=str(out_dir), name=out_dir.name)
