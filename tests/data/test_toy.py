import hashlib

import pytest
import torch

from sparse_coding.data.toy import ToyDataConfig, ToyGenerator, firing_rates
from sparse_coding.errors import ConfigError


def _digest(cfg: ToyDataConfig) -> str:
    gen = ToyGenerator(cfg, seed=0)
    h = hashlib.sha256(gen.features.numpy().tobytes())
    h.update(gen.probs.numpy().tobytes())
    for _ in range(3):
        x, codes = gen.sample(257)
        h.update(x.numpy().tobytes())
        h.update(codes.numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    "extra,digest",
    [
        ({}, "68073d603bb19d3f"),
        ({"magnitude": "uniform_product"}, "28fcdcd7a04cf1dd"),
        ({"correlated_components": True, "correlation_rank": 4}, "090aea91f8e4c0a0"),
        ({"noise_std": 0.1}, "7ec92f9e31436aff"),
    ],
)
def test_the_reports_data_is_bit_identical_to_before_the_structured_options(extra, digest):
    # Digests of the generator as it was before hierarchies, pairs, Zipf and new magnitudes were added (torch's
    # CPU generator; a torch upgrade that changes its streams would change them all at once).
    assert _digest(ToyDataConfig(activation_dim=16, n_ground_truth=40, mean_active=3.0, **extra)) == digest


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


def test_hierarchy_children_fire_only_with_their_parent_at_the_stated_rates():
    base = dict(activation_dim=16, n_ground_truth=40, mean_active=3.0, hierarchy_roots=3, hierarchy_depth=2)
    for exclusive in (True, False):
        cfg = ToyDataConfig(**base, child_prob=0.6, exclusive_children=exclusive, child_mix=0.5)
        gen = ToyGenerator(cfg, seed=0)
        assert gen.parent[:9].tolist() == [-1, -1, -1, 0, 0, 1, 1, 2, 2] and gen.parent[9:11].tolist() == [3, 3]
        assert gen.depth[:21].tolist() == [0] * 3 + [1] * 6 + [2] * 12 and gen.depth[21:].eq(-1).all()
        _, codes = gen.sample(100_000)
        active = codes > 0
        kids = torch.nonzero(gen.parent >= 0).flatten()
        assert not (active[:, kids] & ~active[:, gen.parent[kids]]).any()
        assert torch.allclose(active.float().mean(0), gen.probs, atol=0.006)
        assert gen.probs.sum().item() == pytest.approx(3.0, rel=1e-5)
        siblings_together = (active[:, 3] & active[:, 4]).sum().item()
        assert (siblings_together == 0) == exclusive
        # normalise(own + ½ parent) with own nearly orthogonal to the parent: cosine ≈ 0.5 / √1.25 ≈ 0.45
        assert 0.3 < (gen.features[3] @ gen.features[0]).item() < 0.6


def test_zipf_rates_pairs_and_magnitudes():
    zipf = ToyDataConfig(activation_dim=8, n_ground_truth=20, mean_active=2.0, firing="zipf", zipf_exponent=1.5)
    rates = firing_rates(zipf)
    assert (rates[0] / rates[3]).item() == pytest.approx(4**1.5)
    pairs = ToyDataConfig(activation_dim=8, n_ground_truth=20, mean_active=4.0, correlated_pairs=2,
                          pair_correlation=-0.9)  # fmt: skip
    active = (ToyGenerator(pairs, seed=0).sample(50_000)[1] > 0).float()
    corr = torch.corrcoef(active[:, :5].T)
    assert corr[0, 1] < -0.2 and corr[2, 3] < -0.2 and abs(corr[1, 2]) < 0.02 and abs(corr[3, 4]) < 0.02
    for magnitude, mean in (("constant", 2.0), ("exponential", 2.0), ("lognormal", 2.0)):
        cfg = ToyDataConfig(
            activation_dim=8, n_ground_truth=16, mean_active=3.0, magnitude=magnitude, magnitude_mean=2.0
        )
        codes = ToyGenerator(cfg, seed=0).sample(40_000)[1]
        assert codes[codes > 0].mean().item() == pytest.approx(mean, rel=0.03), magnitude


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
        dict(hierarchy_roots=2, hierarchy_depth=3),
        dict(correlated_pairs=2, correlated_components=True),
        dict(correlated_pairs=9),
        dict(firing="zipf", zipf_exponent=3.0, mean_active=2.0),
    ],
)
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        ToyDataConfig(**{"activation_dim": 8, "n_ground_truth": 16, **bad})
