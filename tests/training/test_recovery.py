"""Training against ground truth: both architectures find the true features of toy data."""

import pytest
import torch

from sparse_coding.data.toy import ToyGenerator
from sparse_coding.eval import metrics
from sparse_coding.pipelines.toy import ToyRunConfig, ToySource
from sparse_coding.training.trainer import Trainer, build_stacks, train


def _train(device: torch.device, **overrides):
    cfg = ToyRunConfig(
        activation_dim=32,
        n_ground_truth=64,
        mean_active=4.0,
        dict_ratio_exp_low=1,
        dict_ratio_exp_high=2,
        batch_size=512,
        checkpoint_every=0,
        device=str(device),
        **overrides,
    )
    gen = ToyGenerator(cfg, seed=0, device=device)
    stacks = build_stacks(cfg, cfg.activation_dim, device)
    train(Trainer(stacks, cfg.lr), ToySource(gen), cfg, None, "", progress=False)
    return gen, stacks


def test_topk_recovers_the_ground_truth(device):
    """Dictionaries of 1× and 2× the true feature count, k near the true mean activity (4)."""
    gen, stacks = _train(device, arch="topk", k_values=[3, 4], n_steps=1000, dead_tokens_threshold=50_000)
    for sae in stacks:
        assert sae.d_sae >= gen.cfg.n_ground_truth
        scores = metrics.mmcs(gen.features, sae.decoder().detach())
        assert (scores >= 0.9).all(), (sae.d_sae, scores)


@pytest.mark.parametrize("tied", [False, True])
def test_relu_recovers_the_ground_truth(tied, device):
    gen, stacks = _train(
        device, arch="relu", l1_exp_low=1, l1_exp_high=2, l1_exp_base=10**0.25, n_steps=1500, lr=3e-3, tied=tied
    )
    best = max(float(metrics.mmcs(gen.features, s.decoder().detach()).max()) for s in stacks)
    assert best >= 0.9
