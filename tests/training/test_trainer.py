"""Lockstep training is exact, and a killed run resumes to the same weights."""

import dataclasses

import pytest
import torch

from sparse_coding.data.toy import ToyDataConfig, ToyGenerator
from sparse_coding.errors import CheckpointError
from sparse_coding.pipelines.toy import ToySource, smoke
from sparse_coding.saes import SAES, build_sae, single_hook_archs
from sparse_coding.training.schedule import Schedule
from sparse_coding.training.trainer import Trainer, build_stacks, train


@pytest.mark.parametrize("grad_clip", [None, 1e-3])  # each architecture's default; every step clipped
@pytest.mark.parametrize("arch", sorted(single_hook_archs()))
def test_stacked_models_train_like_separate_ones(arch, grad_clip):
    d, f = 8, 16
    grid = [{SAES[arch].knob: v} for v in ((2, 3, 5) if SAES[arch].knob == "k" else (0.01, 1.0, 10.0))]
    stack = build_sae(arch, d, f, grid)
    singles = [build_sae(arch, d, f, [hp]) for hp in grid]
    for m, single in enumerate(singles):
        with torch.no_grad():
            for name, p in single.named_parameters():
                p.copy_(getattr(stack, name)[m : m + 1])
    trainers = [Trainer([s], lr=1e-2, grad_clip=grad_clip) for s in [stack, *singles]]
    for _ in range(15):
        x = torch.randn(32, d)
        for t in trainers:
            t.step(x)
    for m, single in enumerate(singles):
        for name, p in single.named_parameters():
            assert torch.allclose(p[0], getattr(stack, name)[m], atol=1e-5), (m, name)


# Everything that changes over a run switched on: lr warm-up and cosine decay, sparsity warm-up, normalisation,
# and (relu) resampling, so a resumed run must get each of them right from the checkpoint.
SCHEDULES = {
    "lr_warmup_steps": 5,
    "lr_decay_steps": 12,
    "lr_decay": "cosine",
    "lr_end": 1e-4,
    "sparsity_warmup_steps": 15,
    "normalize_activations": True,
    "norm_batches": 2,
}


def _setup(arch, n_steps, **overrides):
    """The full run's trainer (its schedule spans 40 steps) and a config that stops after n_steps."""
    full = dataclasses.replace(
        smoke(), arch=arch, n_steps=40, checkpoint_every=10, k_values=[2, 3], dead_tokens_threshold=512, **overrides
    )
    gen = ToyGenerator(ToyDataConfig(activation_dim=16, n_ground_truth=32, mean_active=3.0), seed=0)
    stacks = build_stacks(full, 16, torch.device("cpu"))
    trainer = Trainer(stacks, lr=full.lr, schedule=Schedule.from_config(full))
    return dataclasses.replace(full, n_steps=n_steps), trainer, ToySource(gen)


@pytest.mark.parametrize("arch", sorted(single_hook_archs()))
@pytest.mark.parametrize("schedules", [False, True])
def test_killed_run_resumes_to_identical_weights(tmp_path, arch, schedules):
    overrides = SCHEDULES | ({"resample_every": 10, "resample_window": 3} if arch == "relu" else {})
    overrides = overrides if schedules else {}
    cfg, trainer, source = _setup(arch, 40, **overrides)
    train(trainer, source, cfg, tmp_path / "a", "fp", progress=False)
    unbroken = trainer.state_tensors()

    cfg, trainer, source = _setup(arch, 25, **overrides)  # "killed" at step 25: the last checkpoint is step 20
    train(trainer, source, cfg, tmp_path / "b", "fp", progress=False)
    cfg, trainer, source = _setup(arch, 40, **overrides)
    train(trainer, source, cfg, tmp_path / "b", "fp", progress=False)
    assert trainer.step_count == 40
    resumed = trainer.state_tensors()
    assert unbroken.keys() == resumed.keys()
    assert ("trainer.input_scale" in resumed) == schedules
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


def test_clipping_scales_each_models_gradient_to_the_bound():
    """Each model's gradients (all its parameters together) come down to norm max_norm where above it, whatever
    the other models' are."""
    sae = build_sae("topk", 4, 6, [{"k": 2}, {"k": 2}])
    grads = {n: torch.randn_like(p) for n, p in sae.named_parameters()}
    grads = {n: torch.stack([g[0] * 100, g[1] * 1e-3]) for n, g in grads.items()}  # model 0 far above, 1 below
    for n, p in sae.named_parameters():
        p.grad = grads[n].clone()
    norms = torch.stack([torch.cat([g[m].flatten() for g in grads.values()]).norm() for m in range(2)])
    assert norms[0] > 1 > norms[1]
    sae.clip_grads(1.0)
    for n, p in sae.named_parameters():
        torch.testing.assert_close(p.grad[0], grads[n][0] / norms[0])
        torch.testing.assert_close(p.grad[1], grads[n][1])
