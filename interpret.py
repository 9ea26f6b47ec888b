"""Explain and score what an SAE's features mean (autointerp), next to neuron / PCA / ICA / random baselines.

    python interpret.py                                   # newest run.py run, its best SAE, offline explainer
    python interpret.py --sae_dir outputs/<run>/saes/<one> --n_features 50
    python interpret.py --api_base http://127.0.0.1:8000/v1 --explainer_model my-model --simulator_model my-model

Writes one JSON per feature, summary.json and index.html; an interrupted run resumes with the features not yet done.
"""

from __future__ import annotations

import sys

from argparser import parse_config
from sparse_coding.pipelines.interpret import InterpretRunConfig, run_interpret
from utils import run_main


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(InterpretRunConfig, __doc__, argv)
    result = run_interpret(cfg)
    summary = result["summary"]
    level = summary["confidence"]["level"]
    for method, s in summary["by_method"].items():
        score = "—" if s["mean_score"] is None else f"{s['mean_score']:.3f}"
        ci = "" if s["interval"] is None else f" [{s['interval'][0]:.3f}, {s['interval'][1]:.3f}]"
        print(f"{method:>8}: mean {summary['scorer']} {score}{ci} over {s['n_scored']} scored features")
    for method, c in summary["comparisons"].items():
        if c["interval"] is not None:
            lo, hi = c["interval"]
            print(f"  SAE − {method}: {c['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({level:.0%}): {c['outcome']}")
    print(summary["verdict"])
    print(f"results in {result['out']} (open index.html)")


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
