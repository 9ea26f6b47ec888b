"""Training against ground truth: every architecture finds the true features of toy data."""

import pytest
import torch

from sparse_coding.data.toy import ToyGenerator
from sparse_coding.eval import metrics
from sparse_coding.eval.model_diff import relative_norms
from sparse_coding.pipelines.toy import ToyRunConfig, ToySource
from sparse_coding.training.trainer import Trainer, build_stacks, train


def _train(device: torch.device, **overrides):
    settings = {"dict_ratio_exp_low": 1, "dict_ratio_exp_high": 2, "activation_dim": 32, **overrides}
    cfg = ToyRunConfig(
        n_ground_truth=64,
        mean_active=4.0,
        batch_size=512,
        checkpoint_every=0,
        device=str(device),
        **settings,
    )
    gen = ToyGenerator(cfg, seed=0, device=device)
    d_in, d_out = cfg.widths()  # every layer's, on the cross-layer toy
    stacks = build_stacks(cfg, d_in, device, d_out)
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


# Each architecture with its knob swept near the data's own sparsity (4 true features per example), at twice the
# true dictionary size: the best SAE must recover the true features almost exactly (MMCS ≥ 0.95).
SWEEPS = {
    "batchtopk": {"k_values": [4, 5], "dead_tokens_threshold": 50_000},
    "matryoshka": {"k_values": [4, 5], "dead_tokens_threshold": 50_000},
    "jumprelu": {"l1_exp_low": -1, "l1_exp_high": 0, "l1_exp_base": 10**0.5},
    "gated": {"l1_exp_low": 1, "l1_exp_high": 2, "l1_exp_base": 10**0.25},
}

# Matryoshka's nested objective costs recovery on flat (non-hierarchical) data: its first levels (8 and 16 of 128
# latents here) must reconstruct alone, so they learn blends of frequent features and the later latents learn what
# those leave, directions a little off the true ones. Measured: best MMCS 0.88 at 1500 steps, 0.90 at 4000 (0.96
# with a two-level ladder [64, 128]), while BatchTopK, its ladder-free self, reaches 0.99 on the same data. A larger
# dictionary helps (four times the true features: 0.91 here at 1500 steps; 0.972 in the cpu preset's 2500 steps,
# its gate met), but not to 0.95 at this test's size and length.
RECOVERY = {"matryoshka": 0.85}


@pytest.mark.parametrize("arch", sorted(SWEEPS))
def test_every_architecture_recovers_the_ground_truth(arch):
    cpu = torch.device("cpu")
    gen, stacks = _train(cpu, arch=arch, dict_ratio_exp_low=2, n_steps=1500, lr=3e-3, **SWEEPS[arch])
    (sae,) = stacks
    scores = metrics.mmcs(gen.features, sae.decoder().detach())
    assert float(scores.max()) >= RECOVERY.get(arch, 0.95), scores
    x = ToyGenerator(gen.cfg, seed=0, sample_seed=99).sample(8192)[0]
    l0 = (sae.encode(x) != 0).float().sum(-1).mean(-1)  # held out, one example at a time (BatchTopK: threshold)
    if sae.knob == "k":
        k = torch.tensor(sae.ks, dtype=torch.float32)
        assert ((l0 - k).abs() <= 0.1 * k).all(), (l0, k)


@pytest.mark.parametrize("arch,knob", [("clt", {"k_values": [2, 3]}), ("clt_batchtopk", {"k_values": [2, 3]}),
                                       ("clt_jumprelu", {"l1_exp_low": -3, "l1_exp_high": -2})])  # fmt: skip
def test_cross_layer_transcoders_recover_features_that_write_into_several_layers(arch, knob):
    """The cross-layer toy (2 layers of 16 dimensions, 64 true features, each read in one layer and written into
    it and, at random, later ones): the best of a two-knob sweep finds every true feature's decoder across all its
    layers (MMCS ≥ 0.9; measured 0.95, 0.91, 0.95 for clt, clt_batchtopk, clt_jumprelu on this seed)."""
    sizes = {"dict_ratio_exp_low": 1, "dict_ratio_exp_high": 1}
    gen, stacks = _train(torch.device("cpu"), arch=arch, n_layers=2, activation_dim=16, n_steps=1000, lr=3e-3,
                         dead_tokens_threshold=50_000, **sizes, **knob)  # fmt: skip
    (sae,) = stacks
    assert float(metrics.mmcs(gen.features, sae.decoder().detach()).max()) >= 0.9


def _band(r: torch.Tensor) -> torch.Tensor:
    """0: only in the first block, 1: only in the second, 2: shared, 3: between (eval/model_diff.py's bands)."""
    return torch.where(r < 0.1, 0, torch.where(r > 0.9, 1, torch.where((r >= 0.3) & (r <= 0.7), 2, 3)))


def test_a_crosscoder_recovers_features_that_live_in_several_layers_and_says_where():
    """The cross-layer toy's writes alone (2 blocks of 16 dimensions — two layers, or two models as in model
    diffing; each of 64 true features in its own block and, at random, the other): at twice the true size the best
    of two l1 values finds them (measured 0.943), and its relative decoder norms put the features it finds in the
    right band (only in A, only in B, shared; measured: 48 of the 49 found) — the model-diffing readout, checked
    against the truth."""
    gen, (sae,) = _train(torch.device("cpu"), arch="crosscoder", n_layers=2, activation_dim=16, n_steps=1500,
                         lr=3e-3, dict_ratio_exp_low=2, l1_exp_low=1, l1_exp_high=2, l1_exp_base=10**0.25)  # fmt: skip
    assert not gen.cfg.layer_inputs  # the toy gives a crosscoder the layers' activations, not CLT pairs
    scores = [metrics.mmcs(gen.features, sae.decoder()[m].detach()) for m in range(sae.n_models)]
    m = max(range(sae.n_models), key=lambda i: float(scores[i]))
    assert float(scores[m]) >= 0.9
    dec = sae.decoder()[m].detach()
    cos = torch.nn.functional.normalize(gen.features, dim=-1) @ torch.nn.functional.normalize(dec, dim=-1).T
    best, match = cos.max(dim=1)
    found = best >= 0.9
    true_bands = _band(relative_norms(gen.features)[0])
    assert set(true_bands[found].tolist()) >= {0, 1, 2}  # every kind of feature is among those found
    agree = (_band(relative_norms(dec)[0])[match] == true_bands)[found].float().mean()
    assert float(agree) >= 0.9, float(agree)
