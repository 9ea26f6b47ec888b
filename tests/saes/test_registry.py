"""Adding an architecture is one class plus one registry line: a made-up one, defined only here, goes through a
toy sweep, is saved, reloaded and scored without any other file knowing its name."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import Tensor

from sparse_coding.eval.reconstruction import evaluate
from sparse_coding.pipelines.toy import run_toy, smoke
from sparse_coding.saes import SAES, register
from sparse_coding.saes.base import SAE, TrainOutput
from sparse_coding.saes.saelens import load_sae


class LeakyL1SAE(SAE):
    """codes = ReLU(pre) · (1 + leak); loss = MSE + alpha · mean L1, trained by plain autograd."""

    architecture = "test_leaky_l1"
    saelens_architecture = "test_leaky_l1"
    knob = "alpha"
    options = ("leak", "decoder_bias")

    def __init__(self, d_in: int, d_sae: int, hparams: list[dict], leak: float = 0.0, decoder_bias: bool = True):
        super().__init__(d_in, d_sae, hparams, decoder_bias)
        self.leak = leak
        with torch.no_grad():
            self.W_dec.normal_()
            self.constrain_weights()
            self.W_enc.copy_(self.W_dec)

    @classmethod
    def knob_values(cls, cfg) -> list[float]:
        return cfg.l1_grid()

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x)) * (1 + self.leak)

    def train_forward(self, x: Tensor, stats: bool = True) -> TrainOutput:
        codes = self.encode(x)
        mse = (self.decode(codes) - x).pow(2).mean(dim=(1, 2))
        alpha = torch.tensor([h["alpha"] for h in self._hparams], device=x.device)
        loss = mse + alpha * codes.sum(-1).mean(-1) / self.d_sae
        return TrainOutput(loss, {"mse": mse.detach(), "l0": (codes > 0).float().sum(-1).mean(-1)} if stats else {})


@pytest.fixture
def registered():
    register(LeakyL1SAE)
    yield LeakyL1SAE
    SAES.pop(LeakyL1SAE.architecture)


def test_a_new_architecture_sweeps_saves_reloads_and_evaluates(registered, tmp_path):
    cfg = dataclasses.replace(smoke(), arch="test_leaky_l1", n_steps=40, l1_exp_low=-2, l1_exp_high=0)
    results = run_toy(cfg, tmp_path, progress=False)
    runs = results["runs"]
    assert len(runs) == 3 * 3 and {r["arch"] for r in runs} == {"test_leaky_l1"}
    assert sorted({r["alpha"] for r in runs}) == pytest.approx([0.01, 0.1, 1.0]) and runs[0]["knob"] == "alpha"
    assert all(r["mmcs"] > 0 for r in runs)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert {row["sae"] for row in log} == {r["name"] for r in runs} and {"loss", "mse", "l0"} <= set(log[-1])

    x = torch.randn(512, cfg.activation_dim)
    for r in runs:
        sae, cfg_json = load_sae(tmp_path / "saes" / r["name"])
        assert isinstance(sae, LeakyL1SAE) and sae.hparams(0)["alpha"] == pytest.approx(r["alpha"])
        assert cfg_json["metadata"]["leak"] == 0.0
        stats = evaluate([sae], x, 256)[0]
        assert stats.fvu.shape == (1,) and torch.isfinite(stats.fvu).all()
