"""Real-model sweeps: text → tokens → activations at one or more hooks (cached on disk, resumable, one forward
pass for all) → a lockstep sweep of SAEs per hook → metrics on held-out activations, including CE loss
recovered and KL through the model when it has a trained LM head. Or a folder of your own activation files in
place of the model and the text.

`run_lm` reads as the table of contents: load the model and make sure the activations are stored (or index your
own files), claim each sweep's checkpoint, then train and report each sweep (lm_sweep.py). With several hooks
each sweep gets a folder hooks/<hook>/ and results.json indexes them by hook."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sparse_coding.activations.batches import StoredActivations
from sparse_coding.activations.caching import (
    DEFAULT_DATASET,
    DEFAULT_MODEL,
    CacheConfig,
    Target,
    prepare_activations,
    resolve_targets,
    store_specs,
)
from sparse_coding.activations.own_files import index_folder, is_own_folder
from sparse_coding.activations.store import DTYPES, ActivationDataset
from sparse_coding.activations.streaming import StreamedActivations
from sparse_coding.config import option
from sparse_coding.errors import CheckpointError, ConfigError, UserError
from sparse_coding.files import write_json
from sparse_coding.models.language_model import MODEL_DTYPES, LanguageModel, load_language_model
from sparse_coding.pipelines.lm_sweep import RESULTS, Run, Sweep, fingerprint, run_sweep
from sparse_coding.saes.precision import Precision
from sparse_coding.training.config import SMOKE_SWEEP, SweepConfig
from sparse_coding.training.distributed import gather_json, init_distributed, shutdown
from sparse_coding.training.memory import check_sweep_fits
from utils import resolve_device

ACTIVATION_MODES = ("disk", "stream")


@dataclass
class RunConfig(SweepConfig, CacheConfig):
    preset: str = option("default", "the preset this config started from")
    out: str = option("", "run folder; empty: outputs/<timestamp>_lm_<preset>/")
    n_eval_chunks: int = option(1, "the last chunks are held out for evaluation, never trained on", gt=0)
    mix_chunks: int = option(2, "chunks pooled and shuffled together for training batches", gt=0)
    mini_runs: int = option(1, "training passes, each followed by metrics and plots", gt=0)
    load_autoencoders: str = option(
        "",
        "SAEs to continue from, matched by size and knob: a run folder (or its saes/), one SAE folder (any SAELens "
        "one of an architecture we have), hf:org/repo[/folder] or a SAELens pretrained release/id",
    )
    ce_eval_rows: int = option(32, "held-out context rows for CE loss recovered and KL (0: skip)", ge=0)
    mmcs_threshold: float = option(
        0.9, "share of features whose best match in the next larger dictionary exceeds this", gt=0, lt=1
    )
    use_wandb: bool = option(False, "log to wandb (key from WANDB_API_KEY or `wandb login`; WANDB_MODE=offline works)")
    activations: str = option(
        "disk",
        "disk: store the activations (--activations_dir), then train (reusable by later sweeps); stream: run the model "
        "inside the training loop into an in-memory shuffle buffer, nothing written (one long run, or no disk)",
        choices=ACTIVATION_MODES,
    )
    buffer_tokens: int = option(
        2**17,
        "--activations stream: activations in the shuffle buffer, refilled half at a time (at most ~1.25x in memory)",
        gt=0,
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
    skip_connection: bool = option(False, "--transcode: add a learned linear skip path (SAELens' skip_transcoder)")

    def check(self) -> None:
        super().check()
        self.sae_cls  # noqa: B018  (one architecture per run: raises otherwise)
        if self.diff_model and not self.cross_layer():
            raise ConfigError("--diff_model trains a crosscoder on both models' activations: add --arch crosscoder")
        if self.cross_layer():
            self.check_cross_layer()
        if self.activations == "stream":
            self.check_stream()
        else:
            self.check_chunks(self.n_chunks)
        if self.skip_connection and not self.transcode:
            raise ConfigError("--skip_connection belongs to transcoders; add --transcode")
        if self.resample_every and self.transcode:
            raise ConfigError("--resample_every does not apply to transcoders yet (it resamples towards inputs)")

    def cross_layer(self) -> bool:
        return self.sae_cls.cross_layer

    def layer_transcoder(self) -> bool:
        return self.sae_cls.layer_transcoder

    @property
    def n_layers(self) -> int:
        """The blocks a cross-layer dictionary spans: its layers (0 before the model has said how many, without
        --layers), or under --diff_model the two models."""
        if self.diff_model:
            return 2
        return len(self.layers) if self.layers else 0

    def check_cross_layer(self) -> None:
        """Raises ConfigError for what a cross-layer dictionary cannot read."""
        if self.diff_model:
            if self.layer_transcoder() or self.layers or self.hook_names or self.transcode:
                raise ConfigError(
                    "--diff_model trains a crosscoder (--arch crosscoder) on one hook of both models: --layer and "
                    "--layer_loc, or --hook_name; not --layers, --hook_names or --transcode"
                )
            return
        what = (
            "always transcodes each layer's MLP (its input to its output)"
            if self.layer_transcoder()
            else ("reconstructs the hooks it reads at --layer_loc")
        )
        if self.hook_name or self.hook_names:
            raise ConfigError(f"--arch {self.arch} {what}: choose the layers with --layers (default: all), not "
                              "--hook_name(s)")  # fmt: skip
        if self.transcode:
            raise ConfigError(f"--arch {self.arch} {what}: drop --transcode")
        if self.layer_transcoder() and self.layer_loc not in ("mlp", "mlp_out"):
            raise ConfigError(f"--arch {self.arch} {what}: drop --layer_loc")
        if self.layers and sorted(set(self.layers)) != self.layers:
            raise ConfigError(f"--arch {self.arch}: give --layers in increasing order, each once (got {self.layers})")
        if self.skip_connection:
            raise ConfigError(f"--arch {self.arch} has no skip connection yet; drop --skip_connection")

    def resample_steps(self) -> int:
        """As a sweep's, but the architecture's default applies only where resampling can: not for transcoders
        (it resamples towards inputs) nor under --parallel data (each process sees its own inputs)."""
        if self.resample_every is None and (self.transcode or self.layer_transcoder() or self.parallel == "data"):
            return 0
        return super().resample_steps()

    def check_stream(self) -> None:
        """Raises ConfigError for what a streaming run cannot do."""
        if self.activations_dir:
            raise ConfigError(
                "--activations stream writes no store and reads none: drop --activations_dir, or use --activations disk"
            )
        if self.buffer_tokens < 4 * self.batch_size:
            raise ConfigError(
                f"--buffer_tokens {self.buffer_tokens} holds fewer than 4 batches of {self.batch_size}: each shuffle "
                "period's pool (half the buffer) must hold at least two; raise it or lower batch_size"
            )
        if self.buffer_tokens // 2 < self.max_length:
            raise ConfigError(f"--buffer_tokens {self.buffer_tokens} is under two context rows of {self.max_length}")

    def check_chunks(self, n_chunks: int) -> None:
        """Raises ConfigError if n_chunks chunks cannot be split into held-out and training chunk groups that
        hold a batch (checked again for a folder of your own files, once its chunks are counted)."""
        if self.n_eval_chunks >= n_chunks:
            raise ConfigError(
                f"n_eval_chunks ({self.n_eval_chunks}) must leave at least one chunk for training ({n_chunks} chunks)"
            )
        n_train = n_chunks - self.n_eval_chunks
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


def run_lm(cfg: RunConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Caches activations (or reuses them, or indexes your own), trains a sweep per hook with resume, evaluates
    and writes the run folder. Under torchrun every rank calls this; see training/distributed.py for how the
    work is split."""
    if (out_dir / RESULTS).exists() and not any(out_dir.glob("**/checkpoint")):
        raise CheckpointError(f"{out_dir} already holds a finished run (results.json); choose another --out")
    own = own_files_folder(cfg)
    for given, default in ((cfg.model_name, DEFAULT_MODEL), (cfg.dataset_name, DEFAULT_DATASET)):
        if own is None and given == default and not Path(default).exists():
            raise UserError(f"the offline default {default} is missing; `make tiny` prepares the corpus and model")
    info, device = init_distributed(resolve_device(cfg.device))
    run = Run(cfg, out_dir, device, info, progress and info.is_main)
    try:
        if own is not None:
            sweeps = load_own_files(run, own)
        else:
            sweeps = load_and_stream(run) if cfg.activations == "stream" else load_and_cache(run)
        runs = [run if len(sweeps) == 1 else replace(run, out_dir=hook_folder(out_dir, s.target)) for s in sweeps]
        fingerprints = [fingerprint(r, s) for r, s in zip(runs, sweeps, strict=True)]  # all refused before writing
        if info.is_main:
            write_json(out_dir / "config.json", asdict(cfg))
        results = {s.target.name: run_sweep(r, s, fp) for r, s, fp in zip(runs, sweeps, fingerprints, strict=True)}
        if len(sweeps) == 1 or not info.is_main:
            return next(iter(results.values()))
        return write_index(cfg, out_dir, runs, results)
    finally:
        shutdown(info)


