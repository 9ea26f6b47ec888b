"""Activation store throughput: caching vs the bare truncated forward pass, and SAE training from disk vs memory.

Both comparisons run in one process on the same model and data and print one JSON line each:
  {"bench": "caching", "tokens_per_s", "forward_only_tokens_per_s", "overhead"}  (overhead = 1 − ratio)
  {"bench": "train_from_disk", "disk_tokens_per_s", "memory_tokens_per_s", "ratio"}
The model is a random-weight GPT-2 built here (--n_embd/--n_layer), or --model_name for any run.py model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sparse_coding.activations.batches import ChunkSource  # noqa: E402
from sparse_coding.activations.store import ActivationDataset, StoreSpec, cache_activations  # noqa: E402
from sparse_coding.data.text import TensorRows  # noqa: E402
from sparse_coding.models.language_model import LanguageModel, load_language_model  # noqa: E402
from sparse_coding.models.tokenizer import Tokenizer  # noqa: E402
from sparse_coding.training.config import SweepConfig  # noqa: E402
from sparse_coding.training.trainer import Trainer, build_stacks  # noqa: E402
from utils import tune_allocator  # noqa: E402


def random_gpt2(n_embd: int, n_layer: int, ctx: int) -> LanguageModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=8192, n_positions=ctx, n_embd=n_embd, n_layer=n_layer, n_head=max(1, n_embd // 64))
    )
    tok = Tokenizer(encode_batch=lambda t: [], decode_tokens=lambda ids: [], name="none")
    return LanguageModel(model, tok, f"random-gpt2-{n_embd}x{n_layer}", family="gpt2", base=model.transformer)


class MemorySource:
    """The same batches as ChunkSource, from pools loaded into memory before timing starts (the rival)."""

    def __init__(self, source: ChunkSource, epochs: int):
        self.source = source
        self.pools = {(e, g): source._load_group(e, g) for e in range(epochs) for g in range(len(source._groups(e)))}

    def next_batch(self, batch_size: int) -> torch.Tensor:
        s = self.source
        pool = self.pools[(s.epoch, s.group)]
        if s.offset + batch_size > pool.shape[0]:
            s.epoch, s.group = s._next_key(s.epoch, s.group)
            s.offset = 0
            pool = self.pools[(s.epoch, s.group)]
        batch = pool[s.offset : s.offset + batch_size]
        s.offset += batch_size
        return batch.float()


def train_rate(stacks_cfg: SweepConfig, d: int, source, steps: int, batch: int) -> float:
    stacks = build_stacks(stacks_cfg, d, torch.device("cpu"))
    trainer = Trainer(stacks, lr=1e-3)
    trainer.step(source.next_batch(batch))
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(source.next_batch(batch))
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="", help="a run.py model (default: a random GPT-2 built here)")
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--layer_loc", default="mlp")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--rows_per_chunk", type=int, default=128)
    p.add_argument("--n_chunks", type=int, default=4)
    p.add_argument("--model_batch_size", type=int, default=32)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--train_steps", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    tune_allocator()
    lm = (
        load_language_model(a.model_name, torch.device("cpu"))
        if a.model_name
        else random_gpt2(a.n_embd, a.n_layer, a.ctx)
    )
    hook = lm.hook_for(a.layer, a.layer_loc)
    vocab = lm.model.get_input_embeddings().num_embeddings
    tokens = torch.randint(0, vocab, (a.rows_per_chunk * a.n_chunks, a.ctx), generator=torch.Generator().manual_seed(0))

    def forward(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {hook: lm.activations(t, [hook])[hook].float().cpu()}

    def forward_only() -> float:
        start = time.perf_counter()
        for j in range(0, tokens.shape[0], a.model_batch_size):
            forward(tokens[j : j + a.model_batch_size])
        return time.perf_counter() - start

    def caching(folder: Path) -> float:
        start = time.perf_counter()
        spec = StoreSpec(folder, {"model": lm.name, "hook_name": hook, "dtype": a.dtype}, hook)
        rows = TensorRows(tokens)
        cache_activations([spec], rows, forward, a.n_chunks, a.rows_per_chunk, a.model_batch_size, progress=False)
        return time.perf_counter() - start

    forward(tokens[: a.model_batch_size])  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        timings = [(forward_only(), caching(Path(tmp) / f"r{r}")) for r in range(a.rounds)]  # alternating
        t_forward = statistics.median(t[0] for t in timings)
        t_cache = statistics.median(t[1] for t in timings)
        overhead = statistics.median(1 - t[0] / t[1] for t in timings)
        data = ActivationDataset.open(Path(tmp) / "r0")
        n_tok = tokens.numel()
        print(
            json.dumps(
                {
                    "bench": "caching",
                    "model": lm.name,
                    "hook": hook,
                    "dtype": a.dtype,
                    "tokens": n_tok,
                    "tokens_per_s": round(n_tok / t_cache),
                    "forward_only_tokens_per_s": round(n_tok / t_forward),
                    "overhead": round(overhead, 4),
                }
            ),
            flush=True,
        )

        cfg = SweepConfig(l1_exp_low=-2, l1_exp_high=2, dict_ratio_exp_low=0, dict_ratio_exp_high=1, seed=0)
        ids = list(range(data.n_chunks))
        epochs = 1 + (a.train_steps + 1) * a.batch_size // tokens.numel()
        memory = MemorySource(ChunkSource(data, ids, 0, torch.device("cpu"), 1), epochs)
        # Alternating rounds, so drift in the machine's speed hits both sides alike.
        rounds = []
        for _ in range(a.rounds):
            disk_src = ChunkSource(data, ids, 0, torch.device("cpu"), 1)
            memory.source.epoch = memory.source.group = memory.source.offset = 0
            rounds.append(
                (
                    train_rate(cfg, data.d, disk_src, a.train_steps, a.batch_size),
                    train_rate(cfg, data.d, memory, a.train_steps, a.batch_size),
                )
            )
        disk = statistics.median(r[0] for r in rounds)
        mem = statistics.median(r[1] for r in rounds)
        ratio = statistics.median(r[0] / r[1] for r in rounds)
        print(
            json.dumps(
                {
                    "bench": "train_from_disk",
                    "d_in": data.d,
                    "n_models": 5,
                    "dict_sizes": cfg.dict_sizes(data.d),
                    "disk_tokens_per_s": round(disk),
                    "memory_tokens_per_s": round(mem),
                    "ratio": round(ratio, 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
