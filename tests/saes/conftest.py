"""Fixtures of the SAE tests."""

import pytest
from precision_check import PrecisionCheck


@pytest.fixture(params=["fp32", "bf16", "fp16"])
def train_dtype(request) -> PrecisionCheck:
    """Runs a fast-path test in each --train_dtype (see tests/precision_check.py)."""
    return PrecisionCheck(request.param)
