"""Training loop for the tiny transformer, in the manner of nanoGPT's train.py: one process or DDP under torchrun.

Exact resume: the batch of step s is a pure function of (seed, s), and dropout is reseeded from
(seed, s, micro-batch index) before every forward pass, so a run resumed from `train_state.safetensors`
(model, AdamW moments, step) continues bit for bit as if it had never stopped. The same choice makes N processes
train exactly what one process does with the same global batch: each micro-batch is the same rows with the same
dropout masks, whichever process runs it.
"""

from __future__ import annotations

import ast
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
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from argparser import build_parser, read_config_file
from sparse_coding.corpus import DEFAULT_CORPUS_DIR, TOKENIZER_FILE, open_tokens, read_meta, token_path
from sparse_coding.nanogpt import DEFAULT_TINY_CHECKPOINT, GPT, GPTConfig, save_checkpoint
from utils import UserError, make_run_dir, resolve_device

STATE_FILE, LOG_FILE, SAMPLE_FILE = "train_state.safetensors", "log.jsonl", "sample.txt"
UNIGRAM_MAX_TOKENS = 2**28  # counting more train tokens than this does not change a unigram model's loss
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias")


@dataclass
class TrainConfig:
    # where things are
    out_dir: str = DEFAULT_TINY_CHECKPOINT  # the checkpoint folder; rerunning with the same out_dir resumes
    data_dir: str = DEFAULT_CORPUS_DIR  # a corpus prepared by scripts/prepare_corpus.py
    # the model (vocab_size comes from the corpus's tokenizer)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = True
    # optimisation
    batch_size: int = 32  # sequences per optimizer step, summed over all processes
    micro_batch_size: int = 0  # sequences per forward pass in one process; 0 = batch_size / processes
    max_iters: int = 1000
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 50
    lr_decay_iters: int = 0  # cosine decay ends here; 0 = max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 = no clipping
    # evaluation, checkpoints, logs
    eval_interval: int = 250
    eval_iters: int = 10  # micro-batches of fixed validation windows per periodic evaluation
    final_eval_tokens: int = 2**20  # validation tokens scored for train_summary.json's val_loss
    checkpoint_interval: int = 250
    log_interval: int = 10
    sample_tokens: int = 200  # text generated at the end (0 = none)
    sample_prompt: str = "The "
    wandb_log: bool = False
    wandb_project: str = "sparse_coding_tiny"
    wandb_run_name: str = ""
    # system
    seed: int = 1337
    device: str = "auto"  # auto, cpu, cuda; under torchrun each process takes cuda:LOCAL_RANK
    dtype: str = "auto"  # float32 or bfloat16; auto = bfloat16 on a GPU that has it, else float32
    compile: bool = False  # torch.compile the model (GPU)


# ---- configuration: nanoGPT-style Python files of plain assignments, then --key=value flags ----


