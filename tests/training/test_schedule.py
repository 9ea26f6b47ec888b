"""What changes over a run: the learning-rate and sparsity schedules, the input scale folded into saved SAEs, and
relu's dead-latent resampling."""

import math

import pytest
import torch

from sparse_coding.saes import SAES, build_sae, single_hook_archs
from sparse_coding.training.schedule import Schedule, input_scale
from sparse_coding.training.trainer import Trainer


def test_learning_rate_warms_up_then_decays_to_lr_end():
    linear = Schedule(n_steps=10, lr=1.0, lr_warmup_steps=4, lr_decay_steps=4, lr_end=0.2)
    assert [linear.lr_at(s) for s in range(10)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    cosine = Schedule(n_steps=10, lr=1.0, lr_decay_steps=4, lr_decay="cosine", lr_end=0.2)
    half = 0.2 + 0.8 * (1 + math.cos(math.pi / 2)) / 2
    assert [cosine.lr_at(s) for s in (5, 7, 9)] == pytest.approx([1.0, half, 0.2])
    assert cosine.lr_at(20) == pytest.approx(0.2)  # past the end (n_steps raised on resume): stays at lr_end
    assert Schedule(n_steps=10, lr=0.5).constant_lr and Schedule(n_steps=10, lr=0.5).lr_at(7) == 0.5


def test_sparsity_coefficient_warms_up():
    s = Schedule(n_steps=10, lr=1.0, sparsity_warmup_steps=4)
    assert [s.sparsity_at(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_trainer_applies_both_schedules_each_step():
    sae = build_sae("relu", 4, 8, [{"l1_alpha": 1.0}])
    trainer = Trainer([sae], lr=1.0, schedule=Schedule(n_steps=6, lr=1.0, lr_warmup_steps=2, sparsity_warmup_steps=4))
    seen = []
    for _ in range(3):
        trainer.step(torch.randn(8, 4))
        seen.append((trainer.opt.param_groups[0]["lr"], sae.sparsity_scale))
    assert seen == [(0.5, 0.25), (1.0, 0.5), (1.0, 0.75)]


def test_input_scale_brings_the_mean_norm_to_sqrt_d():
    x = torch.randn(500, 16) * 7.0
    scale = input_scale([x[:250], x[250:]])
    assert float((x.double() * scale).norm(dim=-1).mean()) == pytest.approx(4.0)


@pytest.mark.parametrize("arch", sorted(single_hook_archs()))
def test_folded_sae_on_raw_inputs_equals_the_trained_one_on_scaled_inputs(arch):
    """What normalize_activations saves: codes scaled by 1/s and the same reconstruction, in raw units."""
    torch.set_default_dtype(torch.float64)
    try:
        knob = SAES[arch].knob
        sae = build_sae(arch, 6, 24, [{knob: 3 if knob == "k" else 0.1}] * 2)
        with torch.no_grad():
            for name in ("b_enc", "b_dec", "b_mag", "r_mag"):
                if hasattr(sae, name):
                    getattr(sae, name).normal_(0, 0.3)
            for name in ("threshold",):
                if hasattr(sae, name):
                    getattr(sae, name).fill_(0.2)
        x, s = torch.randn(50, 6) * 30.0, 0.07
        folded = sae.folded(s)
        codes = folded.encode(x)
        assert torch.allclose(codes, sae.encode(x * s) / s)
        assert torch.allclose(folded.decode(codes), sae.decode(sae.encode(x * s)) / s)
        assert (codes != 0).any() and (codes == 0).any()
        assert torch.equal(folded.W_dec, sae.W_dec)  # unit decoder rows stay unit
    finally:
        torch.set_default_dtype(torch.float32)


def test_resampling_reinitialises_dead_latents_towards_badly_reconstructed_inputs():
    sae = build_sae("relu", 8, 16, [{"l1_alpha": 0.1}, {"l1_alpha": 0.2}])
    trainer = Trainer([sae], lr=1e-3)
    trainer.step(torch.randn(64, 8))  # Adam moments now exist
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    with torch.no_grad():
        sae.steps_since_fired.zero_()
        sae.steps_since_fired[0, [1, 5]] = 10
        sae.steps_since_fired[1, 9] = 10
    x = torch.randn(512, 8)
    x[7] *= 100.0  # by far the worst reconstructed input
    trainer.resample([x], window=10, seed=0)
    dead = torch.zeros(2, 16, dtype=torch.bool)
    dead[0, [1, 5]] = dead[1, 9] = True
    direction = (x[7] - sae.b_dec[0]) / (x[7] - sae.b_dec[0]).norm()
    assert torch.allclose(sae.W_dec[0, 1], direction) and torch.allclose(sae.W_dec[0, 5], direction)
    alive_norm = before["W_enc"][0][~dead[0]].norm(dim=-1).mean()
    assert torch.allclose(sae.W_enc[0, 1].norm(), 0.2 * alive_norm)
    assert (sae.b_enc[dead] == 0).all()
    for name in ("W_enc", "W_dec", "b_enc"):
        assert torch.equal(getattr(sae, name)[~dead], before[name][~dead]), name  # the living are untouched
        state = trainer.opt.state[getattr(sae, name)]
        assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg_sq"][dead] == 0).all()
        assert (state["exp_avg_sq"][~dead] != 0).any()
    assert (sae.steps_since_fired[dead] == 0).all()
