"""The tiny transformer: corpus files, one process vs torchrun DDP, exact resume after a kill, the checkpoint
contract with hooks, and clear failures. Everything runs on a small generated corpus in tmp_path."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import one_thread
from safetensors.numpy import load_file

import train_tiny
from argparser import read_config_file
from sparse_coding.data.corpus import (
    EOT_TOKEN,
    find_text_files,
    open_tokens,
    prepare_hub_corpus,
    prepare_text_corpus,
    read_meta,
    token_path,
)
from sparse_coding.models.nanogpt import GPT, GPTConfig, load_checkpoint
from sparse_coding.models.nanogpt_train import (
    STATE_FILE,
    TrainConfig,
    read_train_state_info,
    unigram_cross_entropy,
)

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "train_tiny.py")
TINY = [
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--block_size=32",
    "--dropout=0.1",  # on: DDP and resume must reproduce the dropout masks too
    "--batch_size=8",
    "--micro_batch_size=2",
    "--learning_rate=3e-3",
    "--min_lr=3e-4",
    "--warmup_iters=2",
    "--log_interval=1",
    "--eval_interval=3",
    "--eval_iters=2",
    "--checkpoint_interval=2",
    "--sample_tokens=8",
    "--device=cpu",
]
SUBJECTS = ["the cat", "a dog", "my neighbour", "the old sailor", "every child", "the teacher", "a small bird"]
VERBS = ["sees", "likes", "follows", "draws", "finds", "remembers", "carries"]
OBJECTS = ["the red ball", "a long letter", "the quiet river", "an open door", "the morning train", "a green hat"]
ENDINGS = ["in the garden", "after dinner", "near the station", "every morning", "with great care", "at night"]


def _write_texts(folder: Path, n_docs: int = 30, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for d in range(n_docs):
        sentences = [
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}.".capitalize()
            for _ in range(rng.randint(40, 80))
        ]
        (folder / f"doc_{d:02d}.txt").write_text(" ".join(sentences) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    _write_texts(root / "texts")
    prepare_text_corpus(find_text_files(root / "texts"), root / "data", vocab_size=320, val_fraction=0.2)
    return root / "data"


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "ckpt"
    train_tiny.main([*TINY, f"--data_dir={corpus}", f"--out_dir={out}", "--max_iters=4"])
    return out


def _train(corpus: Path, out: Path, *extra: str, nproc: int = 0, timeout: int = 120) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc else [sys.executable]), TRAIN, *TINY, f"--data_dir={corpus}", f"--out_dir={out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _log(out: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def test_corpus_files(corpus):
    meta = read_meta(corpus)
    assert meta["vocab_size"] <= 320 and meta["dtype"] == "uint16" and meta["train_documents"] > meta["val_documents"]
    for split in ("train", "val"):
        tokens = load_file(str(token_path(corpus, split)))["tokens"]  # the streamed file is plain safetensors
        assert len(tokens) == meta[f"{split}_tokens"] and np.array_equal(tokens, open_tokens(token_path(corpus, split)))
        assert tokens[-1] == meta["eot_token_id"]  # every document ends with <|endoftext|>
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    text = "The old sailor finds an open door, ünïcode and all!"
    assert tok.decode(tok.encode(text).ids) == text and tok.token_to_id(EOT_TOKEN) == meta["eot_token_id"]


def test_unigram_cross_entropy_is_the_best_context_free_loss():
    uniform = np.full(50, 1000)
    assert unigram_cross_entropy(uniform, uniform) == pytest.approx(np.log(50))
    skewed = np.array([900_000, 90_000, 10_000])
    p = skewed / skewed.sum()
    assert unigram_cross_entropy(skewed, skewed) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-4)


def test_shipped_configs_parse():
    fields = set(TrainConfig.__dataclass_fields__)
    configs = sorted((ROOT / "nanoGPT_config").glob("*.py"))
    assert {"supertiny.py", "cpu_default.py", "gpu_default.py"} <= {p.name for p in configs}
    for path in configs:
        assert set(read_config_file(path)) <= fields, path
    st = read_config_file(ROOT / "nanoGPT_config" / "supertiny.py")
    assert (st["n_layer"], st["n_embd"], st["n_head"], st["dropout"], st["block_size"], st["batch_size"]) == (
        6,
        16,
        8,
        0.2,
        256,
        64,
    )


def test_checkpoint_loads_and_hooks_give_activations(one_process):
    summary = json.loads((one_process / "train_summary.json").read_text())
    assert set(summary) == {"val_loss", "unigram_entropy", "tokens_seen"} and summary["tokens_seen"] == 4 * 8 * 32
    model, tokenizer, config = load_checkpoint(one_process)
    assert isinstance(model, GPT) and not model.training and config["n_embd"] == 32 and config["step"] == 4
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    ids = torch.tensor([tokenizer.encode("The cat sees the red ball in the garden. A dog follows")[:16]] * 3)
    B, T = ids.shape
    names = ["transformer.h.0.mlp", "transformer.h.1.attn", "transformer.h.1", "transformer.wte", "transformer.ln_f"]
    acts: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n in names]
    with torch.no_grad():
        logits = model(ids)
    for h in handles:
        h.remove()
    for n in names:
        assert isinstance(acts[n], torch.Tensor) and acts[n].shape == (B, T, 32), n
    assert logits.shape == (B, T, config["vocab_size"])
    with torch.no_grad():  # the residual stream after the last block is what ln_f and the tied head read
        assert torch.allclose(model.lm_head(model.transformer.ln_f(acts["transformer.h.1"])), logits, atol=1e-5)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert tokenizer.decode(ids[0].tolist()).startswith("The cat")


def test_two_processes_match_one(corpus, one_process, tmp_path):
    out = tmp_path / "two"
    r = _train(corpus, out, "--max_iters=4", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _log(one_process, "train_loss"), _log(out, "train_loss")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert _log(out, "val_loss")[3] == pytest.approx(_log(one_process, "val_loss")[3], rel=1e-4)
    assert json.loads((out / "config.json").read_text())["training"]["batch_size"] == 8


def test_resume_after_kill_matches_unbroken_run(corpus, tmp_path):
    steps = ["--max_iters=60", "--checkpoint_interval=1"]
    with one_thread():  # the unbroken run here, on one thread as the killed one's OMP_NUM_THREADS=1 gives it
        train_tiny.main([*TINY, f"--data_dir={corpus}", f"--out_dir={tmp_path / 'full'}", *steps])

    out = tmp_path / "killed"
    cmd = [sys.executable, TRAIN, *TINY, f"--data_dir={corpus}", f"--out_dir={out}", *steps]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:
        if "step 3: saved" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = read_train_state_info(out / STATE_FILE)["step"]
    assert 3 <= killed_at < 60, "the run finished before the kill landed"
    assert not (out / "config.json").exists()

    resumed = _train(corpus, out, *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out} from step {killed_at}" in resumed.stdout
    assert _log(out, "train_loss")[60] == pytest.approx(_log(tmp_path / "full", "train_loss")[60], rel=1e-6)
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert all(np.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in b)
    s1, s2 = (json.loads((p / "train_summary.json").read_text()) for p in (out, tmp_path / "full"))
    assert s1["val_loss"] == pytest.approx(s2["val_loss"], rel=1e-5) and s1["tokens_seen"] == s2["tokens_seen"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n_embd=30", "--n_head=4"], "n_embd (30) must be divisible by n_head (4)"),
        (["--block_size=100000"], "block_size (100000) is larger than the data"),
        (["--data_dir=/nonexistent/corpus"], "no prepared corpus in '/nonexistent/corpus'"),
        (["--config=BADCFG"], "unknown field(s): n_layers"),
    ],
)
def test_bad_configs_fail_with_one_clear_message(corpus, tmp_path, args, message):
    bad_cfg = tmp_path / "bad.py"
    bad_cfg.write_text("n_layers = 3  # a typo of n_layer\n")
    args = [a.replace("BADCFG", str(bad_cfg)) for a in args]
    r = _train(corpus, tmp_path / "out", *args, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert not (tmp_path / "out" / "config.json").exists()


def test_hub_path_runs_on_a_local_dataset(tmp_path, corpus):
    """The real datasets.load_dataset / AutoTokenizer code, fed a local dataset folder and a local tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok_dir = tmp_path / "tok"
    tok = Tokenizer.from_file(str(corpus / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT_TOKEN).save_pretrained(tok_dir)
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    texts = [f"Document {i}: the cat sees the red ball." for i in range(200)]
    (ds_dir / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    meta = prepare_hub_corpus(str(ds_dir), tmp_path / "out", str(tok_dir), val_fraction=0.05, num_proc=1)
    assert meta["train_documents"] == 190 and meta["val_documents"] == 10
    assert len(open_tokens(token_path(tmp_path / "out", "train"))) == meta["train_tokens"]


def test_model_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        GPT(GPTConfig(n_embd=30, n_head=4))
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=16))
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))