def read_python_config(path: str | Path) -> dict[str, Any]:
    """Gives the `name = value` assignments of a config file; a value may use names assigned above it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found")
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as e:
        raise UserError(f"config file {str(path)!r} line {e.lineno}: {e.msg}") from e
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # a docstring
            continue
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"config file {str(path)!r} line {node.lineno}: only `name = value` lines are allowed")
        try:  # plain expressions only: no builtins, just the names assigned so far
            expr = compile(ast.Expression(node.value), str(path), "eval")
            values[node.targets[0].id] = eval(expr, {"__builtins__": {}}, dict(values))
        except Exception as e:
            raise UserError(f"config file {str(path)!r} line {node.lineno}: cannot evaluate the value ({e})") from e
    return values


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{name} must be {kind.__name__}, got {value!r}")
    return value


def parse_train_config(argv: list[str] | None, description: str) -> TrainConfig:
    """Gives the config: dataclass defaults < --config file (.py, .yaml or .json) < --key=value / --key value flags."""
    parser = build_parser(TrainConfig, description)
    for action in parser._actions:
        if action.dest == "config":
            action.help = "nanoGPT_config/*.py file of `name = value` lines (or YAML/JSON); flags still win"
    kinds = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    kinds = {k: {"int": int, "float": float, "str": str, "bool": bool}[v] for k, v in kinds.items()}
    argv = list(argv or [])
    for i, a in enumerate(argv):  # nanoGPT writes --compile=False; argparse's switch is --compile / --no-compile
        key, _, val = a[2:].partition("=")
        if a.startswith("--") and kinds.get(key) is bool and val:
            if val.lower() not in ("true", "false", "1", "0"):
                raise UserError(f"--{key} takes True or False, got {val!r}")
            argv[i] = f"--{key}" if val.lower() in ("true", "1") else f"--no-{key}"
    args = vars(parser.parse_args(argv))
    path = args.pop("config", None)
    file_values: dict[str, Any] = {}
    if path:
        file_values = read_python_config(path) if str(path).endswith(".py") else read_config_file(path)
    unknown = sorted(set(file_values) - set(kinds))
    if unknown:
        raise UserError(f"config file {path!r} has unknown setting(s): {', '.join(unknown)}")
    values = {k: _typed(k, v, kinds[k]) for k, v in file_values.items()}
    values.update(args)
    return dataclasses.replace(TrainConfig(), **values)


def gpt_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    return GPTConfig(**{k: getattr(cfg, k) for k in MODEL_FIELDS}, vocab_size=vocab_size, dropout=cfg.dropout)


def check_config(cfg: TrainConfig, meta: dict[str, Any], world_size: int) -> GPTConfig:
    """Gives the model config, or raises a UserError naming the first setting that cannot work."""
    model_cfg = gpt_config(cfg, meta["vocab_size"])
    try:
        model_cfg.check()
    except ValueError as e:
        raise UserError(str(e)) from e
    shortest = min(meta["train_tokens"], meta["val_tokens"])
    if cfg.block_size + 1 > shortest:
        raise UserError(
            f"block_size ({cfg.block_size}) is larger than the data: the corpus in {cfg.data_dir!r} has only "
            f"{meta['train_tokens']} train and {meta['val_tokens']} val tokens"
        )
    for name in ("batch_size", "max_iters", "eval_interval", "eval_iters", "checkpoint_interval", "log_interval"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.batch_size % world_size:
        raise UserError(f"batch_size ({cfg.batch_size}) must be divisible by the number of processes ({world_size})")
    per_process = cfg.batch_size // world_size
    micro = cfg.micro_batch_size or per_process
    if micro < 1 or per_process % micro:
        raise UserError(
            f"micro_batch_size ({micro}) must divide the per-process batch ({cfg.batch_size} / {world_size} processes)"
        )
    if not (cfg.learning_rate > 0 and 0 <= cfg.min_lr <= cfg.learning_rate):
        raise UserError(
            f"need 0 < learning_rate and 0 <= min_lr <= learning_rate, got {cfg.learning_rate}, {cfg.min_lr}"
        )
    if cfg.warmup_iters >= (cfg.lr_decay_iters or cfg.max_iters):
        raise UserError(f"warmup_iters ({cfg.warmup_iters}) must be below lr_decay_iters (or max_iters)")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    return model_cfg


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
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i, s in optimizer.state_dict()["state"].items():
        tensors.update({f"optim.{i}.{k}": v.detach().cpu().contiguous() for k, v in s.items()})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"info": json.dumps(info)})
    os.replace(tmp, path)  # one file, renamed when whole: a kill mid-write leaves the previous state


def read_train_state_info(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["info"])


def load_train_state(path: Path, model: GPT, optimizer: torch.optim.Optimizer) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    model_state["lm_head.weight"] = model_state["transformer.wte.weight"]
    model.load_state_dict(model_state)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


# ---- the loop ----


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def _dist_from_env() -> Dist:
    if "RANK" not in os.environ:
        return Dist()
    return Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), True)


@torch.no_grad()
def evaluate(
    model: GPT, data: np.ndarray, offsets: np.ndarray, cfg: TrainConfig, micro: int, dd: Dist, device, autocast
) -> float:
    """Gives the mean loss (nats/token) over windows at offsets, shared out among the processes."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, tokens]
    mine = offsets[dd.rank :: dd.world_size]
    for i in range(0, len(mine), micro):
        x, y = (t.to(device) for t in windows(data, mine[i : i + micro], cfg.block_size))
        with autocast:
            _, loss = model(x, y)
        total += torch.stack([loss.double() * y.numel(), torch.tensor(float(y.numel()), device=device)])
    model.train()
    total = dd.sum(total)
    return float(total[0] / total[1])


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Trains (or resumes) the tiny transformer and writes the checkpoint folder; gives train_summary."""
    dd = _dist_from_env()
    meta = read_meta(cfg.data_dir)
    model_cfg = check_config(cfg, meta, dd.world_size)
    out_dir = Path(cfg.out_dir)
    state_path = out_dir / STATE_FILE
    info: dict[str, Any] = {}
    if state_path.is_file():
        info = read_train_state_info(state_path)
        old = {k: info["config"].get(k) for k in MODEL_FIELDS}
        new = {k: getattr(cfg, k) for k in MODEL_FIELDS}
        if old != new or info.get("vocab_size") != meta["vocab_size"]:
            raise UserError(f"{out_dir} holds a run of another model ({old}); choose another --out_dir")
    elif (out_dir / "config.json").is_file():
        raise UserError(f"{out_dir} holds a checkpoint without training state; choose another --out_dir")
    if cfg.wandb_log:
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise UserError("wandb_log=True but wandb is not installed (pip install wandb)") from e

    if dd.main:
        make_run_dir(cfg.out_dir, "tiny")  # fails early, with one message, when out_dir is not writable
    if dd.enabled:
        use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{dd.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        device = resolve_device(cfg.device)
    use_bf16 = device.type == "cuda" and (
        cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and torch.cuda.is_bf16_supported())
    )
    if cfg.dtype == "bfloat16" and device.type != "cuda":
        raise UserError("dtype bfloat16 needs a CUDA device here; use float32 on CPU")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = GPT(model_cfg).to(device)
    optimizer = model.configure_optimizer(
        cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )
    start_step = 0
    if info:
        load_train_state(state_path, model, optimizer)
        start_step = info["step"]
        if dd.main:
            print(f"resuming {out_dir} from step {start_step}", flush=True)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if dd.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dd.local_rank] if device.type == "cuda" else None
        )

    train_data, val_data = open_tokens(token_path(cfg.data_dir, "train")), open_tokens(token_path(cfg.data_dir, "val"))
    per_process = cfg.batch_size // dd.world_size
    micro = cfg.micro_batch_size or per_process
    accum = per_process // micro
    eval_offsets = np.random.default_rng(_seed(cfg.seed, 1)).integers(
        0, len(val_data) - cfg.block_size, size=cfg.eval_iters * micro
    )
    wandb_run = None
    if cfg.wandb_log and dd.main:
        import wandb

        wandb_run = wandb.init(
            project=cfg.wandb_project,
            name=cfg.wandb_run_name or None,
            config=dataclasses.asdict(cfg),
            dir=str(out_dir),
            id=info.get("wandb_run_id"),
            resume="allow",
        )
    log_file = open(out_dir / LOG_FILE, "a") if dd.main else None  # noqa: SIM115 (closed at the end)

    def log(record: dict[str, Any]) -> None:
        if dd.main:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if wandb_run is not None:
                wandb_run.log(record, step=record["step"])

    def state_info(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "tokens_seen": step * cfg.batch_size * cfg.block_size,
            "config": dataclasses.asdict(cfg),
            "vocab_size": meta["vocab_size"],
            "world_size": dd.world_size,
            "wandb_run_id": wandb_run.id if wandb_run is not None else info.get("wandb_run_id"),
        }

    started = time.time()
    step = start_step
    pbar = tqdm(total=cfg.max_iters, initial=step, desc="training", disable=not dd.main, dynamic_ncols=True)
    model.train()
    while step < cfg.max_iters:
        lr = learning_rate_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = batch_offsets(len(train_data), cfg.block_size, cfg.batch_size, cfg.seed, step)
        loss_sum = torch.zeros((), device=device)
        for m in range(accum):
            first = dd.rank * per_process + m * micro  # this micro-batch's rows in the global batch
            x, y = (
                t.to(device, non_blocking=True)
                for t in windows(train_data, offsets[first : first + micro], cfg.block_size)
            )
            torch.manual_seed(_seed(cfg.seed, step, first))  # dropout masks follow the rows, not the process
            no_sync = model.no_sync() if dd.enabled and m < accum - 1 else contextlib.nullcontext()
            with no_sync, autocast:
                _, loss = model(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        pbar.update(1)
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            train_loss = float(dd.sum(loss_sum) / dd.world_size)
            pbar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}")
            log({"step": step, "train_loss": train_loss, "lr": lr, "tokens_seen": state_info(step)["tokens_seen"]})
        if step % cfg.eval_interval == 0 and step < cfg.max_iters:
            val_loss = evaluate(raw_model, val_data, eval_offsets, cfg, micro, dd, device, autocast)
            if dd.main:
                tqdm.write(f"step {step}: val loss {val_loss:.4f}")
            log({"step": step, "val_loss": val_loss})
        if dd.main and (step % cfg.checkpoint_interval == 0 or step == cfg.max_iters):
            save_train_state(state_path, raw_model, optimizer, state_info(step))
            tqdm.write(f"step {step}: saved {state_path}")
    pbar.close()
    train_seconds = time.time() - started

    # final score: the first final_eval_tokens of val in back-to-back windows, and the unigram baseline on the
    # very same target tokens
    n_windows = min((len(val_data) - 1) // cfg.block_size, max(1, cfg.final_eval_tokens // cfg.block_size))
    final_offsets = np.arange(n_windows) * cfg.block_size
    val_loss = evaluate(raw_model, val_data, final_offsets, cfg, micro, dd, device, autocast)
    vocab = meta["vocab_size"]
    targets = np.asarray(val_data[1 : 1 + n_windows * cfg.block_size])
    unigram = unigram_cross_entropy(token_counts(train_data, vocab), np.bincount(targets, minlength=vocab)[:vocab])
    summary = {"val_loss": val_loss, "unigram_entropy": unigram, "tokens_seen": state_info(step)["tokens_seen"]}
    if dd.main:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(cfg.data_dir) / TOKENIZER_FILE))
        extra = {
            "step": step,
            "tokens_seen": summary["tokens_seen"],
            "n_params": raw_model.num_params(),
            "corpus": {k: meta[k] for k in meta if k != "tokenizer"},
            "training": dataclasses.asdict(cfg),
        }
        save_checkpoint(out_dir, raw_model, tokenizer, summary, extra)
        log({"step": step, "final_val_loss": val_loss, "unigram_entropy": unigram})
        if cfg.sample_tokens > 0:
            text = sample_text(raw_model, tokenizer, cfg, device, meta["eot_token_id"])
            (out_dir / SAMPLE_FILE).write_text(text + "\n")
            print(f"--- sample ---\n{text}\n--------------")
        if wandb_run is not None:
            wandb_run.summary.update(summary)
            wandb_run.finish()
        log_file.close()
        print(
            f"val loss {val_loss:.4f} nats/token vs unigram entropy {unigram:.4f}; "
            f"{summary['tokens_seen']:,} tokens seen; {train_seconds:.0f} s training this session"
        )
        print(f"checkpoint in {out_dir}")
    if dd.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def sample_text(model: GPT, tokenizer, cfg: TrainConfig, device: torch.device, eot_id: int) -> str:
    """Gives the prompt and sample_tokens tokens sampled after it (temperature 0.8, top-k 200, fixed seed)."""
    ids = tokenizer.encode(cfg.sample_prompt).ids or [eot_id]
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    model.eval()
    out = model.generate(
        torch.tensor([ids], device=device), cfg.sample_tokens, temperature=0.8, top_k=200, generator=generator
    )
    return tokenizer.decode(out[0].tolist())
