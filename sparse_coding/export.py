"""SAEs and their interpretations out to the community's places.

    python -m sparse_coding.export neuronpedia RUN_DIR [--out DIR]      # the JSON Neuronpedia's upload takes
    python -m sparse_coding.export hub RUN_DIR org/repo [--dry-run]     # the SAE folders to a Hugging Face repo

`neuronpedia` reads the interpret folders of a run (RUN_DIR/interpret_*/, or RUN_DIR itself when it is one) and
writes, per interpreted SAE, `<out>/<sae>/batch-0.json` in the dashboard batch layout SAEDashboard produces for
Neuronpedia uploads ({"model_id", "layer", "sae_set", "features": [{"feature_index", "activations": [{"bin_min",
"bin_max", "bin_contains", "tokens", "values"}], "pos_str", "pos_values", "neg_str", "neg_values", "frac_nonzero",
"freq_hist_data_bar_values", "freq_hist_data_bar_heights", "n_prompts_total", "n_tokens_in_prompt", "dataset", ...}]})
and `<out>/<sae>/explanations.json` ([{"modelId", "layer", "index", "description", "explanationModelName",
"typeName", "score"}]). Top examples come as the bin [-1, -1] (SAEDashboard's mark for them), the quantile
examples with their activation interval. Fields we do not compute (neuron alignment, correlated features, the logit
histogram) are empty lists. Default out: RUN_DIR/neuronpedia/.

`hub` uploads RUN_DIR/saes/ (every SAE folder: cfg.json, sae_weights.safetensors, sparsity.safetensors) and the run's
config.json and results.json with huggingface_hub (token from `huggingface-cli login` or HF_TOKEN); --dry-run prints
what would go where and sends nothing.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sparse_coding.errors import UserError
from sparse_coding.files import read_json, write_json

TOP_BIN = -1.0  # SAEDashboard's bin_min/bin_max for a feature's top activating examples


def interpret_folders(run_dir: Path) -> list[Path]:
    """The interpret folders under a run folder (or the folder itself when it is one)."""
    if (run_dir / "features").is_dir():
        return [run_dir]
    found = sorted(p for p in run_dir.glob("interpret_*") if (p / "features").is_dir())
    if not found:
        raise UserError(f"{run_dir} holds no interpret folder (run `python interpret.py --run_dir {run_dir}` first)")
    return found


def layer_of(hook: str | None) -> int:
    """The layer number in a hook name (transformer.h.3.mlp → 3; 0 when it names none)."""
    found = re.search(r"\.(\d+)(?:\.|$)", hook or "")
    return int(found.group(1)) if found else 0


def neuronpedia_feature(r: dict[str, Any], n_rows: int, context: int, dataset: str) -> dict[str, Any]:
    """One feature's JSON (interpret.py's) in the dashboard batch layout."""
    rec = r["record"]
    hist = r.get("density_histogram") or rec.get("histogram") or {}
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    activations = [
        {"bin_min": TOP_BIN, "bin_max": TOP_BIN, "bin_contains": 1.0, "tokens": w["tokens"], "values": w["activations"]}
        for w in [*rec["train_top"], *rec["test_top"]]
    ]
    quantiles = r.get("quantile_examples") or []
    for q in quantiles:
        lo, hi = q["interval"]
        share = 1.0 / len(quantiles)  # equal-count bins of the firing windows
        activations += [
            {"bin_min": lo, "bin_max": hi, "bin_contains": share, "tokens": w["tokens"], "values": w["activations"]}
            for w in q["examples"]
        ]
    pos, neg = r.get("top_logits") or [], r.get("bottom_logits") or []
    return {
        "feature_index": int(r["feature_index"]),
        "neuron_alignment_indices": [],
        "neuron_alignment_values": [],
        "neuron_alignment_l1": [],
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": [],
        "correlated_features_l1": [],
        "correlated_features_pearson": [],
        "neg_str": [t for t, _ in neg],
        "neg_values": [float(v) for _, v in neg],
        "pos_str": [t for t, _ in pos],
        "pos_values": [float(v) for _, v in pos],
        "frac_nonzero": float(rec["firing_rate"]),
        "freq_hist_data_bar_values": [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)],
        "freq_hist_data_bar_heights": [float(c) for c in counts],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "n_prompts_total": n_rows,
        "n_tokens_in_prompt": context,
        "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": activations,
    }


def export_neuronpedia(run_dir: Path, out: Path, model_id: str = "", sae_set: str = "") -> list[Path]:
    """Writes the Neuronpedia batch and explanations of every interpret folder under run_dir; gives the folders."""
    written = []
    for folder in interpret_folders(run_dir):
        summary = read_json(folder / "summary.json") if (folder / "summary.json").is_file() else {}
        sae_dir = Path(summary.get("sae_dir") or folder.name.removeprefix("interpret_"))
        sae_cfg = read_json(sae_dir / "cfg.json") if (sae_dir / "cfg.json").is_file() else {}
        meta = sae_cfg.get("metadata") or {}
        model = model_id or meta.get("model_name") or summary.get("model_name") or "model"
        layer = layer_of(meta.get("hook_name") or summary.get("hook_name"))
        name = sae_set or sae_dir.name
        feats = sorted((folder / "features").glob("sae_*.json"))
        if not feats:
            continue
        features, explanations = [], []
        rows, context = int(summary.get("n_rows") or 0), int(meta.get("context_size") or 0)
        scorer, dataset = summary.get("scorer", "correlation_all"), str(meta.get("dataset_path") or "")
        for path in tqdm(feats, desc=f"neuronpedia {name}", disable=len(feats) < 50):
            r = read_json(path)
            features.append(neuronpedia_feature(r, rows, context, dataset))
            if r.get("explanation"):
                explanations.append({"modelId": model, "layer": layer, "index": int(r["feature_index"]),
                                     "description": r["explanation"], "explanationModelName": r.get("explainer"),
                                     "typeName": "oai_token-act-pair", "score": r["scores"].get(scorer)})  # fmt: skip
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        write_json(target / "batch-0.json", {"model_id": model, "layer": layer, "sae_set": name, "features": features})
        write_json(target / "explanations.json", explanations)
        written.append(target)
    return written


def hub_files(run_dir: Path) -> list[Path]:
    """The files a hub push sends: every SAE folder's files and the run's config and results."""
    saes = run_dir / "saes"
    if not saes.is_dir():
        raise UserError(f"{run_dir} holds no saes/ folder: not a run folder")
    files = sorted(p for p in saes.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [*(run_dir / n for n in ("config.json", "results.json") if (run_dir / n).is_file()), *files]


def push_to_hub(run_dir: Path, repo_id: str, dry_run: bool = False, private: bool = False) -> list[str]:
    """Uploads the run's SAEs to the hub repository repo_id (created if missing); gives the paths in the repo."""
    files = hub_files(run_dir)
    in_repo = [str(p.relative_to(run_dir)) for p in files]
    if dry_run:
        for path in in_repo:
            print(f"would upload {path} -> {repo_id}/{path}")
        return in_repo
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(repo_id=repo_id, folder_path=str(run_dir), allow_patterns=in_repo,
                          commit_message=f"SAEs from sparse_coding run {run_dir.name}")  # fmt: skip
    except Exception as e:  # the network, the token, the name: one line
        raise UserError(f"cannot push to the Hugging Face hub repository {repo_id}: {type(e).__name__}: {e}") from e
    return in_repo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sparse_coding.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="target", required=True)
    n = sub.add_parser("neuronpedia", help="write the JSON Neuronpedia's upload takes")
    n.add_argument("run_dir", help="a run.py run folder with interpret_*/ folders, or one interpret folder")
    n.add_argument("--out", default="", help="where the JSON goes (default RUN_DIR/neuronpedia)")
    n.add_argument("--model_id", default="", help="Neuronpedia's model id (default: the SAE's model_name)")
    n.add_argument("--sae_set", default="", help="Neuronpedia's SAE set name (default: the SAE's folder name)")
    h = sub.add_parser("hub", help="push the run's SAE folders to a Hugging Face hub repository")
    h.add_argument("run_dir", help="a run.py or replicate_toy_models.py run folder")
    h.add_argument("repo_id", help="org/repo on the hub")
    h.add_argument("--dry-run", action="store_true", help="print what would be uploaded; send nothing")
    h.add_argument("--private", action="store_true", help="create the repository private")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a folder")
    if a.target == "neuronpedia":
        for folder in export_neuronpedia(run_dir, Path(a.out) if a.out else run_dir / "neuronpedia", a.model_id,
                                         a.sae_set):  # fmt: skip
            print(f"wrote {folder}/batch-0.json and explanations.json")
    else:
        sent = push_to_hub(run_dir, a.repo_id, a.dry_run, a.private)
        print(f"{'would push' if a.dry_run else 'pushed'} {len(sent)} files to {a.repo_id}")


if __name__ == "__main__":
    from utils import run_main

    run_main(lambda: main(sys.argv[1:]))