def own_files_folder(cfg: RunConfig) -> Path | None:
    """Gives --activations_dir when it is a folder of your own activation files (then no model is loaded)."""
    folder = Path(cfg.activations_dir) if cfg.activations_dir else None
    if folder is None or not is_own_folder(folder):
        return None
    if cfg.transcode or cfg.hook_names or cfg.layers or cfg.cross_layer():
        raise ConfigError(
            f"{folder} holds your own activation files: --transcode, --hook_names, --layers and cross-layer "
            "dictionaries need a model"
        )
    return folder


def load_own_files(run: Run, folder: Path) -> list[Sweep]:
    """Indexes a folder of your own activation files (one process; the others wait for its word) as one sweep."""
    share_errors(run, lambda: index_folder(folder, run.cfg.chunk_size_tokens))
    data = ActivationDataset.open(folder)
    run.cfg.check_chunks(data.n_chunks)
    check_sweep(run, folder.name, data.d)
    return [Sweep(None, Target(run.cfg.hook_name), StoredActivations(data, data.n_chunks, run.cfg.n_eval_chunks))]


def load_and_cache(run: Run) -> list[Sweep]:
    """Loads the model, resolves the hooks, checks each sweep fits, and makes sure their activations are stored;
    one sweep per hook."""
    cfg = run.cfg
    lm = load_model(run)
    targets = resolve_targets(cfg, lm)
    specs = store_specs(cfg, lm, targets)
    for target, spec in zip(targets, specs, strict=True):
        check_sweep(run, target.name, spec.fields["d"], spec.fields["d_out"])
    share_errors(run, lambda: prepare_activations(cfg, lm, specs, run.progress))
    stores = [StoredActivations(ActivationDataset.open(s.folder), cfg.n_chunks, cfg.n_eval_chunks) for s in specs]
    return [Sweep(lm, t, data) for t, data in zip(targets, stores, strict=True)]


