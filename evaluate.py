"""Score SAEs: SAEBench's core metrics, sparse probing, recovery of toy ground truth, and steering.

    python evaluate.py --sae_dir outputs/<run>                   # every SAE of a run.py or toy run folder
    python evaluate.py --sae_dir outputs/<run>/saes/<one> --dataset_name data/pydocs/val.jsonl
    python evaluate.py --sae_dir my_sae --model_name gpt2 --hook_name blocks.2.hook_resid_post \\
        --dataset_name NeelNanda/pile-10k                       # an SAE folder SAELens or anyone else wrote
    python evaluate.py --sae_dir outputs/<run>/saes/<one> --steer 12=8 --prompt "def f(x):"

Writes eval.json and one PNG per question (FVU/L0 frontier, probing accuracy against k, absorption per
hierarchy depth) to --out; --steer prints the next-token distribution before and after the edit (steer.json).
"""

from __future__ import annotations

import sys
from typing import Any

from argparser import parse_config
from sparse_coding.pipelines.evaluate import EVAL_FILE, EvaluateConfig, run_evaluate
from utils import run_folder, run_main


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(EvaluateConfig, __doc__, argv)
    with run_folder(cfg.out or None, "eval", kind="eval") as out_dir:
        result = run_evaluate(cfg, out_dir)
    if cfg.steer:
        print_steering(result)
    else:
        for name, s in result["saes"].items():
            print(summary_line(name, s))
    print(f"results in {out_dir / ('steer.json' if cfg.steer else EVAL_FILE)}")


def summary_line(name: str, s: dict[str, Any]) -> str:
    m = s["metrics"]
    parts = [
        f"L0 {m['sparsity']['l0']:.1f}",
        f"explained variance {m['reconstruction_quality']['explained_variance']:.3f}",
    ]
    for label, cat, key in (("CE score", "model_performance_preservation", "ce_loss_score"),
                            ("KL score", "model_behavior_preservation", "kl_div_score")):  # fmt: skip
        if m[cat][key] is not None:
            parts.append(f"{label} {m[cat][key]:.3f}")
    if s.get("synthetic"):
        parts += [f"MCC {s['synthetic']['mcc']:.3f}", f"MMCS {s['synthetic']['mmcs']:.3f}"]
    return f"{name}: " + ", ".join(parts)


def print_steering(result: dict[str, Any]) -> None:
    print(f"prompt {result['prompt']!r}, {result['mode']} {result['edits']} at {result['hook_name']}")
    print(f"{'before':>32}   {'after':>32}")
    for b, a in zip(result["before"], result["after"], strict=True):
        print(f"{b['token']!r:>24} {b['p']:.4f}   {a['token']!r:>24} {a['p']:.4f}")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
