"""Fixtures of the SAE tests."""

import pytest
from precision_check import PrecisionCheck

from sparse_coding.saes.relu import ReluSAE


@pytest.fixture(params=["fp32", "bf16", "fp16"])
def train_dtype(request) -> PrecisionCheck:
    """Runs a fast-path test in each --train_dtype (see tests/precision_check.py)."""
    return PrecisionCheck(request.param)


@pytest.fixture(params=["dense", "sparse"])
def relu_step(request, monkeypatch) -> str:
    """Runs a relu test through each of its training steps: the dense one, and the sparse one (fp32 only), which
    relu otherwise takes only once training has made its codes sparse."""
    monkeypatch.setattr(ReluSAE, "sparse_below", 0.0 if request.param == "dense" else 1.01)
    return request.param
