"""Lockstep training is exact, and a killed run resumes to the same weights."""

import dataclasses

import pytest
import torch

from sparse_coding.data.toy import ToyDataConfig, ToyGenerator
from sparse_coding.errors import CheckpointError
from sparse_coding.pipelines.toy import ToySource, smoke
from sparse_coding.saes import build_sae
from sparse_coding.training.trainer import Trainer, build_stacks, train


@pytest.mark.parametrize(
    "arch,grid",
    [
        ("relu", [{"l1_alpha": 0.01}, {"l1_alpha": 1.0}, {"l1_alpha": 10.0}]),
        ("topk", [{"k": 2}, {"k": 3}, {"k": 5}]),
    ],
)
def test_stacked_models_train_like_separate_ones(arch, grid):
    d, f = 8, 16
    stack = build_sae(arch, d, f, grid)
    singles = [build_sae(arch, d, f, [hp]) for hp in grid]
    for m, single in enumerate(singles):
        with torch.no_grad():
            for name, p in single.named_parameters():
                p.copy_(getattr(stack, name)[m : m + 1])
    trainers = [Trainer([stack], lr=1e-2)] + [Trainer([s], lr=1e-2) for s in singles]
    for _ in range(15):
        x = torch.randn(32, d)
        for t in trainers:
            t.step(x)
    for m, single in enumerate(singles):
        for name, p in single.named_parameters():
            assert torch.allclose(p[0], getattr(stack, name)[m], atol=1e-5), (m, name)


def _setup(arch, n_steps):
    cfg = dataclasses.replace(
        smoke(), arch=arch, n_steps=n_steps, checkpoint_every=10, k_values=[2, 3], dead_tokens_threshold=512
    )
    gen = ToyGenerator(ToyDataConfig(activation_dim=16, n_ground_truth=32, mean_active=3.0), seed=0)
    stacks = build_stacks(cfg, 16, torch.device("cpu"))
    return cfg, Trainer(stacks, lr=cfg.lr), ToySource(gen)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_killed_run_resumes_to_identical_weights(tmp_path, arch):
    cfg, trainer, source = _setup(arch, 40)
    train(trainer, source, cfg, tmp_path / "a", "fp", progress=False)
    unbroken = trainer.state_tensors()

    cfg, trainer, source = _setup(arch, 25)  # "killed" at step 25: the last checkpoint is step 20
    train(trainer, source, cfg, tmp_path / "b", "fp", progress=False)
    cfg, trainer, source = _setup(arch, 40)
    train(trainer, source, cfg, tmp_path / "b", "fp", progress=False)
    assert trainer.step_count == 40
    resumed = trainer.state_tensors()
    assert unbroken.keys() == resumed.keys()
    for k in unbroken:
        assert torch.equal(unbroken[k], resumed[k]), k


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    cfg, trainer, source = _setup("relu", 10)
    train(trainer, source, cfg, tmp_path, "fp-one", progress=False)
    cfg, trainer, source = _setup("relu", 20)
    with pytest.raises(CheckpointError):
        train(trainer, source, cfg, tmp_path, "fp-two", progress=False)


def test_continuing_saved_saes_keeps_their_decoder_bias():
    stack = build_sae("relu", 4, 8, [{"l1_alpha": 0.1}])
    with torch.no_grad():
        stack.b_dec.fill_(5.0)
    Trainer([stack], lr=1e-9, init_b_dec=False).step(torch.randn(16, 4))
    assert torch.allclose(stack.b_dec, torch.full_like(stack.b_dec, 5.0))
    Trainer([stack], lr=1e-9).step(torch.zeros(16, 4))  # a fresh sweep starts b_dec at the data mean
    assert torch.allclose(stack.b_dec, torch.zeros_like(stack.b_dec), atol=1e-6)