def load_and_stream(run: Run) -> list[Sweep]:
    """Loads the model and resolves the hooks; each sweep will run the model over the text as it trains (nothing is
    cached). Says what the buffer and the model take, beside the sweep's own estimate."""
    cfg = run.cfg
    lm = load_model(run)
    sweeps = []
    for target in resolve_targets(cfg, lm):
        data = StreamedActivations(lm, target.hook, target.target_hook, cfg, run.info)
        check_sweep(run, target.name, data.d, data.d_out)
        if run.info.is_main:
            print(f"streaming: {stream_memory(cfg, lm, data.d + (data.d_out or 0))}")
        sweeps.append(Sweep(lm, target, data))
    return sweeps


def stream_memory(cfg: RunConfig, lm: LanguageModel, width: int) -> str:
    """One line: the shuffle buffer's and the model's memory, estimated before training."""
    buffer = int(1.25 * cfg.buffer_tokens) * width * DTYPES[cfg.activation_dtype].itemsize
    model = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    return (
        f"a buffer of {cfg.buffer_tokens} activations ({cfg.activation_dtype}, at most ~{buffer / 2**30:.2f} GiB) and "
        f"the model ({model / 2**30:.2f} GiB); nothing written to disk"
    )


def check_sweep(run: Run, name: str, d: int, d_out: int | None = None) -> None:
    """Refuses dictionary sizes that cannot be trained, or a sweep too big for the device, before any work."""
    run.cfg.check_sizes(d)
    if run.info.is_main:
        shards = run.info.world if run.cfg.parallel == "latents" else 1
        print(f"sweep on {name}: {check_sweep_fits(run.cfg, d, run.device, shards, d_out)}")
        print(Precision(run.cfg.train_dtype).describe(run.device))


def load_model(run: Run) -> LanguageModel:
    """Gives the language model, checked against the context length asked for."""
    cfg = run.cfg
    lm = load_language_model(cfg.model_name, run.device, MODEL_DTYPES[cfg.model_dtype], cfg.diff_model)
    context = lm.context_length()
    if context is not None and cfg.max_length > context:
        raise ConfigError(f"max_length {cfg.max_length} is longer than {lm.name}'s context of {context} tokens")
    return lm


def share_errors(run: Run, work: Any) -> None:
    """Runs work() in the main process while the others wait for its word; a user error there ends every one."""
    error = None
    if run.info.is_main:
        try:
            work()
        except UserError as e:
            error = str(e)
    errors = [e for e in gather_json(error, run.info, run.device) if e]
    if errors:
        raise UserError(errors[0])


def hook_folder(out_dir: Path, target: Target) -> Path:
    """Gives the folder of one hook's sweep in a run over several hooks."""
    return out_dir / "hooks" / re.sub(r"[^A-Za-z0-9._-]+", "-", target.name).strip("-")


def write_index(cfg: RunConfig, out_dir: Path, runs: list[Run], results: dict[str, Any]) -> dict[str, Any]:
    """Writes the run's results.json for several hooks: each hook's results (as in its own folder), keyed by
    hook; gives it."""
    by_hook = {
        name: {"folder": str(r.out_dir.relative_to(out_dir)), **{k: v for k, v in res.items() if k != "config"}}
        for (name, res), r in zip(results.items(), runs, strict=True)
    }
    index = {"config": asdict(cfg), "hooks": list(by_hook), "by_hook": by_hook}
    write_json(out_dir / RESULTS, index)
    return index
