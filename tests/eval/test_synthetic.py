"""Recovery metrics on hand-built dictionaries and codes whose answers are known."""

import math

import pytest
import torch

from sparse_coding.data.toy import ToyDataConfig, ToyGenerator
from sparse_coding.eval import synthetic


@pytest.fixture(scope="module")
def tree():
    """Two roots with three exclusive children each (parents mixed into children), plus free features."""
    cfg = ToyDataConfig(
        activation_dim=24,
        n_ground_truth=16,
        mean_active=2.0,
        hierarchy_roots=2,
        hierarchy_branching=3,
        child_prob=0.7,
        child_mix=0.8,
    )
    gen = ToyGenerator(cfg, seed=0)
    _, codes = gen.sample(6000)
    return gen, codes


def test_correlation_matrix_by_hand():
    a = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    b = torch.tensor([[2.0, 3.0], [4.0, 2.0], [6.0, 1.0]])
    corr = synthetic.correlation_matrix(a, b)
    assert torch.allclose(corr, torch.tensor([[1.0, -1.0], [0.0, 0.0]], dtype=torch.float64))  # constant: 0


def test_mcc_is_blind_to_order_and_scale_but_not_to_mixing():
    g = torch.Generator().manual_seed(0)
    codes = torch.rand(500, 4, generator=g) * (torch.rand(500, 4, generator=g) < 0.3)
    assert synthetic.mcc(codes, 3 * codes[:, [2, 0, 3, 1]]) == pytest.approx(1.0)
    mixed = codes @ torch.tensor([[1.0, 1, 0, 0], [1, -1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert synthetic.mcc(codes, mixed) < 0.9
    assert synthetic.mcc(codes, codes[:, :2]) == pytest.approx(0.5)  # two features unmatched count 0


def test_precision_recall_f1_by_hand():
    true = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    latent = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.0]])
    # latent 0 fires on rows 0, 2: both 1, precision 1/2, recall 1/2, F1 1/2; latent 1 on row 1: precision 1,
    # recall 1/2, F1 2/3, the best
    precision, recall, f1 = synthetic.f1_matrix(
        torch.tensor([[1.0, 1.0]]), torch.tensor([2.0]), torch.tensor([2.0, 1.0])
    )
    assert precision.tolist() == [[0.5, 1.0]] and recall.tolist() == [[0.5, 0.5]]
    assert f1[0].tolist() == pytest.approx([0.5, 2 / 3])
    row = synthetic.truth_metrics(torch.eye(2)[:1], torch.eye(2), true, latent, torch.tensor([-1]), torch.tensor([-1]))
    assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))


def test_truth_itself_scores_perfectly(tree):
    gen, codes = tree
    row = synthetic.truth_metrics(gen.features, gen.features, codes, codes, gen.parent, gen.depth)
    assert row["mcc"] == pytest.approx(1.0) and row["hungarian_mmcs"] == pytest.approx(1.0)
    assert row["f1"] == pytest.approx(1.0) and row["splitting"] == 0.0
    assert row["absorption"] == 0.0 and row["absorption_by_depth"] == {"0": 0.0}
    assert row["parents_recovered"] == row["children_recovered"] == 1.0 and row["parents_without_detector"] == 0


def test_a_parent_merged_into_its_children_is_absorbed(tree):
    gen, codes = tree
    parent = gen.parent
    kids = torch.nonzero(parent >= 0).flatten()
    child_fires = torch.zeros_like(codes).index_add_(1, parent[kids], (codes[:, kids] > 0).float()) > 0
    absorbed = codes.clone()
    absorbed[:, :2] *= ~child_fires[:, :2]  # each root's latent fires only where no child of it does
    decoder = gen.features.clone()
    decoder[kids] = gen.features[kids] + gen.features[parent[kids]]  # children's latents carry the parent
    row = synthetic.truth_metrics(gen.features, decoder, codes, absorbed, parent, gen.depth)
    assert row["absorption"] == 1.0 and row["parents_without_detector"] == 0
    assert row["mcc"] < 1.0 and row["parents_f1"] < 1.0


def test_a_missing_parent_is_unrecovered_not_absorbed(tree):
    gen, codes = tree
    dead = codes.clone()
    dead[:, 0] = 0  # the first root's latent never fires
    row = synthetic.truth_metrics(gen.features, gen.features, codes, dead, gen.parent, gen.depth)
    assert row["parents_without_detector"] == 1 and row["absorption"] == 0.0  # the other root is intact


def test_a_feature_split_over_two_latents_is_counted(tree):
    gen, codes = tree
    n = codes.shape[1]
    halves = torch.arange(codes.shape[0]) % 2 == 0
    split = torch.cat([codes, codes[:, -1:] * halves[:, None]], dim=1)
    split[:, -2] *= ~halves  # the last feature fires through latent n-1 on odd rows, latent n on even rows
    decoder = torch.cat([gen.features, gen.features[-1:]])
    row = synthetic.truth_metrics(gen.features, decoder, codes, split, gen.parent, gen.depth)
    assert row["splitting"] == pytest.approx(1 / n)
    assert row["f1"] == pytest.approx((n - 1 + 2 / 3) / n, abs=0.02)  # best latent: recall ½, precision 1


def test_without_hierarchy_the_hierarchy_fields_are_null():
    gen = ToyGenerator(ToyDataConfig(activation_dim=8, n_ground_truth=12, mean_active=2.0), seed=0)
    _, codes = gen.sample(500)
    row = synthetic.truth_metrics(gen.features, gen.features, codes, codes, gen.parent, gen.depth)
    assert all(row[k] is None for k in synthetic.HIERARCHY_KEYS)
    assert math.isclose(row["mcc"], 1.0)
