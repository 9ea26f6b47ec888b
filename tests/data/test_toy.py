import pytest
import torch

from sparse_coding.data.toy import ToyDataConfig, ToyGenerator
from sparse_coding.errors import ConfigError


def test_generator_is_seeded_and_deterministic():
    cfg = ToyDataConfig(activation_dim=16, n_ground_truth=32)
    a, b = ToyGenerator(cfg, seed=3), ToyGenerator(cfg, seed=3)
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.sample(64)[0], b.sample(64)[0])
    assert not torch.equal(ToyGenerator(cfg, seed=4).features, a.features)


def test_features_probabilities_and_magnitudes_follow_the_report():
    cfg = ToyDataConfig(activation_dim=32, n_ground_truth=64, mean_active=5.0, feature_decay=0.99)
    gen = ToyGenerator(cfg, seed=0)
    assert torch.allclose(gen.features.norm(dim=-1), torch.ones(64))
    assert gen.probs.sum().item() == pytest.approx(5.0, rel=1e-5)
    assert gen.probs[1] / gen.probs[0] == pytest.approx(0.99)
    x, codes = gen.sample(40_000)
    active = codes > 0
    assert active.sum(-1).float().mean().item() == pytest.approx(5.0, rel=0.03)
    assert torch.allclose(active.float().mean(0), gen.probs, atol=0.01)
    mags = codes[active]
    assert mags.mean().item() == pytest.approx(0.5, abs=0.01)  # U[0,1), not the biased product
    assert torch.allclose(x, codes @ gen.features, atol=1e-5)


def test_uniform_product_option_biases_magnitudes_down():
    cfg = ToyDataConfig(activation_dim=8, n_ground_truth=16, mean_active=3.0, magnitude="uniform_product")
    _, codes = ToyGenerator(cfg, seed=0).sample(20_000)
    assert codes[codes > 0].mean().item() == pytest.approx(0.25, abs=0.01)


def test_correlated_firing_keeps_rates_and_adds_correlation():
    base = dict(activation_dim=16, n_ground_truth=32, mean_active=4.0)
    plain = ToyGenerator(ToyDataConfig(**base), seed=0)
    corr = ToyGenerator(ToyDataConfig(**base, correlated_components=True, correlation_rank=4), seed=0)
    _, c_plain = plain.sample(50_000)
    _, c_corr = corr.sample(50_000)
    assert torch.allclose((c_corr > 0).float().mean(0), corr.probs, atol=0.012)

    def mean_abs_offdiag_corr(codes):
        c = torch.corrcoef((codes > 0).float().T)
        return (c - torch.diag(c.diagonal())).abs().nan_to_num().sum() / (32 * 31)

    assert mean_abs_offdiag_corr(c_corr) > 3 * mean_abs_offdiag_corr(c_plain)


def test_noise_is_added():
    cfg = ToyDataConfig(activation_dim=8, n_ground_truth=16, mean_active=3.0, noise_std=0.1)
    x, codes = ToyGenerator(cfg, seed=0).sample(10_000)
    gen = ToyGenerator(cfg, seed=0)
    resid = x - codes @ gen.features
    assert resid.std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize(
    "bad",
    [
        dict(activation_dim=0),
        dict(n_ground_truth=-1),
        dict(mean_active=0.0),
        dict(feature_decay=1.5),
        dict(magnitude="gaussian"),
        dict(noise_std=-1.0),
        dict(n_ground_truth=4, mean_active=5.0),
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        ToyDataConfig(**{"activation_dim": 8, "n_ground_truth": 16, **bad})
