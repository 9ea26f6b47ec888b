"""run.py --activations stream: the model runs inside the training loop, nothing is stored; every hook option and
architecture trains; a killed run resumes at the same place in the text to the same results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_fixtures import smoke_run_args
from procs import in_process, kill_after_checkpoint, one_thread
from safetensors.torch import load_file

import evaluate
import interpret
import run

ROOT = Path(__file__).resolve().parents[2]
# 4 096 activations: refills of 128 rows of 16 tokens, so a 60-step run of batches of 128 crosses several shuffle
# periods and, on this corpus, the end of the text (a second epoch).
STREAM = ["--activations", "stream", "--buffer_tokens", "4096"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    args = smoke_run_args(tmp_path_factory.mktemp("stream"))
    i = args.index("--activations_dir")
    return args[:i] + args[i + 2 :]  # a streaming run takes no store


def _args(assets, out, *extra):
    return [*assets, "--out", str(out), *STREAM, *extra]


def test_a_killed_stream_resumes_at_the_same_place_in_the_text(assets, tmp_path, capsys, monkeypatch):
    """Only the killed run needs a process of its own; the others run here, in tmp_path as the killed one does."""
    monkeypatch.chdir(tmp_path)
    extra = ["--arch", "topk", "--n_steps", "60", "--checkpoint_every", "20"]
    unbroken = in_process(capsys, run.main, *_args(assets, tmp_path / "unbroken", *extra))
    assert unbroken.returncode == 0, unbroken.stderr[-2000:]
    assert "nothing written to disk" in unbroken.stdout
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "run.py")]
    kill_after_checkpoint([*cmd, *_args(assets, killed, *extra)], killed, tmp_path, grace=0.2)
    position = load_file(killed / "checkpoint" / "state.safetensors")["data.stream"]
    assert position[0] >= 1  # killed past the first shuffle period: the resume recomputes two refills
    resumed = in_process(capsys, run.main, *_args(assets, killed, *extra))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "unbroken", killed))
    assert {k: v for k, v in a.items() if k != "config"} == {k: v for k, v in b.items() if k != "config"}
    for sae in (tmp_path / "unbroken" / "saes").iterdir():
        same = (sae / "sae_weights.safetensors").read_bytes()
        assert same == (killed / "saes" / sae.name / "sae_weights.safetensors").read_bytes(), sae.name
    assert a["activations"] == "stream" and a["activations_dir"] is None
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.rglob("chunk_*.safetensors"))


@pytest.mark.parametrize(
    "extra",
    [
        ["--layers", "0", "1", "--arch", "batchtopk", "--normalize_activations"],
        ["--transcode", "--skip_connection", "--arch", "jumprelu"],
        ["--hook_names", "h.0.mlp", "--arch", "relu", "--decoder_init_norm", "0.1", "--resample_every", "10"],
        ["--arch", "matryoshka", "--k_values", "4", "--activation_dtype", "bf16"],
        ["--arch", "gated", "--mini_runs", "2"],
    ],
    ids=["layers-batchtopk-normalised", "skip-transcoder-jumprelu", "hook-relu-resampled", "matryoshka-bf16", "gated"],
)
def test_every_hook_option_and_architecture_streams(assets, tmp_path, extra):
    run.main(_args(assets, tmp_path / "r", "--n_steps", "30", *extra))
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    by_hook = results.get("by_hook") or {results["hook_name"]: results}
    assert len(by_hook) == (2 if "--layers" in extra else 1)
    for res in by_hook.values():
        assert res["runs"] and all(r["fvu"] is not None and r["ce_loss_recovered"] is not None for r in res["runs"])
        assert res["activations_dir"] is None
    assert not list(tmp_path.rglob("manifest.json"))


def test_data_parallel_streaming_gathers_one_buffer_for_every_process(assets, tmp_path):
    """Each process runs the model on its share of every refill; the gathered buffer is the one-process buffer, so
    relu (whose loss splits exactly over a batch) trains to the one-process result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["--arch", "relu", "--n_steps", "20"]
    with one_thread():  # the one-process run here, on one thread as torchrun gives each rank
        run.main(_args(assets, tmp_path / "one", *extra))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = subprocess.run([*launcher, str(ROOT / "run.py"), *_args(assets, tmp_path / "two", *extra), "--parallel",
                          "data"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in ("one", "two"))
    for ra, rb in zip(a, b, strict=True):
        assert ra["fvu"] == pytest.approx(rb["fvu"], rel=1e-3) and ra["l0"] == pytest.approx(rb["l0"], rel=1e-3)


def test_a_streamed_run_is_evaluated_and_interpreted_from_its_text(assets, tmp_path):
    """No store to read back: evaluate.py and interpret.py run the model over the text's first rows (a streamed
    run's held-out part) at the SAE's hook."""
    run.main(_args(assets, tmp_path / "r", "--arch", "relu", "--n_steps", "20", "--l1_exp_low", "-1"))
    interpret.main(["--run_dir", str(tmp_path / "r"), "--n_features", "2", "--max_rows", "32", "--baselines", "random",
                    "--out", str(tmp_path / "i")])  # fmt: skip
    summary = json.loads((tmp_path / "i" / "summary.json").read_text())
    assert summary["by_method"]["sae"]["n_features"] == 2 and summary["n_rows"] == 32
    sae = next((tmp_path / "r" / "saes").iterdir())
    evaluate.main(["--sae_dir", str(sae), "--out", str(tmp_path / "e"), "--eval_tokens", "256"])
    scored = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert scored["data"]["kind"] == "text"
    assert scored["saes"][sae.name]["metrics"]["reconstruction_quality"]["explained_variance"] is not None
