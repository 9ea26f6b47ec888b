"""Streaming (run.py --activations stream) against the store (cache to disk, then train) on run.py's offline
default: end-to-end training throughput and the FVU each sweep reaches after the same number of tokens.

Both sides train run.py's default sweep (or --arch) with the same trainer and settings on the same text: the store
side caches the chunks its training reads once plus the first, which it skips as the streaming side holds the same
rows out, then trains from them as run.py does (--mix_chunks chunks shuffled together, groups in a random order);
the streaming side runs the model inside the training loop.
Throughput is the tokens trained over the wall time from the first forward pass to the last step (the store side's
caching included). Both sweeps are then scored on the same text, which neither trained on: rows spread evenly over
the rest of the corpus after everything either read (the offline corpus is ordered by topic, so rows right after the
training text would favour whichever side saw that text last). Prints one JSON line per side and one with the
ratio of throughputs and the FVU differences:

    {"side": "store", "cache_s", "train_s", "tokens", "tokens_per_s", "fvu": {sae: fvu}, "l0": {sae: l0}}
    {"side": "stream", "train_s", "tokens", "tokens_per_s", "fvu": {...}, "l0": {...}}
    {"stream_over_store": ..., "fvu_rel_diff_mean": ..., "fvu_rel_diff_max": ...}

Needs the offline model and corpus (`make tiny`) or --model_name/--dataset_name.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparse_coding.activations.batches import ChunkSource  # noqa: E402
from sparse_coding.activations.caching import prepare_activations, resolve_targets, store_specs  # noqa: E402
from sparse_coding.activations.store import ActivationDataset  # noqa: E402
from sparse_coding.activations.streaming import StreamedActivations  # noqa: E402
from sparse_coding.eval.reconstruction import evaluate  # noqa: E402
from sparse_coding.models.language_model import load_language_model  # noqa: E402
from sparse_coding.pipelines.lm import RunConfig  # noqa: E402
from sparse_coding.training.distributed import DistInfo  # noqa: E402
from sparse_coding.training.schedule import Schedule  # noqa: E402
from sparse_coding.training.trainer import Trainer, build_stacks, train  # noqa: E402
from utils import tune_allocator  # noqa: E402


def train_sweep(cfg: RunConfig, d: int, source, device: torch.device) -> tuple[list, float]:
    """Trains a fresh sweep on source's batches; gives the stacks and the seconds it took."""
    stacks = build_stacks(cfg, d, device)
    trainer = Trainer(stacks, lr=cfg.lr, schedule=Schedule.from_config(cfg), grad_clip=cfg.grad_clip)
    start = time.perf_counter()
    train(trainer, source, cfg, None, "bench", progress=False)
    return trainer.export_stacks(), time.perf_counter() - start


def scores(stacks: list, x: torch.Tensor, batch: int) -> dict[str, dict[str, float]]:
    """{"fvu": {sae: FVU}, "l0": {sae: L0}} on rows x."""
    stats = evaluate(stacks, x, batch)
    pairs = [(s.name(m), st, m) for s, st in zip(stacks, stats, strict=True) for m in range(s.n_models)]
    return {"fvu": {n: float(st.fvu[m]) for n, st, m in pairs}, "l0": {n: float(st.l0[m]) for n, st, m in pairs}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="checkpoints/tiny", help="run.py's --model_name")
    p.add_argument("--dataset_name", default="data/pydocs/train.jsonl", help="run.py's --dataset_name")
    p.add_argument("--arch", default="relu", help="run.py's --arch (its default sweep of knobs and sizes)")
    p.add_argument("--n_steps", type=int, default=600, help="training steps of each side")
    p.add_argument("--batch_size", type=int, default=512, help="tokens per step")
    p.add_argument("--buffer_tokens", type=int, default=2**17, help="the streaming side's shuffle buffer")
    p.add_argument("--eval_rows", type=int, default=256, help="context rows of fresh text both sweeps are scored on")
    p.add_argument("--mix_chunks", type=int, default=2, help="the store side's chunks shuffled together (run.py's)")
    p.add_argument("--seed", type=int, default=0, help="the SAEs' initialisation and both sides' shuffles")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    device = torch.device("cpu")
    base = RunConfig(model_name=args.model_name, dataset_name=args.dataset_name, arch=args.arch, seed=args.seed,
                     n_steps=args.n_steps, batch_size=args.batch_size, mix_chunks=args.mix_chunks, checkpoint_every=0,
                     device="cpu")  # fmt: skip
    tokens = args.n_steps * args.batch_size
    n_chunks = math.ceil(tokens / base.chunk_size_tokens) + base.n_eval_chunks  # each training chunk read once
    lm = load_language_model(args.model_name, device)
    (target,) = resolve_targets(base, lm)

    with tempfile.TemporaryDirectory() as tmp:
        disk = replace(base, activations_dir=str(Path(tmp) / "store"), n_chunks=n_chunks)
        start = time.perf_counter()
        [spec] = store_specs(disk, lm, [target])
        prepare_activations(disk, lm, [spec], progress=False)
        cache_s = time.perf_counter() - start
        store = ActivationDataset.open(spec.folder)  # chunk 0 holds the rows the streaming side holds out
        source = ChunkSource(store, list(range(base.n_eval_chunks, n_chunks)), base.seed, device, base.mix_chunks)
        d = store.d
        stacks_disk, train_s = train_sweep(disk, d, source, device)

    stream_cfg = replace(base, activations="stream", buffer_tokens=args.buffer_tokens)
    streamed = StreamedActivations(lm, target.hook, None, stream_cfg, DistInfo())
    stacks_stream, stream_s = train_sweep(stream_cfg, d, streamed.batches(base.seed, device, base.mix_chunks), device)

    # Text neither trained on: every row after all the store read and all the stream read, a spread sample of them.
    skip = n_chunks * base.rows_per_chunk + streamed.n_eval_rows + tokens // base.max_length + 1
    stream = streamed.open_at(0, 0)
    stream.take(skip)
    rest = torch.cat(list(iter(lambda: stream.take(256), None)))
    if len(rest) < args.eval_rows:
        raise SystemExit("the corpus is too short for fresh evaluation rows after both runs; lower --n_steps")
    eval_tokens = rest[torch.linspace(0, len(rest) - 1, args.eval_rows).long()]
    x_eval = torch.cat([streamed.compute(r) for r in eval_tokens.split(64)]).float()

    on_disk, streaming = scores(stacks_disk, x_eval, 4096), scores(stacks_stream, x_eval, 4096)
    disk_rate, stream_rate = tokens / (cache_s + train_s), tokens / stream_s
    print(json.dumps({"side": "store", "cache_s": round(cache_s, 1), "train_s": round(train_s, 1), "tokens": tokens,
                      "tokens_per_s": round(disk_rate), **on_disk}), flush=True)  # fmt: skip
    print(json.dumps({"side": "stream", "train_s": round(stream_s, 1), "tokens": tokens,
                      "tokens_per_s": round(stream_rate), **streaming}), flush=True)  # fmt: skip
    fvu_disk, fvu_stream = on_disk["fvu"], streaming["fvu"]
    diffs = [abs(fvu_stream[k] - fvu_disk[k]) / fvu_disk[k] for k in fvu_disk]
    print(json.dumps({"stream_over_store": round(stream_rate / disk_rate, 3), "fvu_rel_diff_mean":
                      round(sum(diffs) / len(diffs), 4), "fvu_rel_diff_max": round(max(diffs), 4),
                      "eval_tokens": int(x_eval.shape[0])}))  # fmt: skip


if __name__ == "__main__":
    main()
