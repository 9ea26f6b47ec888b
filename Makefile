# `make run` and `make test` each set up everything they need on a fresh machine, then do their job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first, alone, so pip takes the pinned wheel (CPU here, CUDA from PyPI on a GPU box)
# before anything else can pull a different build.
TORCH_PIN := $(shell grep -E '^torch==' requirements.txt)

.PHONY: setup run test lint bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) replicate_toy_models.py --preset cpu

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) bench/sae_step.py --arch relu --d_in 512 --d_sae 8192 --batch 4096
	$(PY) bench/sae_step.py --arch topk --k 32 --d_in 512 --d_sae 8192 --batch 4096
	$(PY) bench/sae_step.py --arch relu --d_in 128 --d_sae 1024 --batch 4096 --n_models 8

clean:
	rm -rf $(VENV) outputs
