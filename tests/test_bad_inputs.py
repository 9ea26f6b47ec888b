"""A hostile new user's table of bad inputs over every entry point: flags, files, stores, configs and the network.

Each case must end with exit code 2 and one line on stderr that names the problem, never a traceback, and must
leave every file that existed before byte-identical (and add none). The entries run in this process (their
`run_main(main)` path, as the scripts do), so the table stays fast; a few faults that need a real process (a file
size limit standing in for a full disk) run as subprocesses at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lm_fixtures import smoke_run_args
from safetensors.torch import load_file, save_file

import evaluate
import interpret
import replicate_toy_models
import run
import train_tiny
from utils import run_main
from vastai.box import main as vastai_main

ROOT = Path(__file__).resolve().parents[1]
ENTRIES: dict[str, Callable[[list[str]], object]] = {
    "toy": replicate_toy_models.main,
    "run": run.main,
    "interpret": interpret.main,
    "evaluate": evaluate.main,
    "tiny": train_tiny.main,
    "vastai": vastai_main,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small world to break: a tiny GPT-2 and corpus, a finished smoke run (its store and SAEs), bad files."""
    root = tmp_path_factory.mktemp("world")
    args = smoke_run_args(root)
    run.main([*args, "--out", str(root / "done"), "--n_steps", "10"])
    store = root / "acts"
    w = {"root": root, "args": args, "store": store, "done": root / "done"}
    w["sae"] = next((root / "done" / "saes").iterdir())

    nan_store = root / "nan_store"  # a copy of the store with NaN in a few rows of its first chunk
    shutil.copytree(store, nan_store)
    chunk = load_file(str(nan_store / "chunk_00000.safetensors"))
    chunk["activations"][3:6] = float("nan")
    save_file(chunk, str(nan_store / "chunk_00000.safetensors"))
    bad_manifest = root / "bad_manifest"
    shutil.copytree(store, bad_manifest)
    (bad_manifest / "manifest.json").write_text("{ not json")
    sae_on_nan = root / "sae_on_nan"  # an SAE folder whose metadata points at the NaN store
    shutil.copytree(w["sae"], sae_on_nan)
    cfg = json.loads((sae_on_nan / "cfg.json").read_text())
    cfg["metadata"]["activations_dir"] = str(nan_store)
    (sae_on_nan / "cfg.json").write_text(json.dumps(cfg))

    (root / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9 au lait, na\xefve"}\n' * 50)
    (root / "bad.yaml").write_text("n_steps: [1, 2\n")
    (root / "unknown.yaml").write_text("n_stepz: 5\n")
    (root / "types.json").write_text('{"n_steps": "many"}')
    (root / "evil.py").write_text(f"n_steps = __import__('os').system('touch {root}/pwned')\n")
    (root / "evil2.py").write_text("n_steps = ().__class__.__bases__[0].__subclasses__()\n")
    (root / "a_file").write_text("I am a file\n")
    foreign = root / "foreign"  # a folder this tool did not make: a copy of a model checkpoint
    shutil.copytree(root / "gpt2", foreign)
    keep = root / "keep" / "checkpoint"  # `mkdir -p o/checkpoint && echo x > o/checkpoint/keep.txt`
    keep.mkdir(parents=True)
    (keep / "keep.txt").write_text("x\n")
    return w


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


# (entry, argv with {root} {store} ... placeholders, a piece of the one-line message)
S = ["--n_steps", "5"]
CASES = [
    # flags: values, ranges, choices, types
    ("toy", ["--lr", "nan"], "lr must be a finite number"),
    ("toy", ["--lr", "inf"], "lr must be a finite number"),
    ("toy", ["--lr", "-1"], "lr must be > 0"),
    ("toy", ["--mean_active", "nan"], "mean_active must be a finite number"),
    ("toy", ["--l1_exp_base", "nan"], "l1_exp_base must be a finite number"),
    ("toy", ["--dict_ratio_exp_base", "inf"], "dict_ratio_exp_base must be a finite number"),
    ("toy", ["--l1_norm", "bogus"], "l1_norm must be one of dict_size, none"),
    ("toy", ["--arch", "nope"], "unknown architecture 'nope'"),
    ("toy", ["--magnitude", "gaussian"], "magnitude must be one of"),
    ("toy", ["--feature_decay", "1.5"], "feature_decay must be ≤ 1"),
    ("toy", ["--n_steps", "0"], "n_steps must be > 0"),
    ("toy", ["--batch_size", "-5"], "batch_size must be > 0"),
    ("toy", ["--mmcs_threshold", "1.5"], "mmcs_threshold must be < 1"),
    ("toy", ["--seed", "-1"], "seed must be ≥ 0"),
    ("toy", ["--k_values", "0"], "k_values must be > 0"),
    ("toy", ["--l1_exp_low", "5", "--l1_exp_high", "1"], "each *_exp_low must be at most its *_exp_high"),
    ("toy", ["--l1_exp_base", "1e300", "--l1_exp_high", "5"], "leave the floating-point range"),
    ("toy", ["--arch", "topk", "--k_values", "1000"], "larger than the smallest dictionary"),
    ("toy", ["--preset", "smoke", "--parallel", "latents"], "start it with torchrun"),
    ("toy", ["--compare", "all"], "--compare is gone: --arch all"),
    ("toy", ["--dict_ratio_exp_high", "30"], "the sweep needs about"),
    ("toy", ["--n_steps", "abc"], "invalid int value: 'abc'"),
    ("toy", ["--no_such_flag", "1"], "unrecognized arguments"),
    ("toy", ["--preset", "huge"], "invalid choice: 'huge'"),
    # config files
    ("toy", ["--config", "{root}/missing.yaml"], "not found"),
    ("toy", ["--config", "{root}/bad.yaml"], "is not valid YAML"),
    ("toy", ["--config", "{root}/unknown.yaml"], "unknown field(s): n_stepz"),
    ("toy", ["--config", "{root}/types.json"], "field n_steps: expected int, got 'many'"),
    ("toy", ["--config", "{root}/evil.py"], "not a plain value"),
    ("toy", ["--config", "{root}/evil2.py"], "not a plain value"),
    ("tiny", ["--config", "{root}/evil.py"], "not a plain value"),
    # output folders: never write into, or delete from, what this tool did not make
    ("toy", ["--preset", "smoke", "--out", "{root}/foreign"], "not empty and was not made by this tool"),
    ("toy", ["--preset", "smoke", "--out", "{root}/a_file"], "is a file, not a folder"),
    ("toy", ["--preset", "smoke", "--out", "{root}/done"], "holds a lm run, not a toy run"),
    ("run", ["{args}", "--out", "{root}/keep"], "not empty and was not made by this tool"),
    ("run", ["{args}", "--out", "{root}/done"], "already holds a finished run"),
    # models, data, stores
    ("run", ["{args}", "--model_name", "./no/such/model", "--out", "{root}/o1"], "model folder './no/such/model'"),
    (
        "run",
        ["{args}", "--dataset_name", "{root}/missing.jsonl", "--out", "{root}/o2", "--activations_dir", "{root}/s2"],
        "not found",
    ),
    (
        "run",
        ["{args}", "--dataset_name", "{root}/latin1.jsonl", "--out", "{root}/o3", "--activations_dir", "{root}/s3"],
        "latin1.jsonl",
    ),
    (
        "run",
        ["{args}", "--activations_dir", "{root}/bad_manifest", "--out", "{root}/o4"],
        "manifest.json is not valid JSON",
    ),
    (
        "run",
        ["{args}", "--activations_dir", "{root}/nan_store", "--out", "{root}/o5", *S],
        "chunk_00000.safetensors holds NaN",
    ),
    (
        "run",
        ["{args}", "--hook_name", "transformer.h.9.mlp", "--out", "{root}/o6"],
        "has no module 'transformer.h.9.mlp'",
    ),
    ("run", ["{args}", "--layer", "7", "--out", "{root}/o7"], "layer 7 is out of range"),
    ("run", ["{args}", "--layer_loc", "bogus"], "layer_loc must be one of"),
    ("run", ["{args}", "--arch", "clt", "--transcode"], "always transcodes each layer's MLP"),
    ("run", ["{args}", "--arch", "clt_jumprelu", "--layers", "1", "0"], "give --layers in increasing order"),
    ("run", ["{args}", "--arch", "clt", "--hook_name", "h.0.mlp"], "choose the layers with --layers"),
    ("run", ["{args}", "--arch", "crosscoder", "--transcode"], "reconstructs the hooks it reads at --layer_loc"),
    ("run", ["{args}", "--diff_model", "{root}/gpt2"], "--diff_model trains a crosscoder on both models' activations"),
    ("run", ["{args}", "--arch", "crosscoder", "--diff_model", "{root}/gpt2", "--layers", "0", "1"], "not --layers"),
    ("run", ["{args}", "--chunk_size_tokens", "100"], "must be a multiple of max_length"),
    ("run", ["{args}", "--n_eval_chunks", "3"], "must leave at least one chunk for training"),
    (
        "run",
        ["{args}", "--max_length", "100000", "--chunk_size_tokens", "100000", "--out", "{root}/o8"],
        "longer than",
    ),
    ("run", ["{args}", "--parallel", "bogus"], "parallel must be one of models, data"),
    ("run", ["{args}", "--activations", "stream"], "--activations stream writes no store and reads none"),
    ("run", ["{args}", "--activations", "tape"], "activations must be one of disk, stream"),
    ("run", ["{args}", "--activation_dtype", "fp8"], "activation_dtype must be one of"),
    ("run", ["{args}", "--load_autoencoders", "{root}/nope", "--out", "{root}/o9"], "--load_autoencoders"),
    ("run", ["{args}", "--activations_dir", "{root}/a_file/store", "--out", "{root}/o10"], "a_file"),
    # evaluate: SAE folders, data, hooks, steering
    ("evaluate", [], "--sae_dir is required"),
    ("evaluate", ["--sae_dir", "{root}/nope", "--out", "{root}/e1"], "neither an SAE folder"),
    ("evaluate", ["--sae_dir", "{root}/sae_on_nan", "--n_eval_chunks", "3", "--out", "{root}/e2"], "NaN"),
    ("evaluate", ["--sae_dir", "{sae}", "--dataset_name", "{root}/missing.jsonl", "--out", "{root}/e3"], "not found"),
    ("evaluate", ["--sae_dir", "{sae}", "--hook_name", "transformer.h.0.nope", "--out", "{root}/e4"], "has no module"),
    ("evaluate", ["--sae_dir", "{sae}", "--probe_k", "0"], "probe_k must be > 0"),
    ("evaluate", ["--sae_dir", "{sae}", "--steer", "3=1"], "--steer needs --prompt"),
    ("evaluate", ["--sae_dir", "{sae}", "--steer", "x=1", "--prompt", "a", "--out", "{root}/e5"], "LATENT=VALUE"),
    ("evaluate", ["--sae_dir", "{sae}", "--steer_mode", "boost"], "steer_mode must be one of"),
    ("evaluate", ["--sae_dir", "{root}/done", "--steer", "1=1", "--prompt", "a", "--out", "{root}/e6"], "one SAE"),
    # interpret: SAEs, stores, settings, the network
    ("interpret", ["--sae_dir", "{root}/nope"], "is not an SAE folder"),
    ("interpret", ["--sae_dir", "{root}/sae_on_nan", "--out", "{root}/i1"], "holds NaN"),
    ("interpret", ["--sae_dir", "{sae}", "--n_features", "0"], "n_features must be > 0"),
    ("interpret", ["--sae_dir", "{sae}", "--baselines", "pca", "bogus"], "baselines must be one of"),
    ("interpret", ["--sae_dir", "{sae}", "--scorer", "bogus"], "scorer must be one of"),
    ("interpret", ["--sae_dir", "{sae}", "--out", "{root}/foreign"], "not empty and was not made by this tool"),
    ("interpret", ["--sae_dir", "{sae}", "--out", "{root}/a_file/sub"], "a_file"),
    (
        "interpret",
        [
            "--sae_dir",
            "{sae}",
            "--out",
            "{root}/i2",
            "--n_features",
            "2",
            "--api_base",
            "https://llm.example.invalid/v1",
        ],
        "OPENAI_API_KEY is not set",
    ),
    (
        "interpret",
        [
            "--sae_dir",
            "{sae}",
            "--out",
            "{root}/i3",
            "--n_features",
            "2",
            "--api_base",
            "http://127.0.0.1:9/v1",
            "--api_key_env",
            "NO_SUCH_KEY_VAR",
        ],
        "NO_SUCH_KEY_VAR",
    ),
    # the tiny transformer
    ("tiny", ["--n_embd", "30", "--n_head", "4"], "n_embd (30) must be divisible by n_head (4)"),
    ("tiny", ["--data_dir", "{root}/nope"], "no prepared corpus"),
    ("tiny", ["--dropout", "1.5"], "dropout must be < 1"),
    ("tiny", ["--dtype", "fp8"], "dtype must be one of auto, float32, bfloat16"),
    ("tiny", ["--compile=maybe"], "--compile takes True or False"),
    # vast.ai boxes (checked before any connection is tried)
    ("vastai", ["ssh", "--host", "127.0.0.1", "--port", "70000"], "port must be < 65536"),
    ("vastai", ["find", "--max_price", "-1"], "max_price must be > 0"),
    ("vastai", ["find", "--config", "{root}/missing.yaml"], "not found"),
]


STARTED = {"o5", "o9"}
PROGRESS = re.compile(r"\d+%\||\[\d\d:\d\d")  # a progress bar's line (tqdm: a model loading, a dataset read)


def _expand(argv: list[str], world: dict) -> list[str]:
    out = []
    for a in argv:
        if a == "{args}":
            out += world["args"]
            continue
        out.append(a.format(root=world["root"], store=world["store"], sae=world["sae"]))
    return out


@pytest.mark.parametrize("entry,argv,message", CASES, ids=[f"{e}:{' '.join(a)[:40]}" for e, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, entry, argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # default outputs/ land here, and must not appear either
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    before, here = snapshot(world["root"]), snapshot(tmp_path)
    args = _expand(argv, world)
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: ENTRIES[entry](args))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not PROGRESS.search(ln)]
    err = "\n".join(lines)
    assert exit_.value.code == 2, err
    assert len(lines) == 1 and err.startswith("error: "), err  # progress bars aside (loading weights), one line
    assert message in err, err
    after = snapshot(world["root"])
    assert {k: after.get(k) for k in before} == before  # nothing that existed changed or went
    # Nothing new either, except inside the run's own --out when it failed after it had started (on a NaN chunk
    # met in training, on saved SAEs that match nothing): there config.json says what was tried.
    out = Path(args[args.index("--out") + 1]) if "--out" in args else None
    new = [k for k in after if k not in before]
    assert all(out is not None and out.name in STARTED and (world["root"] / k).is_relative_to(out) for k in new), new
    assert snapshot(tmp_path) == here and not (world["root"] / "pwned").exists()


def test_latents_that_do_not_split_evenly_over_the_processes_are_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node 3 sets it; refused before any process group
    with pytest.raises(SystemExit) as exit_:
        run_main(
            lambda: replicate_toy_models.main(
                ["--preset", "smoke", "--parallel", "latents", "--out", str(tmp_path / "o")]
            )
        )
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    assert "needs dictionary sizes divisible by 3; 16, 32, 64 are not" in lines[0]
    assert not (tmp_path / "o").exists()


def test_the_table_is_long_enough():
    assert len(CASES) >= 40 and {e for e, _, _ in CASES} == set(ENTRIES)


def test_a_full_disk_is_one_line_and_the_store_stays_resumable(world, tmp_path):
    """A file-size limit makes writes fail as a full disk does (EFBIG; Python ignores SIGXFSZ): the small files are
    written, the first 256 KiB chunk is not; rerunning without the limit finishes the store from where it stopped."""
    store = tmp_path / "store"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        *world["args"],
        "--activations_dir",
        str(store),
        "--out",
        str(tmp_path / "o"),
        "--n_steps",
        "5",
    ]
    limited = subprocess.run(
        ["bash", "-c", 'ulimit -f 100 && exec "$@"', "-", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    err = limited.stderr.strip().splitlines()
    assert limited.returncode == 2 and err[-1].startswith("error: ") and "File too large" in err[-1], limited.stderr
    assert "Traceback" not in limited.stderr
    done = json.loads((store / "manifest.json").read_text())["n_chunks"]
    assert done == 0 and not list(store.glob(".*tmp*"))  # no chunk, and no half-written file left behind
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for i in range(3):
        fresh = load_file(str(store / f"chunk_{i:05d}.safetensors"))
        reference = load_file(str(world["store"] / f"chunk_{i:05d}.safetensors"))
        assert torch.equal(fresh["activations"], reference["activations"])


def test_toy_help_shows_the_default_presets_values(capsys):
    with pytest.raises(SystemExit):
        replicate_toy_models.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--n_steps N_STEPS training steps (default: 2500)" in text  # the cpu preset's, not the dataclass's 3000
    assert "--activation_dim ACTIVATION_DIM d, the dimension of the synthetic activations (default: 64)" in text


def test_every_file_a_run_writes_has_one_mode(world):
    modes = {oct(p.stat().st_mode & 0o777) for p in world["done"].rglob("*") if p.is_file()}
    assert modes == {oct(0o666 & ~_umask())}, modes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
