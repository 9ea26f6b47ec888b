"""Reproduce the toy-data result: SAEs recover known ground-truth features from superposed activations.

    python replicate_toy_models.py --preset cpu          # a few minutes on 2 cores
    python replicate_toy_models.py --preset paper        # the report's full grid (GPU)
    python replicate_toy_models.py --preset smoke --out /tmp/t
    torchrun --standalone --nproc_per_node 2 replicate_toy_models.py --parallel latents --out /tmp/t  # SAEs split in 2

Writes config.json, results.json, the SAEs (SAELens layout), ground_truth.safetensors and four heatmaps.
A killed run resumes from its checkpoint when rerun with the same --out.
"""

from __future__ import annotations

import sys

from argparser import parse_config
from sparse_coding.errors import ConfigError
from sparse_coding.pipelines.toy import PRESETS, ToyRunConfig, run_toy
from utils import run_folder, run_main, seed_everything, tune_allocator


def main(argv: list[str] | None = None) -> None:
    if any(a == "--compare" or a.startswith("--compare=") for a in argv or []):
        raise ConfigError("--compare is gone: --arch all (or --arch relu,topk) trains the architectures side by side")
    cfg = parse_config(ToyRunConfig, __doc__, argv, presets=PRESETS, default_preset="cpu")
    with run_folder(cfg.out or None, f"toy_{cfg.preset}", kind="toy") as out_dir:
        tune_allocator()
        seed_everything(cfg.seed)
        results = run_toy(cfg, out_dir)
    if not results:  # under torchrun only rank 0 reports
        return
    best = max(results["runs"], key=lambda r: r["mmcs"])
    knob = best["knob"]
    print(f"best MMCS {best['mmcs']:.3f} at {knob}={best[knob]:.4g}, dict_ratio={best['dict_ratio']:g}")
    print(f"results in {out_dir}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
