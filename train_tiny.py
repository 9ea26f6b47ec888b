"""Train the custom tiny transformer (nanoGPT style) on a prepared corpus; the result is run.py's offline model.

    python train_tiny.py --config nanoGPT_config/cpu_default.py                # make tiny: minutes on 2 cores
    python train_tiny.py --config nanoGPT_config/supertiny.py --max_iters=500  # any setting as --key=value
    torchrun --standalone --nproc_per_node=4 train_tiny.py --config nanoGPT_config/gpu_default.py

The corpus comes from scripts/prepare_corpus.py (`make corpus`). Writes the checkpoint folder --out_dir
(default checkpoints/tiny): config.json, model.safetensors, tokenizer.json, train_summary.json, plus
train_state.safetensors, log.jsonl and sample.txt. Rerunning with the same --out_dir resumes from the last
checkpoint (or continues to a larger --max_iters).
"""

from __future__ import annotations

import sys

from sparse_coding.models.nanogpt_train import parse_train_config, train
from utils import run_main, tune_allocator


def main(argv: list[str] | None = None) -> None:
    cfg = parse_train_config(argv, __doc__)
    tune_allocator()
    train(cfg)


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
