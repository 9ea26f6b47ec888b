"""Turn text into activations of a language model, train a sweep of SAEs on them, and report metrics and plots.

    python run.py                                        # offline default: our tiny model on the offline corpus
    python run.py --model_name gpt2 --layer 2 --layer_loc mlp --dataset_name NeelNanda/pile-10k
    python run.py --model_name path/to/hf_model --hook_name transformer.h.3.mlp --dataset_name my_texts/
    python run.py --arch topk --k_values 16 32 64        # TopK k × size instead of l1 × size
    python run.py --layers 0 1 2                          # one store and one sweep per layer, one forward pass
    python run.py --transcode                             # transcoders: the MLP's input → its output
    python run.py --activations_dir my_acts/              # your own .npy/.safetensors [N, d] files, no model

Activations are stored under data/activations/ (or --activations_dir) and reused by later runs on the same model,
hook and data. A killed run resumes from its checkpoint when rerun with the same --out.
"""

from __future__ import annotations

import sys

from argparser import parse_config
from sparse_coding.pipelines.lm import PRESETS, RunConfig, run_lm
from utils import run_folder, run_main, seed_everything, tune_allocator


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(RunConfig, __doc__, argv, presets=PRESETS, default_preset="default")
    with run_folder(cfg.out or None, f"lm_{cfg.preset}", kind="lm") as out_dir:
        tune_allocator()
        seed_everything(cfg.seed)
        results = run_lm(cfg, out_dir)
    if results:  # under torchrun only rank 0 reports
        by_hook = results.get("by_hook") or {results["hook_name"]: results}
        n = sum(len(r["runs"]) for r in by_hook.values())
        print(f"{n} SAEs trained on {', '.join(map(str, by_hook))}; results in {out_dir}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
