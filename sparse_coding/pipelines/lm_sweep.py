"""One sweep of run.py: a lockstep sweep of SAEs (or transcoders) over one activation store → metrics on
held-out activations (and through the model, when it has a trained LM head) → a results folder.

`run_sweep` reads as the table of contents: build the stacks and the trainer, then train and report
(`mini_runs` times). run.py calls it once per hook (lm.py)."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from sparse_coding.activations.batches import StoredActivations
from sparse_coding.activations.caching import Target
from sparse_coding.activations.streaming import StreamedActivations
from sparse_coding.errors import ConfigError
from sparse_coding.eval.core import core_metrics, weight_metrics
from sparse_coding.eval.heads import head_shares, head_summary
from sparse_coding.eval.model_diff import diff_summary, plot_relative_norms, relative_norms
from sparse_coding.eval.plots import density_histograms
from sparse_coding.eval.reconstruction import ce_and_kl, evaluate, layer_fields
from sparse_coding.eval.report import plot_grid, save_saes, sweep_rows
from sparse_coding.files import load_tensors, read_json, save_tensors, write_json
from sparse_coding.models.language_model import LanguageModel
from sparse_coding.models.paired import SIDES, PairedModel
from sparse_coding.saes import SAE
from sparse_coding.saes.saelens import DIFF_FILE, HEADS_FILE, load_sae
from sparse_coding.saes.sources import resolve_sae_source
from sparse_coding.training.checkpoint import check_resumable, check_world, checkpoint_dir, config_fingerprint
from sparse_coding.training.distributed import (
    DistInfo,
    RankSlice,
    average_tensors,
    barrier,
    gather_json,
    gather_stack,
    my_models,
    slice_stack,
)
from sparse_coding.training.log import LOG_FILE, TrainLog
from sparse_coding.training.schedule import Schedule
from sparse_coding.training.trainer import Trainer, build_stacks, train

RESULTS = "results.json"


@dataclass
class Run:
    """What every stage of one sweep needs to know (cfg is run.py's RunConfig)."""

    cfg: Any
    out_dir: Path
    device: torch.device
    info: DistInfo
    progress: bool

    @property
    def ckpt_dir(self) -> Path:
        return checkpoint_dir(self.out_dir / "checkpoint", self.info.rank, self.info.world)

    def finished(self) -> bool:
        return (self.out_dir / RESULTS).exists() and not (self.out_dir / "checkpoint").exists()


@dataclass
class Sweep:
    """One sweep's inputs: the model (None for your own activation files), what it trains on, and its activations:
    a store's chunks (--n_chunks of a store we cached; all of a folder of your own files) or computed as training
    goes (--activations stream)."""

    lm: LanguageModel | None
    target: Target
    data: StoredActivations | StreamedActivations


def fingerprint(run: Run, sweep: Sweep) -> str:
    """The settings a resumed sweep must match; refuses a checkpoint of other settings before anything is
    written."""
    data, world = sweep.data, run.info.world
    fp = config_fingerprint(
        {**asdict(run.cfg), "d": data.d, "d_out": data.d_out, "hook": sweep.target.name, "world": world}
    )
    check_world(run.out_dir / "checkpoint", world)
    check_resumable(run.ckpt_dir, fp)
    return fp


def run_sweep(run: Run, sweep: Sweep, fp: str) -> dict[str, Any]:
    """Trains the sweep with resume, evaluates and writes its results folder; gives the results (an earlier
    run's, if this sweep finished before a kill that hit a later one)."""
    if run.finished():
        return read_json(run.out_dir / RESULTS)
    run.out_dir.mkdir(parents=True, exist_ok=True)  # a hook's own folder in a run over several
    stacks = make_stacks(run, sweep.data)
    trainer, source = make_trainer(run, stacks, sweep)
    return train_and_report(run, sweep, stacks, trainer, source, fp)


def make_stacks(run: Run, data: StoredActivations | StreamedActivations) -> list[SAE]:
    """Gives this process's stacks: the whole sweep, or its share of the grid under --parallel models, loaded
    from saved SAEs when asked."""
    cfg, info = run.cfg, run.info
    stacks = build_stacks(cfg, data.d, run.device, data.d_out, cfg.skip_connection, info)
    if cfg.load_autoencoders:
        n = len(load_into_stacks(stacks, cfg.load_autoencoders))
        if info.is_main:
            print(f"continuing from {n} saved SAEs")
    if info.active and cfg.parallel == "models":
        if stacks[0].n_models < info.world:  # decided alike on every rank, so none is left waiting
            raise ConfigError(f"{info.world} processes but only {stacks[0].n_models} grid points; use --parallel data")
        stacks = [slice_stack(s, my_models(stacks[0].n_models, info)) for s in stacks]
    return stacks


def make_trainer(run: Run, stacks: list[SAE], sweep: Sweep) -> tuple[Trainer, Any]:
    """Gives the trainer and its batch source (this rank's slice of each batch under --parallel data)."""
    cfg, info = run.cfg, run.info
    data_parallel = info.active and cfg.parallel == "data"
    if data_parallel and cfg.batch_size % info.world:
        raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly over {info.world} processes")
    if data_parallel and cfg.resample_every:
        raise ConfigError("--resample_every needs --parallel models (each rank would resample from its own inputs)")
    sync = (lambda ts: average_tensors(ts, info)) if data_parallel else None
    schedule = Schedule.from_config(cfg)
    trainer = Trainer(
        stacks, lr=cfg.lr, sync=sync, init_b_dec=not cfg.load_autoencoders, schedule=schedule, grad_clip=cfg.grad_clip
    )
    source: Any = sweep.data.batches(cfg.seed, run.device, cfg.mix_chunks)
    return trainer, RankSlice(source, info) if data_parallel else source


def load_into_stacks(stacks: list[SAE], source: str) -> list[str]:
    """Copies saved SAEs (a run folder, a folder of SAE folders, one SAE folder, hf:org/repo[/folder] or a SAELens
    pretrained release/id: saes/sources.py) into the stacks' slots of the same architecture, shape and knob; gives
    the names used."""
    folder = resolve_sae_source(source)
    folder = folder / "saes" if (folder / "saes").is_dir() else folder
    if not folder.is_dir():
        raise ConfigError(f"--load_autoencoders: {folder} not found")
    loaded = []
    subs = (
        [folder]
        if (folder / "cfg.json").is_file()
        else sorted(p for p in folder.iterdir() if (p / "cfg.json").is_file())
    )
    for sub in subs:
        sae, _ = load_sae(sub)
        for stack in stacks:
            shape = (stack.architecture, stack.d_in, stack.d_sae, stack.d_out, stack.transcoder, stack.skip)
            if shape != (sae.architecture, sae.d_in, sae.d_sae, sae.d_out, sae.transcoder, sae.skip):
                continue
            for m in range(stack.n_models):
                if same_hparams(stack.hparams(m), sae.hparams(0)):
                    stack.load_exported(m, stack.shard_of(sae.export(0)))
                    loaded.append(sub.name)
    if not loaded:
        raise ConfigError(f"--load_autoencoders: no SAE in {folder} matches this sweep's architecture, sizes and knobs")
    return loaded


def same_hparams(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(float(a[k]), float(b[k]), rel_tol=1e-6) for k in a)


def held_out(run: Run, sweep: Sweep) -> tuple[Tensor, Tensor | None, int]:
    """Gives the held-out rows (as the trainer takes them), where the model can score them the first
    --ce_eval_rows of their token rows, and the token positions they span."""
    cfg = run.cfg
    held = sweep.data.held_out(run.device)
    scored = sweep.lm is not None and sweep.lm.head is not None and cfg.ce_eval_rows > 0 and held.tokens is not None
    return held.x, held.tokens[: cfg.ce_eval_rows] if scored else None, held.positions  # type: ignore[index]


def train_and_report(
    run: Run, sweep: Sweep, stacks: list[SAE], trainer: Trainer, source: Any, fp: str
) -> dict[str, Any]:
    """Trains in `mini_runs` passes, each followed by metrics, saved SAEs and plots; gives the last results."""
    cfg, info = run.cfg, run.info
    x_eval, eval_tokens, positions = held_out(run, sweep)
    wandb_run = start_wandb(cfg, run.out_dir) if info.is_main else None
    log = TrainLog(run.out_dir / LOG_FILE if info.is_main else None, stacks, wandb_run)
    results: dict[str, Any] = {}
    for n in range(1, cfg.mini_runs + 1):
        steps = cfg.n_steps * n // cfg.mini_runs
        train(trainer, source, replace(cfg, n_steps=steps), run.ckpt_dir, fp, log, run.progress)
        if trainer.step_count > steps:  # resumed past this pass: its weights are gone, report at a later pass
            continue
        stacks_now = trainer.export_stacks()
        if info.active and cfg.parallel == "latents":  # each stack put back together on rank 0 (None elsewhere)
            stacks_now = [gather_stack(s) for s in stacks_now]
        split_models = info.active and cfg.parallel == "models"
        rows = (
            evaluate_and_save(run, sweep, stacks_now, x_eval, eval_tokens, positions, steps)
            if info.is_main or split_models
            else []
        )
        all_rows = [r for part in gather_json(rows, info, run.device) for r in part]  # data parallel: rank 0's
        if info.is_main:
            results = write_report(run, sweep, all_rows, steps)
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
            print(f"pass {n}/{cfg.mini_runs}: step {steps}, results in {run.out_dir / RESULTS}")
    if wandb_run is not None:
        wandb_run.finish()
    barrier(info)
    if info.is_main:
        shutil.rmtree(run.out_dir / "checkpoint", ignore_errors=True)
    return results


CE_FIELDS = {  # results-row key → ce_and_kl key
    "ce_loss_recovered": "ce_loss_recovered",
    "kl": "kl",
    "ce_loss_clean": "ce_clean",
    "ce_loss_zero_ablation": "ce_zero",
    "ce_loss_spliced": "ce_sae",
}


def evaluate_and_save(
    run: Run,
    sweep: Sweep,
    stacks: list[SAE],
    x_eval: Tensor,
    eval_tokens: Tensor | None,
    positions: int,
    steps: int,
) -> list[dict[str, Any]]:
    """Evaluates this process's SAEs, saves them, and gives their results rows."""
    cfg, lm, target, data = run.cfg, sweep.lm, sweep.target, sweep.data
    stats = evaluate(stacks, x_eval, cfg.batch_size)
    through_model: list[dict[str, Tensor] | None] = [None] * len(stacks)
    if lm is not None and eval_tokens is not None:
        excluded = data.manifest.get("excluded_tokens", [])
        source = target.hook if target.target_hook else None
        through_model = [
            ce_and_kl(lm, target.name, s, eval_tokens, excluded, source)
            for s in tqdm(stacks, desc="CE/KL", disable=not run.progress)
        ]

    ce_tokens = eval_tokens.numel() if eval_tokens is not None else 0
    by_layer = layer_fields(stacks, x_eval, cfg.batch_size)
    readouts = DecoderReadouts(stacks, target, isinstance(lm, PairedModel))

    def model_metrics(i: int, m: int) -> dict[str, Any]:
        t = through_model[i]
        core = core_metrics(stats[i], m, weight_metrics(stacks[i], m), t, (ce_tokens, positions))
        ce = {key: None if t is None else float(t[name][m]) for key, name in CE_FIELDS.items()}
        layers = by_layer(i, m)
        if readouts.paired:  # the crosscoder's blocks are the two models, not layers; each model's own CE and KL
            layers = {"fvu_by_model": layers["fvu_by_layer"]}
            if t is not None:  # (the fields above: their means)
                ce |= {
                    f"{key}_by_model": [float(t[f"{name}_{s}"][m]) for s in SIDES] for key, name in CE_FIELDS.items()
                }
        return {**ce, **layers, **readouts.fields(i, m), "core": core}

    rows = sweep_rows(stacks, stats, cfg.dict_ratios(), cfg.mmcs_threshold, model_metrics, run.progress)
    meta = {
        **(lm.names() if lm is not None else {"model_name": data.manifest.get("model")}),
        "hook_name": target.hook or None,
        **({"hook_name_out": target.target_hook} if target.target_hook else {}),
        **({"layers": list(target.layers)} if target.layers else {}),
        **({"n_heads": target.heads} if target.heads else {}),
        "context_size": data.manifest.get("context_length"),
        "dataset_path": data.manifest.get("dataset"),
        "activations_dir": str(data.folder) if data.folder is not None else None,  # None: streamed, nothing stored
        "seed": cfg.seed,
        "lr": cfg.lr,
        "n_steps": steps,
        "batch_size": cfg.batch_size,
    }
    save_saes(stacks, stats, run.out_dir / "saes", meta)
    readouts.save(run.out_dir, (Path(cfg.model_name).name, Path(cfg.diff_model).name))
    return rows


class DecoderReadouts:
    """What a sweep's decoders say beyond reconstruction, per SAE: at an attn_z hook each latent's share per head
    (eval/heads.py), for a model-diffing crosscoder each latent's relative decoder norm (eval/model_diff.py). Gives
    their results-row fields and keeps the per-latent values beside each SAE's weights."""

    def __init__(self, stacks: list[SAE], target: Target, paired: bool):
        self.stacks, self.heads, self.paired = stacks, target.heads, paired
        blocks = len(target.layers) or 1  # a crosscoder over several attn_z hooks: heads of every layer
        self.shares = [
            [head_shares(s.decoder()[m], self.heads, blocks) for m in range(s.n_models)] for s in stacks if self.heads
        ]
        self.diffs = [[relative_norms(s.decoder()[m]) for m in range(s.n_models)] for s in stacks if paired]

    def fields(self, i: int, m: int) -> dict[str, Any]:
        out = {"n_heads": self.heads, **head_summary(self.shares[i][m])} if self.heads else {}
        return out | (diff_summary(*self.diffs[i][m]) if self.paired else {})

    def save(self, out_dir: Path, model_names: tuple[str, str]) -> None:
        """Writes each SAE's per-latent values into its folder under out_dir/saes (and, for model diffing, the
        relative-norm histograms into out_dir/model_diff)."""
        for i, s in enumerate(self.stacks):
            for m in range(s.n_models):
                folder = out_dir / "saes" / s.name(m)
                if self.heads:
                    save_tensors(folder / HEADS_FILE, {"head_share": self.shares[i][m]})
                if self.paired:
                    r, cos = self.diffs[i][m]
                    save_tensors(folder / DIFF_FILE, {"relative_norm": r, "decoder_cosine": cos})
                    (out_dir / "model_diff").mkdir(exist_ok=True)
                    plot_relative_norms(r, model_names, s.name(m), out_dir / "model_diff" / f"{s.name(m)}.png")


def write_report(run: Run, sweep: Sweep, rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Writes results.json (rows in grid order, whichever process trained them) and the plots; gives the results."""
    cfg, out_dir, lm = run.cfg, run.out_dir, sweep.lm
    grid = cfg.hparam_grid()
    runs = sorted(
        rows,
        key=lambda r: (next(i for i, h in enumerate(grid) if same_hparams(h, {k: r[k] for k in h})), r["dict_size"]),
    )
    results = {
        "config": asdict(cfg),
        "steps_trained": steps,
        "hook_name": sweep.target.hook or None,
        "target_hook": sweep.target.target_hook,
        **({"layers": list(sweep.target.layers)} if sweep.target.layers else {}),
        **({"n_heads": sweep.target.heads} if sweep.target.heads else {}),
        "d_in": sweep.data.d,
        "d_out": sweep.data.d_out,
        "activations_dir": str(sweep.data.folder) if sweep.data.folder is not None else None,
        "activations": run.cfg.activations,
        "lm_head": lm.head if lm is not None else None,
        "lm_head_note": (lm.head_note if lm is not None else "no model: your own activation files"),
        "runs": runs,
    }
    write_json(out_dir / RESULTS, results)
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


def start_wandb(cfg: Any, out_dir: Path) -> Any:
    if not cfg.use_wandb:
        return None
    import wandb

    return wandb.init(project=cfg.wandb_project, config=asdict(cfg), dir=str(out_dir), name=out_dir.name)
