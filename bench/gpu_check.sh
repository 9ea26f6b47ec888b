#!/usr/bin/env bash
# One short GPU session: checks the CUDA paths, measures throughput and, given the time, runs the toy replication's
# `paper` preset. Usage (on the GPU box, from the repo root, after `make setup`):
#   bash bench/gpu_check.sh [OUT_DIR] [SECONDS]
# The whole run keeps within SECONDS (default 300): each stage has its own limit, cut to what is left, and a
# failure does not stop the next. The paper run (~9 min on an H200) gets what is left if that is a minute or more
# (pass 900 for all of it); if cut short, its log still says how far it got. Small outputs go to OUT_DIR, the
# paper run's folder (every SAE, ~0.6 GB) to $RUN_DIR.
set -uo pipefail
out=${1:-outputs/gpu_check}
budget=${2:-300}
run_dir=${RUN_DIR:-/tmp/toy_paper}
py=${PY:-.venv/bin/python}
dev=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of this script off the GPU box
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
mkdir -p "$out"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
# Runs a command for at most $1 seconds, or what is left of the budget if less; nothing left: skipped (status 124).
within() {
  local s l
  s=$1 l=$(left)
  shift
  [ "$l" -lt "$s" ] && s=$l
  [ "$s" -gt 0 ] || { echo "{\"skipped\": \"$*\", \"reason\": \"no time left\"}"; return 124; }
  timeout "$s" "$@"
}
log() { echo "{\"stage\": \"$1\", \"rc\": $2, \"elapsed_s\": $(( $(date +%s) - start ))}"; }

nvidia-smi -L
$py -c "import torch, json; print(json.dumps({'cuda': torch.cuda.is_available(), 'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'torch': torch.__version__, 'tf32_matmul': torch.backends.cuda.matmul.allow_tf32}))"

# The fast training paths against dense float64 autograd, and ground-truth recovery, on cuda (and cpu).
within 120 $py -m pytest -q -p no:cacheprovider tests/saes/test_saes.py tests/training/test_recovery.py tests/eval/test_metrics.py -k "not cpu"
log tests $?

# Training-step throughput against this GPU's matmul roofline: the CPU figures' shapes, a big one, and bf16 against
# the bf16 roofline and the fp32 step.
for args in "--arch relu --d_in 512 --d_sae 8192 --batch 4096" \
            "--arch topk --k 32 --d_in 512 --d_sae 8192 --batch 4096" \
            "--arch relu --d_in 128 --d_sae 1024 --batch 4096 --n_models 8" \
            "--arch topk --k 64 --d_in 768 --d_sae 24576 --batch 8192 --steps 20" \
            "--arch relu --d_in 512 --d_sae 8192 --batch 4096 --train_dtype bf16 --compare fp32" \
            "--arch topk --k 32 --d_in 512 --d_sae 8192 --batch 4096 --train_dtype bf16 --compare fp32"; do
  # shellcheck disable=SC2086
  within 40 $py bench/sae_step.py --device "$dev" $args | tee -a "$out/bench.jsonl"
done
log bench $?

# Our TopK step against sparsify's on the same shapes, where eai-sparsify is installed (it is no dependency).
within 50 $py bench/vs_sparsify.py --device "$dev" --steps 20 | tee -a "$out/bench.jsonl"
log vs_sparsify $?

# The report's full grid (17 l1 × 9 sizes, 20 000 steps): no mid-run checkpoints, this box is gone after.
rm -rf "$run_dir"
[ "$(left)" -ge 60 ] || { log paper_skipped 0; exit 0; }
paper_start=$(date +%s)
timeout "$(left)" $py replicate_toy_models.py --preset paper --device "$dev" --checkpoint_every 0 --out "$run_dir" \
  2> >(tr '\r' '\n' | grep -E 'training|error|Error' | awk 'NR % 100 == 0 || /rror/' >&2)
rc=$?
echo "{\"bench\": \"toy_paper_preset\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - paper_start ))}"
cp "$run_dir"/results.json "$run_dir"/*.png "$out"/ 2>/dev/null
log paper $rc
