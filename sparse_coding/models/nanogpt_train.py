"""Training loop for the tiny transformer, in the manner of nanoGPT's train.py: one process or DDP under torchrun.

Exact resume: the batch of step s is a pure function of (seed, s), and dropout is reseeded from
(seed, s, micro-batch index) before every forward pass, so a run resumed from `train_state.safetensors`
(model, AdamW moments, step) continues bit for bit as if it had never stopped. The same choice makes N processes
train exactly what one process does with the same global batch: each micro-batch is the same rows with the same
dropout masks, whichever process runs it.

`train` reads as the table of contents: check the config against the data and the folder, start the processes,
build the model (or resume it), run the steps, score the result and write the checkpoint folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from argparser import parse_config
from sparse_coding.config import Config, option
from sparse_coding.data.corpus import DEFAULT_CORPUS_DIR, TOKENIZER_FILE, open_tokens, read_meta, token_path
from sparse_coding.errors import CheckpointError, ConfigError
from sparse_coding.files import (
    load_optimizer_tensors,
    load_tensors,
    optimizer_tensors,
    save_tensors,
    tensor_metadata,
    write_text,
)
from sparse_coding.models.nanogpt import DEFAULT_TINY_CHECKPOINT, GPT, GPTConfig, model_tensors, save_checkpoint
from sparse_coding.training.distributed import DistInfo, all_sum, barrier, init_distributed, shutdown
from utils import resolve_device

STATE_FILE, LOG_FILE, SAMPLE_FILE = "train_state.safetensors", "log.jsonl", "sample.txt"
UNIGRAM_MAX_TOKENS = 2**28  # counting more train tokens than this does not change a unigram model's loss
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias")


@dataclass
class TrainConfig(Config):
    out_dir: str = option(DEFAULT_TINY_CHECKPOINT, "the checkpoint folder; rerunning with the same out_dir resumes")
    data_dir: str = option(DEFAULT_CORPUS_DIR, "a corpus prepared by scripts/prepare_corpus.py")
    n_layer: int = option(4, "transformer blocks", gt=0)
    n_head: int = option(4, "attention heads per block (must divide n_embd)", gt=0)
    n_embd: int = option(128, "width of the residual stream (the MLP has 4x as many neurons)", gt=0)
    block_size: int = option(128, "context length in tokens", gt=0)
    dropout: float = option(0.0, "dropout probability in training", ge=0, lt=1)
    bias: bool = option(True, "biases in Linear and LayerNorm layers, as GPT-2")
    batch_size: int = option(32, "sequences per optimizer step, summed over all processes", gt=0)
    micro_batch_size: int = option(0, "sequences per forward pass in one process; 0 = batch_size / processes", ge=0)
    max_iters: int = option(1000, "optimizer steps in all", gt=0)
    learning_rate: float = option(2e-3, "peak learning rate (AdamW)", gt=0)
    min_lr: float = option(2e-4, "learning rate at the end of the cosine decay", ge=0)
    warmup_iters: int = option(50, "steps of linear learning-rate warm-up", ge=0)
    lr_decay_iters: int = option(0, "the cosine decay ends here; 0 = max_iters", ge=0)
    weight_decay: float = option(0.1, "AdamW weight decay of the matrices", ge=0)
    beta1: float = option(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = option(0.99, "AdamW beta2", ge=0, lt=1)
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = no clipping)", ge=0)
    eval_interval: int = option(250, "steps between validation losses", gt=0)
    eval_iters: int = option(10, "micro-batches of fixed validation windows per periodic evaluation", gt=0)
    final_eval_tokens: int = option(2**20, "validation tokens scored for train_summary.json's val_loss", gt=0)
    checkpoint_interval: int = option(250, "steps between saved training states", gt=0)
    log_interval: int = option(10, "steps between lines of log.jsonl", gt=0)
    sample_tokens: int = option(200, "text generated at the end (0 = none)", ge=0)
    sample_prompt: str = option("The ", "the prompt of that sample")
    wandb_log: bool = option(False, "log to wandb (WANDB_MODE=offline works without an account)")
    wandb_project: str = option("sparse_coding_tiny", "wandb project name")
    wandb_run_name: str = option("", "wandb run name (empty: wandb picks one)")
    seed: int = option(1337, "random seed of the initial weights, batches and dropout", ge=0)
    device: str = option("auto", "auto, cpu, cuda; under torchrun each process takes cuda:LOCAL_RANK")
    dtype: str = option(
        "auto",
        "float32 or bfloat16; auto = bfloat16 on a GPU that has it, else float32",
        choices=("auto", "float32", "bfloat16"),
    )
    compile: bool = option(False, "torch.compile the model (GPU)")

    def check(self) -> None:
        super().check()
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must be at most learning_rate ({self.learning_rate})")
        if self.warmup_iters >= (self.lr_decay_iters or self.max_iters):
            raise ConfigError(f"warmup_iters ({self.warmup_iters}) must be below lr_decay_iters (or max_iters)")


def parse_train_config(argv: list[str] | None, description: str) -> TrainConfig:
    """Gives the config: dataclass defaults < --config file (.py, .yaml or .json) < --key=value / --key value flags."""
    return parse_config(TrainConfig, description, argv)


def check_against_data(cfg: TrainConfig, meta: dict[str, Any], world_size: int) -> GPTConfig:
    """Gives the model config, or raises a ConfigError naming the first setting the corpus or the number of
    processes rules out."""
    model_cfg = GPTConfig(
        **{k: getattr(cfg, k) for k in MODEL_FIELDS}, vocab_size=meta["vocab_size"], dropout=cfg.dropout
    )
    model_cfg.check()
    shortest = min(meta["train_tokens"], meta["val_tokens"])
    if cfg.block_size + 1 > shortest:
        raise ConfigError(
            f"block_size ({cfg.block_size}) is larger than the data: the corpus in {cfg.data_dir!r} has only "
            f"{meta['train_tokens']} train and {meta['val_tokens']} val tokens"
        )
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({world_size})")
    per_process = cfg.batch_size // world_size
    if per_process % (cfg.micro_batch_size or per_process):
        raise ConfigError(
            f"micro_batch_size ({cfg.micro_batch_size}) must divide the per-process batch "
            f"({cfg.batch_size} / {world_size} processes)"
        )
    return model_cfg


def check_out_dir(cfg: TrainConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """Gives the saved training state's info when out_dir holds a run of this same model (to resume), {} when it
    holds none; refuses a folder that holds another model or a checkpoint without training state."""
    out_dir = Path(cfg.out_dir)
    if (out_dir / STATE_FILE).is_file():
        info = read_train_state_info(out_dir / STATE_FILE)
        old = {k: info["config"].get(k) for k in MODEL_FIELDS}
        if old != {k: getattr(cfg, k) for k in MODEL_FIELDS} or info.get("vocab_size") != meta["vocab_size"]:
            raise CheckpointError(f"{out_dir} holds a run of another model ({old}); choose another --out_dir")
        return info
    if (out_dir / "config.json").is_file():
        raise CheckpointError(f"{out_dir} holds a checkpoint without training state; choose another --out_dir")
    return {}


def learning_rate_at(step: int, cfg: TrainConfig) -> float:
    """Gives the learning rate for step: linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    decay_end = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_end:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / (decay_end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


# ---- data ----


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def windows(data: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gives inputs and next-token targets [len(offsets), block_size] starting at offsets."""
    rows = torch.from_numpy(np.stack([data[o : o + block_size + 1] for o in offsets]).astype(np.int64))
    return rows[:, :-1], rows[:, 1:]


def batch_offsets(n_tokens: int, block_size: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Gives the window starts of step's global batch [batch_size]: a pure function, so resume is exact."""
    return np.random.default_rng(_seed(seed, step)).integers(0, n_tokens - block_size, size=batch_size)


def unigram_cross_entropy(train_counts: np.ndarray, target_counts: np.ndarray) -> float:
    """Gives the loss (nats/token) on the targets of the best context-free model fit to train: its add-one
    smoothed unigram frequencies (smoothing keeps tokens never seen in train finite)."""
    q = (train_counts + 1.0) / (train_counts.sum() + len(train_counts))
    p = target_counts / target_counts.sum()
    return float(-(p * np.log(q)).sum())


def token_counts(data: np.ndarray, vocab_size: int, limit: int = UNIGRAM_MAX_TOKENS, chunk: int = 2**24) -> np.ndarray:
    n = min(len(data), limit)
    counts = np.zeros(vocab_size, dtype=np.int64)
    for i in range(0, n, chunk):
        counts += np.bincount(np.asarray(data[i : min(i + chunk, n)]), minlength=vocab_size)[:vocab_size]
    return counts


# ---- training state (never pickle: tensors in safetensors, the rest as JSON in its metadata) ----


def save_train_state(path: Path, model: GPT, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """One file, renamed when whole: a kill mid-write leaves the previous state."""
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()}
    save_tensors(path, {**tensors, **optimizer_tensors(optimizer, "optim")}, metadata={"info": json.dumps(info)})


def read_train_state_info(path: Path) -> dict[str, Any]:
    return json.loads(tensor_metadata(path)["info"])


def load_train_state(path: Path, model: GPT, optimizer: torch.optim.Optimizer) -> None:
    tensors = load_tensors(path)
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    model_state["lm_head.weight"] = model_state["transformer.wte.weight"]
    model.load_state_dict(model_state)
    load_optimizer_tensors(optimizer, tensors, "optim")


# ---- the run ----


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Trains (or resumes) the tiny transformer and writes the checkpoint folder; gives train_summary."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # known before the processes meet, so all check alike
    meta = read_meta(cfg.data_dir)
    model_cfg = check_against_data(cfg, meta, world)
    resumed = check_out_dir(cfg, meta)
    if cfg.wandb_log:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("wandb_log=True but wandb is not installed (pip install wandb)") from None
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    info, device = init_distributed(resolve_device(cfg.device))
    try:
        run = TinyRun(cfg, meta, info, device, resumed)
        run.build(model_cfg)
        started = time.time()
        run.steps()
        summary = run.final_score()
        if info.is_main:
            run.write_outputs(summary, time.time() - started)
        barrier(info)
        return summary
    finally:
        shutdown(info)


class TinyRun:
    """One training run's state, its stages in the order `train` calls them."""

    def __init__(
        self, cfg: TrainConfig, meta: dict[str, Any], info: DistInfo, device: torch.device, resumed: dict[str, Any]
    ):
        self.cfg, self.meta, self.info, self.device, self.resumed = cfg, meta, info, device, resumed
        self.out_dir = Path(cfg.out_dir)
        self.per_process = cfg.batch_size // info.world
        self.micro = cfg.micro_batch_size or self.per_process
        self.autocast = self._autocast()
        self.train_data = open_tokens(token_path(cfg.data_dir, "train"))
        self.val_data = open_tokens(token_path(cfg.data_dir, "val"))
        self.eval_offsets = np.random.default_rng(_seed(cfg.seed, 1)).integers(
            0, len(self.val_data) - cfg.block_size, size=cfg.eval_iters * self.micro
        )
        self.step = resumed.get("step", 0)
        self.wandb_run: Any = None

    def _autocast(self) -> Any:
        cfg, device = self.cfg, self.device
        if cfg.dtype == "bfloat16" and device.type != "cuda":
            raise ConfigError("dtype bfloat16 needs a CUDA device here; use float32 on CPU")
        use_bf16 = device.type == "cuda" and (
            cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and torch.cuda.is_bf16_supported())
        )
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def build(self, model_cfg: GPTConfig) -> None:
        """Makes the model and optimizer (the same initial weights in every process), restores a saved state,
        and wraps the model for compile and DDP."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.raw_model = GPT(model_cfg).to(self.device)
        self.optimizer = self.raw_model.configure_optimizer(
            cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), fused=self.device.type == "cuda"
        )
        if self.resumed:
            load_train_state(self.out_dir / STATE_FILE, self.raw_model, self.optimizer)
            if self.info.is_main:
                print(f"resuming {self.out_dir} from step {self.step}", flush=True)
        self.model: Any = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        if self.info.active:
            ids = [self.info.local_rank] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.wandb_log and self.info.is_main:
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.wandb_project,
                name=cfg.wandb_run_name or None,
                config=dataclasses.asdict(cfg),
                dir=str(self.out_dir),
                id=self.resumed.get("wandb_run_id"),
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            with (self.out_dir / LOG_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb_run is not None:
                self.wandb_run.log(record, step=record["step"])

    def state_info(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.step * self.cfg.batch_size * self.cfg.block_size,
            "config": dataclasses.asdict(self.cfg),
            "vocab_size": self.meta["vocab_size"],
            "world_size": self.info.world,
            "wandb_run_id": self.wandb_run.id if self.wandb_run is not None else self.resumed.get("wandb_run_id"),
        }

    def steps(self) -> None:
        """Runs optimizer steps to max_iters, logging, evaluating and saving the training state on the way."""
        cfg = self.cfg
        pbar = tqdm(
            total=cfg.max_iters, initial=self.step, desc="training", disable=not self.info.is_main, dynamic_ncols=True
        )
        self.model.train()
        while self.step < cfg.max_iters:
            lr = learning_rate_at(self.step, cfg)
            loss = self.one_step(lr)
            self.step += 1
            pbar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                train_loss = float(all_sum(loss, self.info) / self.info.world)
                pbar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")
                self.log(
                    {
                        "step": self.step,
                        "train_loss": train_loss,
                        "lr": lr,
                        "tokens_seen": self.state_info()["tokens_seen"],
                    }
                )
            if self.step % cfg.eval_interval == 0 and self.step < cfg.max_iters:
                val_loss = self.evaluate(self.eval_offsets)
                if self.info.is_main:
                    tqdm.write(f"step {self.step}: val loss {val_loss:.4f}")
                self.log({"step": self.step, "val_loss": val_loss})
            if self.info.is_main and (self.step % cfg.checkpoint_interval == 0 or self.step == cfg.max_iters):
                save_train_state(self.out_dir / STATE_FILE, self.raw_model, self.optimizer, self.state_info())
                tqdm.write(f"step {self.step}: saved {self.out_dir / STATE_FILE}")
        pbar.close()

    def one_step(self, lr: float) -> torch.Tensor:
        """One optimizer step over this process's micro-batches of the step's global batch; gives its mean loss."""
        cfg, info = self.cfg, self.info
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        offsets = batch_offsets(len(self.train_data), cfg.block_size, cfg.batch_size, cfg.seed, self.step)
        accum = self.per_process // self.micro
        loss_sum = torch.zeros((), device=self.device)
        for m in range(accum):
            first = info.rank * self.per_process + m * self.micro  # this micro-batch's rows in the global batch
            x, y = (
                t.to(self.device, non_blocking=True)
                for t in windows(self.train_data, offsets[first : first + self.micro], cfg.block_size)
            )
            torch.manual_seed(_seed(cfg.seed, self.step, first))  # dropout masks follow the rows, not the process
            no_sync = self.model.no_sync() if info.active and m < accum - 1 else contextlib.nullcontext()
            with no_sync, self.autocast:
                _, loss = self.model(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    @torch.no_grad()
    def evaluate(self, offsets: np.ndarray) -> float:
        """Gives the mean loss (nats/token) over windows at offsets, shared out among the processes."""
        model, info = self.raw_model, self.info
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # [sum of losses, tokens]
        mine = offsets[info.rank :: info.world]
        for i in range(0, len(mine), self.micro):
            x, y = (t.to(self.device) for t in windows(self.val_data, mine[i : i + self.micro], self.cfg.block_size))
            with self.autocast:
                _, loss = model(x, y)
            total += torch.stack([loss.double() * y.numel(), torch.tensor(float(y.numel()), device=self.device)])
        model.train()
        total = all_sum(total, info)
        return float(total[0] / total[1])

    def final_score(self) -> dict[str, Any]:
        """Scores the first final_eval_tokens of val in back-to-back windows, and the unigram baseline on the very
        same target tokens; gives train_summary."""
        cfg, vocab = self.cfg, self.meta["vocab_size"]
        n_windows = min((len(self.val_data) - 1) // cfg.block_size, max(1, cfg.final_eval_tokens // cfg.block_size))
        val_loss = self.evaluate(np.arange(n_windows) * cfg.block_size)
        targets = np.asarray(self.val_data[1 : 1 + n_windows * cfg.block_size])
        unigram = unigram_cross_entropy(
            token_counts(self.train_data, vocab), np.bincount(targets, minlength=vocab)[:vocab]
        )
        return {"val_loss": val_loss, "unigram_entropy": unigram, "tokens_seen": self.state_info()["tokens_seen"]}

    def write_outputs(self, summary: dict[str, Any], train_seconds: float) -> None:
        """Writes the checkpoint folder (DESIGN.md contract), the final log line and a text sample."""
        from tokenizers import Tokenizer

        cfg, meta = self.cfg, self.meta
        tokenizer = Tokenizer.from_file(str(Path(cfg.data_dir) / TOKENIZER_FILE))
        extra = {
            "step": self.step,
            "tokens_seen": summary["tokens_seen"],
            "n_params": self.raw_model.num_params(),
            "corpus": {k: meta[k] for k in meta if k != "tokenizer"},
            "training": dataclasses.asdict(cfg),
        }
        save_checkpoint(self.out_dir, self.raw_model, tokenizer, summary, extra)
        self.log(
            {"step": self.step, "final_val_loss": summary["val_loss"], "unigram_entropy": summary["unigram_entropy"]}
        )
        if cfg.sample_tokens > 0:
            text = sample_text(self.raw_model, tokenizer, cfg, self.device, meta["eot_token_id"])
            write_text(self.out_dir / SAMPLE_FILE, text + "\n")
            print(f"--- sample ---\n{text}\n--------------")
        if self.wandb_run is not None:
            self.wandb_run.summary.update(summary)
            self.wandb_run.finish()
        print(
            f"val loss {summary['val_loss']:.4f} nats/token vs unigram entropy {summary['unigram_entropy']:.4f}; "
            f"{summary['tokens_seen']:,} tokens seen; {train_seconds:.0f} s training this session"
        )
        print(f"checkpoint in {self.out_dir}")


def sample_text(model: GPT, tokenizer: Any, cfg: TrainConfig, device: torch.device, eot_id: int) -> str:
    """Gives the prompt and sample_tokens tokens sampled after it (temperature 0.8, top-k 200, fixed seed)."""
    ids = tokenizer.encode(cfg.sample_prompt).ids or [eot_id]
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model.eval()
    out = model.generate(
        torch.tensor([ids], device=device), cfg.sample_tokens, temperature=0.8, top_k=200, generator=generator
    )
    return tokenizer.decode(out[0].tolist())
