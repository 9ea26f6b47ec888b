"""Real-model sweeps: text → tokens → activations at a hook (cached on disk, resumable) → a lockstep sweep of
SAEs over them → metrics on held-out activations, including CE loss recovered and KL through the model."""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from sparse_coding import metrics
from sparse_coding.activations import (
    DTYPES,
    ActivationDataset,
    ChunkSource,
    StoreError,
    cache_activations,
    check_compatible,
    first_missing_chunk,
)
from sparse_coding.distributed import (
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
from sparse_coding.io import load_sae, load_tensors, read_json, write_json
from sparse_coding.lm import LanguageModel, ModelError, load_language_model, next_token_ce
from sparse_coding.plots import density_histograms
from sparse_coding.report import evaluate, plot_grid, save_saes, sweep_rows
from sparse_coding.saes import SAE
from sparse_coding.text import DatasetError, chunk_and_tokenize, load_texts
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

DEFAULT_MODEL = "checkpoints/tiny"  # made by `make tiny` (train_tiny.py)
DEFAULT_DATASET = "data/pydocs/train.jsonl"  # the offline corpus `make corpus` prepares (the tiny model's own)


@dataclass
class RunConfig(SweepConfig):
    preset: str = "default"
    out: str = ""  # run folder; empty: outputs/<timestamp>_lm/
    model_name: str = DEFAULT_MODEL  # TransformerLens/HF hub name, local HF folder, or nanoGPT checkpoint folder
    layer: int = 1
    layer_loc: str = "mlp"  # mlp (hidden neurons), mlp_out, residual, attn
    hook_name: str = ""  # explicit hook / module path; overrides layer and layer_loc
    dataset_name: str = DEFAULT_DATASET  # hub name, or a local .jsonl/.json/.txt/.parquet file or folder
    text_field: str = "text"
    dataset_split: str = "train"
    max_docs: int = 0  # 0: all
    max_length: int = 128  # tokens per context row
    n_chunks: int = 6
    chunk_size_tokens: int = 32_768  # a multiple of max_length
    activation_dtype: str = "fp32"  # fp32, fp16 or bf16 on disk
    model_batch_size: int = 32  # rows per forward pass when caching
    activations_dir: str = ""  # empty: data/activations/<model>__<hook>__<dataset>__<shape>
    n_eval_chunks: int = 1  # the last chunks are held out for evaluation, never trained on
    mix_chunks: int = 2  # chunks pooled and shuffled together for training batches
    mini_runs: int = 1  # training passes, each followed by metrics and plots
    load_autoencoders: str = ""  # a run folder (or its saes/) to continue from, matched by size and knob
    ce_eval_rows: int = 32  # held-out context rows for CE loss recovered and KL (0: skip)
    mmcs_threshold: float = 0.9
    use_wandb: bool = False  # key from WANDB_API_KEY or `wandb login`; WANDB_MODE=offline works
    parallel: str = "models"  # under torchrun: 'models' splits the sweep's SAEs over ranks, 'data' splits batches
    wandb_project: str = "sparse_coding"
    # The sweep, sized for the offline default on 2 cores (minutes): l1 = 10^(e/4), e in -2..1, which spans
    # L0 ≈ 2..60 on the tiny model's MLP neurons; dictionaries 1×, 2×, 4× the activation width. On a GPU and a
    # real model widen both (e.g. --l1_exp_low -8 --l1_exp_high 4 --dict_ratio_exp_high 5 --n_steps 20000).
    l1_exp_low: int = -2
    l1_exp_high: int = 1
    dict_ratio_exp_low: int = 0
    dict_ratio_exp_high: int = 2
    k_values: list[int] = field(default_factory=lambda: [8, 16, 32])
    n_steps: int = 600
    batch_size: int = 512
    checkpoint_every: int = 100
    dead_tokens_threshold: int = 200_000


def default() -> RunConfig:
    """The offline embedded default: our tiny model on the offline corpus, minutes on 2 cores."""
    return RunConfig()


def smoke() -> RunConfig:
    """Seconds, for tests (expects --model_name and --dataset_name pointing at small local things)."""
    return RunConfig(
        preset="smoke",
        max_length=16,
        n_chunks=3,
        chunk_size_tokens=512,
        model_batch_size=8,
        l1_exp_low=-4,
        l1_exp_high=0,
        l1_exp_base=10.0,
        dict_ratio_exp_low=0,
        dict_ratio_exp_high=1,
        k_values=[2, 4],
        n_steps=40,
        batch_size=128,
        checkpoint_every=10,
        log_every=10,
        ce_eval_rows=8,
        device="cpu",
        dead_tokens_threshold=2000,
    )


PRESETS = {"default": default, "smoke": smoke}


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")[-60:] or "x"


def activation_identity(cfg: RunConfig, lm: LanguageModel, hook: str, d: int) -> dict[str, Any]:
    return {
        "model": lm.name,
        "hook_name": hook,
        "d": d,
        "dtype": cfg.activation_dtype,
        "context_length": cfg.max_length,
        "tokens_per_chunk": cfg.chunk_size_tokens,
        "dataset": cfg.dataset_name,
        "text_field": cfg.text_field,
        "split": cfg.dataset_split,
        "tokenizer": lm.tokenizer.name,
    }


def check_config(cfg: RunConfig) -> None:
    try:
        check_sweep_config(cfg, 1_000_000)  # sizes are checked again once d is known
    except ValueError as e:
        if "dictionary" not in str(e):
            raise UserError(str(e)) from e
    if cfg.activation_dtype not in DTYPES:
        raise UserError(f"activation_dtype must be one of {', '.join(DTYPES)}")
    for name in ("max_length", "n_chunks", "chunk_size_tokens", "model_batch_size", "mini_runs", "mix_chunks"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"{name} must be positive")
    if cfg.chunk_size_tokens % cfg.max_length:
        raise UserError(
            f"chunk_size_tokens ({cfg.chunk_size_tokens}) must be a multiple of max_length ({cfg.max_length})"
        )
    if not 0 < cfg.n_eval_chunks < cfg.n_chunks:
        raise UserError("n_eval_chunks must be at least 1 and leave at least one chunk for training")
    if cfg.parallel not in PARALLEL_MODES:
        raise UserError(f"parallel must be one of {', '.join(PARALLEL_MODES)}")
    if cfg.ce_eval_rows < 0:
        raise UserError("ce_eval_rows must be ≥ 0")


def activations_folder(cfg: RunConfig, lm: LanguageModel, hook: str) -> Path:
    if cfg.activations_dir:
        return Path(cfg.activations_dir)
    shape = f"T{cfg.max_length}_c{cfg.chunk_size_tokens}_{cfg.activation_dtype}"
    return Path("data/activations") / "__".join([_slug(lm.name), _slug(hook), _slug(cfg.dataset_name), shape])


def prepare_activations(cfg: RunConfig, lm: LanguageModel, hook: str, progress: bool) -> ActivationDataset:
    """Gives the stored activations for this model, hook and data, computing (or finishing) them if needed."""
    d = lm.activations(torch.zeros(1, 2, dtype=torch.long), hook).shape[-1]
    identity = activation_identity(cfg, lm, hook, d)
    folder = activations_folder(cfg, lm, hook)
    rows_per_chunk = cfg.chunk_size_tokens // cfg.max_length
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        stored = read_json(manifest_path)
        check_compatible(stored, identity, folder)
        if first_missing_chunk(folder, cfg.n_chunks) == cfg.n_chunks:
            print(f"reusing stored activations in {folder}")
            return ActivationDataset(folder, stored)
    texts = load_texts(cfg.dataset_name, cfg.text_field, cfg.dataset_split, cfg.max_docs)
    rows = chunk_and_tokenize(
        texts, lm.tokenizer.encode_batch, lm.tokenizer.eos_id, cfg.max_length, max_rows=cfg.n_chunks * rows_per_chunk
    )
    extra = {
        "bytes_per_token": rows.bytes_per_token,
        "n_docs": rows.n_docs,
        "layer": cfg.layer,
        "layer_loc": cfg.layer_loc if not cfg.hook_name else None,
    }
    data = cache_activations(
        folder,
        identity,
        rows.tokens,
        lambda t: lm.activations(t, hook).float().cpu(),
        cfg.n_chunks,
        rows_per_chunk,
        cfg.model_batch_size,
        extra,
        progress,
    )
    print(f"activations stored in {folder}")
    return data


def load_into_stacks(stacks: list[SAE], folder: Path) -> list[str]:
    """Copies saved SAEs into the stacks' slots of the same architecture, size and knob; gives the names used."""
    folder = folder / "saes" if (folder / "saes").is_dir() else folder
    if not folder.is_dir():
        raise UserError(f"--load_autoencoders: {folder} not found")
    loaded = []
    for sub in sorted(p for p in folder.iterdir() if (p / "cfg.json").is_file()):
        sae, _ = load_sae(sub)
        for stack in stacks:
            if stack.architecture != sae.architecture or stack.d_sae != sae.d_sae or stack.d_in != sae.d_in:
                continue
            for m in range(stack.n_models):
                if _same_knob(stack.hparams(m), sae.hparams(0)):
                    stack.load_exported(m, sae.export(0))
                    loaded.append(sub.name)
    if not loaded:
        raise UserError(f"--load_autoencoders: no SAE in {folder} matches this sweep's architecture, sizes and knobs")
    return loaded


def _same_knob(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if "k" in a:
        return a.get("k") == b.get("k")
    return math.isclose(float(a["l1_alpha"]), float(b.get("l1_alpha", math.nan)), rel_tol=1e-6)


@torch.no_grad()
def ce_and_kl(lm: LanguageModel, hook: str, stack: SAE, tokens: Tensor, budget: int = 2**27) -> dict[str, Tensor]:
    """CE loss recovered and KL for every SAE of a stack on held-out rows tokens [R, T]; the M models run as
    one batch of M·r rows, r chosen so the biggest intermediate stays under `budget` elements."""
    M, (R, T) = stack.n_models, tokens.shape
    sums = {"ce_clean": 0.0, "ce_zero": 0.0, "ce_sae": torch.zeros(M), "kl": torch.zeros(M)}
    probe = lm.logits(tokens[:1])
    r = max(1, min(R, budget // (M * T * max(probe.shape[-1], stack.d_sae))))
    for start in range(0, R, r):
        rows = tokens[start : start + r]
        n = rows.shape[0]
        clean = lm.logits(rows)
        zero = lm.logits(rows, hook, torch.zeros_like)

        def splice(act: Tensor) -> Tensor:
            x = act.reshape(M, -1, act.shape[-1])  # [M, n·T, d]: model m's copy of the rows
            return stack.decode(stack.encode(x.float())).to(act.dtype).reshape(act.shape)

        spliced = lm.logits(rows.repeat(M, 1), hook, splice).view(M, n, T, -1)
        sums["ce_clean"] += float(next_token_ce(clean, rows)) * n
        sums["ce_zero"] += float(next_token_ce(zero, rows)) * n
        for m in range(M):
            sums["ce_sae"][m] += float(next_token_ce(spliced[m], rows)) * n
            sums["kl"][m] += float(metrics.kl_divergence(clean, spliced[m])) * n
    ce_clean, ce_zero = sums["ce_clean"] / R, sums["ce_zero"] / R
    ce_sae = sums["ce_sae"] / R
    return {
        "ce_clean": torch.full((M,), ce_clean),
        "ce_zero": torch.full((M,), ce_zero),
        "ce_sae": ce_sae,
        "ce_loss_recovered": metrics.ce_loss_recovered(ce_clean, ce_zero, ce_sae),
        "kl": sums["kl"] / R,
    }


def run_lm(cfg: RunConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Caches activations (or reuses them), trains the sweep with resume, evaluates and writes the run folder.
    Under torchrun every rank calls this; see sparse_coding/distributed.py for how the work is split."""
    check_config(cfg)
    if (out_dir / "results.json").exists() and not (out_dir / "checkpoint").exists():
        raise UserError(f"{out_dir} already holds a finished run (results.json); choose another --out")
    for given, default in ((cfg.model_name, DEFAULT_MODEL), (cfg.dataset_name, DEFAULT_DATASET)):
        if given == default and not Path(default).exists():
            raise UserError(f"the offline default {default} is missing; `make tiny` prepares the corpus and model")
    info, device = init_distributed(resolve_device(cfg.device))
    try:
        return _run(cfg, out_dir, device, info, progress and info.is_main)
    finally:
        shutdown(info)


def _run(cfg: RunConfig, out_dir: Path, device: torch.device, info: DistInfo, progress: bool) -> dict[str, Any]:
    try:
        lm = load_language_model(cfg.model_name, device)
        hook = cfg.hook_name or lm.hook_for(cfg.layer, cfg.layer_loc)
        lm.check_hook(hook)
    except ModelError as e:
        raise UserError(str(e)) from e
    context = lm.context_length()
    if context is not None and cfg.max_length > context:
        raise UserError(f"max_length {cfg.max_length} is longer than {lm.name}'s context of {context} tokens")
    error = None
    if info.is_main:  # one process computes the activations; the others wait for its word
        try:
            prepare_activations(cfg, lm, hook, progress)
        except (DatasetError, StoreError, ModelError) as e:
            error = str(e)
        except (ValueError, RuntimeError) as e:  # from inside the model; said once here, not as a traceback
            error = f"the model failed while caching activations: {type(e).__name__}: {e}"
    errors = [e for e in gather_json(error, info, device) if e]
    if errors:
        raise UserError(errors[0])
    data = ActivationDataset.open(activations_folder(cfg, lm, hook))
    d = data.d
    try:
        check_sweep_config(cfg, d)
    except ValueError as e:
        raise UserError(str(e)) from e
    fingerprint = config_fingerprint({**asdict(cfg), "d": d, "world": info.world}, RESUMABLE_CHANGES + ("mini_runs",))
    ckpt_dir = out_dir / "checkpoint" / (f"rank{info.rank}" if info.active else "")
    try:
        check_resumable(ckpt_dir, fingerprint)
    except CheckpointMismatch as e:
        raise UserError(str(e)) from e
    if info.is_main:
        write_json(out_dir / "config.json", asdict(cfg))

    stacks = build_stacks(cfg, d, device)
    if cfg.load_autoencoders:
        n = len(load_into_stacks(stacks, Path(cfg.load_autoencoders)))
        if info.is_main:
            print(f"continuing from {n} saved SAEs")
    sharded = info.active and cfg.parallel == "models"
    data_parallel = info.active and cfg.parallel == "data"
    if sharded:
        if stacks[0].n_models < info.world:  # decided alike on every rank, so none is left waiting
            raise UserError(f"{info.world} processes but only {stacks[0].n_models} grid points; use --parallel data")
        stacks = [slice_stack(s, my_models(stacks[0].n_models, info), cfg.sae_options()) for s in stacks]
    n_train = cfg.n_chunks - cfg.n_eval_chunks
    smallest_group = (n_train % cfg.mix_chunks or min(cfg.mix_chunks, n_train)) * cfg.chunk_size_tokens
    if cfg.batch_size > smallest_group:
        raise UserError(
            f"batch_size {cfg.batch_size} exceeds the {smallest_group} tokens of the smallest chunk group "
            "(raise chunk_size_tokens or mix_chunks, or lower batch_size)"
        )
    if data_parallel and cfg.batch_size % info.world:
        raise UserError(f"batch_size {cfg.batch_size} must divide evenly over {info.world} processes")
    sync = (lambda ts: average_tensors(ts, info)) if data_parallel else None
    trainer = Trainer(stacks, lr=cfg.lr, sync=sync, init_b_dec=not cfg.load_autoencoders)
    source: Any = ChunkSource(data, list(range(cfg.n_chunks - cfg.n_eval_chunks)), cfg.seed, device, cfg.mix_chunks)
    if data_parallel:
        source = RankSlice(source, info)
    try:
        eval_parts = [data.load_chunk(i) for i in range(cfg.n_chunks - cfg.n_eval_chunks, cfg.n_chunks)]
    except StoreError as e:
        raise UserError(str(e)) from e
    x_eval = torch.cat([a for a, _ in eval_parts]).to(device)
    eval_tokens = torch.cat([t for _, t in eval_parts]).long()[: cfg.ce_eval_rows]
    logger = _wandb(cfg, out_dir) if info.is_main else None

    def on_log(step: int, logs: list[dict[str, Tensor]]) -> None:
        if logger is not None:
            logger.log(
                {
                    f"train/d{s.d_sae}/{k}": v.mean().item()
                    for s, log in zip(stacks, logs, strict=True)
                    for k, v in log.items()
                    if v is not None
                },
                step=step,
            )

    results: dict[str, Any] = {}
    for run in range(1, cfg.mini_runs + 1):
        steps = cfg.n_steps * run // cfg.mini_runs
        try:
            train(trainer, source, _with_steps(cfg, steps), ckpt_dir, fingerprint, on_log, progress)
        except (CheckpointMismatch, StoreError) as e:
            raise UserError(str(e)) from e
        if trainer.step_count > steps:  # resumed past this pass: its weights are gone, report at a later pass
            continue
        if info.is_main or sharded:
            rows = evaluate_and_save(cfg, lm, hook, data, stacks, x_eval, eval_tokens, out_dir, steps, progress)
        else:
            rows = []  # data parallel: every rank holds the same SAEs; rank 0 reports them
        all_rows = [r for part in gather_json(rows, info, device) for r in part]
        if info.is_main:
            results = write_report(cfg, lm, hook, data, all_rows, out_dir, steps)
            if logger is not None:
                logger.log(
                    {
                        f"eval/{r['name']}/{k}": v
                        for r in results["runs"]
                        for k, v in r.items()
                        if isinstance(v, (int, float)) and v is not None
                    },
                    step=steps,
                )
            print(f"pass {run}/{cfg.mini_runs}: step {steps}, results in {out_dir / 'results.json'}")
    if logger is not None:
        logger.finish()
    barrier(info)
    if info.is_main:
        shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    return results


def _with_steps(cfg: RunConfig, n_steps: int) -> RunConfig:
    return replace(cfg, n_steps=n_steps)


def evaluate_and_save(
    cfg: RunConfig,
    lm: LanguageModel,
    hook: str,
    data: ActivationDataset,
    stacks: list[SAE],
    x_eval: Tensor,
    eval_tokens: Tensor,
    out_dir: Path,
    steps: int,
    progress: bool,
) -> list[dict[str, Any]]:
    """Evaluates this process's SAEs, saves them, and gives their results rows."""
    stats = evaluate(stacks, x_eval, cfg.batch_size)
    through_model: list[dict[str, Tensor] | None] = [None] * len(stacks)
    if lm.has_lm_head and cfg.ce_eval_rows > 0:
        through_model = [ce_and_kl(lm, hook, s, eval_tokens) for s in tqdm(stacks, desc="CE/KL", disable=not progress)]

    def model_metrics(i: int, m: int) -> dict[str, float | None]:
        t = through_model[i]
        return {
            "ce_loss_recovered": None if t is None else float(t["ce_loss_recovered"][m]),
            "kl": None if t is None else float(t["kl"][m]),
            "ce_loss_clean": None if t is None else float(t["ce_clean"][m]),
            "ce_loss_zero_ablation": None if t is None else float(t["ce_zero"][m]),
            "ce_loss_spliced": None if t is None else float(t["ce_sae"][m]),
        }

    rows = sweep_rows(stacks, stats, cfg.dict_ratios(), cfg.mmcs_threshold, model_metrics, progress)
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
        "l1_norm": cfg.l1_norm,
        "tied": cfg.tied,
    }
    save_saes(stacks, stats, out_dir / "saes", meta)
    return rows


def write_report(
    cfg: RunConfig,
    lm: LanguageModel,
    hook: str,
    data: ActivationDataset,
    rows: list[dict[str, Any]],
    out_dir: Path,
    steps: int,
) -> dict[str, Any]:
    """Writes results.json (rows in grid order, whichever process trained them) and the plots; gives the results."""
    grid = [tuple(sorted(h.items())) for h in cfg.hparam_grid()]
    knob = "k" if cfg.arch == "topk" else "l1_alpha"

    def grid_index(r: dict[str, Any]) -> int:
        return next(i for i, h in enumerate(grid) if math.isclose(float(dict(h)[knob]), float(r[knob])))

    runs = sorted(rows, key=lambda r: (grid_index(r), r["dict_size"]))
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


def _wandb(cfg: RunConfig, out_dir: Path) -> Any:
    if not cfg.use_wandb:
        return None
    import wandb

    return wandb.init(project=cfg.wandb_project, config=asdict(cfg), dir=str(out_dir), name=out_dir.name)
