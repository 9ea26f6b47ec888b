#!/usr/bin/env bash
# One short GPU session: checks the CUDA paths and measures throughput; every line it prints is JSON or a log line.
# Usage (on the GPU box, from the repo root, after `make setup`):  bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
out=${1:-outputs/gpu_check}
mkdir -p "$out"
py=${PY:-.venv/bin/python}
$py -c "import torch, json; print(json.dumps({'cuda': torch.cuda.is_available(), 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'torch': torch.__version__}))"
# Training-step throughput against this GPU's matmul roofline (fp32), the three shapes of the CPU figures and a big one.
$py bench/sae_step.py --device cuda --arch relu --d_in 512 --d_sae 8192 --batch 4096
$py bench/sae_step.py --device cuda --arch topk --k 32 --d_in 512 --d_sae 8192 --batch 4096
$py bench/sae_step.py --device cuda --arch relu --d_in 128 --d_sae 1024 --batch 4096 --n_models 8
$py bench/sae_step.py --device cuda --arch topk --k 64 --d_in 768 --d_sae 24576 --batch 8192 --steps 20
# The toy replication at paper size, shortened so it fits a few minutes; says how long 1 000 steps take.
start=$(date +%s)
$py replicate_toy_models.py --preset paper --device cuda --n_steps 1000 --checkpoint_every 0 --out "$out/toy_paper_1k"
echo "{\"bench\": \"toy_paper_1000_steps\", \"seconds\": $(( $(date +%s) - start ))}"
