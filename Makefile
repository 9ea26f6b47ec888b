# `make run` and `make test` each set up everything they need on a fresh machine, then do their job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first, alone, so pip takes the pinned wheel (CPU here, CUDA from PyPI on a GPU box)
# before anything else can pull a different build.
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt)

.PHONY: setup run test lint bench clean browser sshd lm interpret

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	@# circuit-tracer only for its CLT loader (tests read our CLT folders with it); its pins on transformers clash
	$(PY) -m pip install -q --no-deps "circuit-tracer==0.5.0"
	$(PY) -m pip install -q --no-deps -e .
	@# Build the CPU kernels now, not inside a first training run (a warning, not a failure, without g++).
	$(PY) -c "from sparse_coding.saes.kernels import cpu_kernel_available as ok; ok()"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) replicate_toy_models.py --preset cpu

test: setup browser sshd
	$(PY) -m ruff check .
	$(PY) -m pytest

# Headless Chromium for the HTML report test (Debian's package; needs root for apt-get).
browser:
	@test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# OpenSSH server, rsync and tmux for the vastai/ tests, which ssh into a throwaway sshd on loopback (needs root).
sshd:
	@test -x /usr/sbin/sshd && command -v rsync >/dev/null && command -v tmux >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server rsync tmux)

lint: setup
	$(PY) -m ruff check .

# SAEs on the tiny model's activations (run.py's offline default), then autointerp of the best one.
lm: tiny
	$(PY) run.py

interpret: setup
	$(PY) interpret.py

bench: setup
	$(PY) bench/activations.py
	$(PY) bench/sae_step.py --arch relu --d_in 512 --d_sae 8192 --batch 4096
	$(PY) bench/sae_step.py --arch topk --k 32 --d_in 512 --d_sae 8192 --batch 4096
	$(PY) bench/sae_step.py --arch relu --d_in 128 --d_sae 1024 --batch 4096 --n_models 8
	$(PY) bench/stream_memory.py  # writes (then deletes) a 1 GB corpus in a temporary folder
	$(PY) bench/stream_memory.py --activations stream
	$(PY) bench/shard_scaling.py  # 1 vs 2 torchrun processes sharing each SAE's latents
	$(PY) bench/stream_vs_store.py  # needs `make tiny`

clean:
	rm -rf $(VENV) outputs

.PHONY: corpus tiny

# The tiny transformer's offline corpus: the Debian package python3-doc (apt-get, as root), tokenized into
# data/pydocs with a byte-level BPE trained on it. Skipped when already prepared.
corpus: setup
	sh scripts/install_corpus_package.sh
	$(PY) scripts/prepare_corpus.py --source debian --out data/pydocs

# Train the CPU-default tiny transformer into checkpoints/tiny, run.py's offline model (minutes on 2 cores).
# Rerunning resumes an interrupted run; a finished one is only re-scored.
tiny: setup corpus
	$(PY) train_tiny.py --config nanoGPT_config/cpu_default.py
