"""Streaming text: peak memory of caching the first chunks (or, with --activations stream, of training from the
model with nothing stored) does not grow with the corpus, and batched tokenization stays fast.

Generates two JSON Lines corpora (--small_mb, default 10 MB, and --big_mb, default 1 GB) of the same kind of
documents. First the tokenization throughput of the stream (documents read, tokenized in batches and packed
into rows) against one batched call over the same documents already in memory:
  {"bench": "tokenize", "stream_tokens_per_s", "one_batch_tokens_per_s", "ratio", "tokens"}
Then, in alternating rounds, caches --n_chunks chunks of activations from each corpus in a fresh process (the
same model, hook and settings as run.py) and reads that process's peak RSS (VmHWM); one JSON line per process
and one with the medians and their ratio:
  {"bench": "stream_memory", "round", "corpus_mb", "peak_rss_mb", "seconds", "docs_read", "chunks"}
  {"bench": "stream_memory_ratio", "median_peak_rss_mb_<mb>mb", "range_mb_<mb>mb", "big_over_small"}
With --activations stream each process instead trains one TopK SAE (k 32, d_sae = d) for --stream_steps steps of
512 from the model's activations through a --buffer_tokens buffer (run.py --activations stream, in process), so its
peak is model + buffer + SAE, however large the corpus. The corpora are deleted at the end unless --keep. Needs the
offline model (`make tiny`) or --model_name.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "from",
    "at",
    "or",
    "an",
    "which",
    "have",
    "not",
    "but",
    "all",
    "can",
    "one",
    "function",
    "return",
    "value",
    "class",
    "module",
    "object",
    "string",
    "list",
    "file",
    "data",
    "type",
    "error",
    "example",
    "method",
    "call",
    "argument",
    "python",
    "code",
    "default",
    "name",
    "line",
    "system",
    "time",
    "new",
    "first",
    "used",
    "number",
    "set",
]


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """Writes JSON Lines of ~1-3 KB documents until the file reaches `megabytes` MB, in constant memory."""
    rng = random.Random(seed)
    pool = [
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 500)))}) + "\n"
        for _ in range(2000)
    ]
    target, written = megabytes * 2**20, 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            line = pool[rng.randrange(len(pool))]
            f.write(line)
            written += len(line)


def stream_child(args: argparse.Namespace) -> None:
    """Trains one SAE from the model's activations over one corpus, nothing stored; prints peak RSS."""
    from sparse_coding.pipelines.lm import RunConfig, run_lm

    cfg = RunConfig(model_name=args.model_name, dataset_name=args.child, activations="stream", arch="topk",
                    k_values=[32], dict_ratio_exp_high=0, n_steps=args.stream_steps, buffer_tokens=args.buffer_tokens,
                    ce_eval_rows=0, checkpoint_every=0, device="cpu")  # fmt: skip
    start = time.perf_counter()
    Path(args.store).mkdir(parents=True, exist_ok=True)
    run_lm(cfg, Path(args.store), progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_rss_mb": round(peak_rss_kb() / 1024, 1), "seconds": round(seconds, 1)}))


def peak_rss_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def child(args: argparse.Namespace) -> None:
    """Caches the chunks from one corpus, as run.py does, and prints peak RSS and what was read."""
    import torch

    from sparse_coding.activations.caching import CacheConfig, prepare_activations, resolve_targets, store_specs
    from sparse_coding.models.language_model import load_language_model

    cfg = CacheConfig(
        model_name=args.model_name,
        dataset_name=args.child,
        n_chunks=args.n_chunks,
        activations_dir=args.store,
        layer=1,
        layer_loc="mlp",
    )
    start = time.perf_counter()
    lm = load_language_model(cfg.model_name, torch.device("cpu"))
    [data] = prepare_activations(cfg, lm, store_specs(cfg, lm, resolve_targets(cfg, lm)), progress=False)
    seconds = time.perf_counter() - start
    read = {"docs_read": data.manifest["n_docs"], "chunks": data.n_chunks}
    print(json.dumps({"peak_rss_mb": round(peak_rss_kb() / 1024, 1), "seconds": round(seconds, 1), **read}))


def measure_memory(corpus: Path, args: argparse.Namespace, tmp: Path) -> dict:
    store = tmp / f"store_{corpus.stem}"
    cmd = [sys.executable, __file__, "--child", str(corpus), "--store", str(store), "--model_name", args.model_name]
    cmd += ["--n_chunks", str(args.n_chunks), "--activations", args.activations]
    cmd += ["--stream_steps", str(args.stream_steps), "--buffer_tokens", str(args.buffer_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip().splitlines()[-1]
    return json.loads(out)


def measure_tokenize(corpus: Path, model_name: str, n_docs: int, rounds: int) -> dict:
    """Tokens per second of the stream vs one batched call over the same documents already in memory."""
    from itertools import islice

    from sparse_coding.data.text import TokenStream, iter_documents
    from sparse_coding.models.language_model import load_tokenizer

    tok = load_tokenizer(model_name)
    sep = tok.separator()[1]
    docs = list(islice(iter_documents(str(corpus)), n_docs))
    stream_rates, batch_rates, n_tokens = [], [], 0
    for _ in range(rounds):  # alternating, so drift in the machine's speed hits both sides alike
        start = time.perf_counter()
        stream = TokenStream(iter_documents(str(corpus), max_docs=n_docs), tok.encode_batch, sep, 128)
        while stream.take(64) is not None:
            pass
        stream_rates.append(stream.n_tokens / (time.perf_counter() - start))
        start = time.perf_counter()
        ids = tok.encode_batch(docs)
        flat = [t for doc in ids for t in (*doc, sep)]
        batch_rates.append(len(flat) / (time.perf_counter() - start))
        n_tokens = len(flat)
    s, b = statistics.median(stream_rates), statistics.median(batch_rates)
    return {
        "stream_tokens_per_s": round(s),
        "one_batch_tokens_per_s": round(b),
        "ratio": round(s / b, 3),
        "tokens": n_tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="checkpoints/tiny", help="any run.py model (default: the offline one)")
    p.add_argument("--small_mb", type=int, default=10)
    p.add_argument("--big_mb", type=int, default=1024)
    p.add_argument("--n_chunks", type=int, default=3, help="chunks cached (disk)")
    p.add_argument("--activations", default="disk", choices=["disk", "stream"], help="what each process does")
    p.add_argument("--stream_steps", type=int, default=200, help="training steps of a streaming process")
    p.add_argument("--buffer_tokens", type=int, default=2**17, help="a streaming process's shuffle buffer")
    p.add_argument("--tokenize_docs", type=int, default=5000, help="documents for the throughput measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each measurement (medians)")
    p.add_argument("--dir", default="", help="where the corpora are written (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora (in --dir)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--store", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return stream_child(args) if args.activations == "stream" else child(args)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp_name:
        tmp = Path(tmp_name)
        where = Path(args.dir) if args.keep and args.dir else tmp
        corpora = {mb: where / f"corpus_{mb}mb.jsonl" for mb in (args.small_mb, args.big_mb)}
        for mb, corpus in corpora.items():
            if not corpus.exists():
                write_corpus(corpus, mb)
        rate = measure_tokenize(corpora[args.small_mb], args.model_name, args.tokenize_docs, args.rounds)
        print(json.dumps({"bench": "tokenize", **rate}), flush=True)
        # Alternating rounds: a process's peak RSS varies by ~100 MB from run to run here (allocator arenas of
        # the tokenizer's and torch's threads), so each corpus is measured several times and medians compared.
        peaks: dict[int, list[float]] = {mb: [] for mb in corpora}
        for r in range(args.rounds):
            for mb, corpus in corpora.items():
                result = measure_memory(corpus, args, tmp / f"r{r}")
                peaks[mb].append(result["peak_rss_mb"])
                print(json.dumps({"bench": "stream_memory", "round": r, "corpus_mb": mb, **result}), flush=True)
        small, big = (statistics.median(peaks[mb]) for mb in corpora)
        summary = {f"median_peak_rss_mb_{mb}mb": statistics.median(v) for mb, v in peaks.items()}
        ranges = {f"range_mb_{mb}mb": [min(v), max(v)] for mb, v in peaks.items()}
        ratio = round(big / small, 3)
        print(json.dumps({"bench": "stream_memory_ratio", "activations": args.activations, **summary, **ranges,
                          "big_over_small": ratio}))  # fmt: skip


if __name__ == "__main__":
    main()
