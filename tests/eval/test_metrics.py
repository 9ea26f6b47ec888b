import math

import pytest
import torch

from sparse_coding.eval import metrics


def test_cosine_matrix_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    expected = torch.tensor([[1.0, 0.0], [1 / math.sqrt(2), -1 / math.sqrt(2)]])
    assert torch.allclose(metrics.cosine_matrix(a, b), expected)


def test_mmcs_is_mean_over_reference_of_best_match():
    truth = torch.eye(3)
    learned = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    # truth e0 → 1; e1 → 1/√2; e2 → 1/√2
    assert metrics.mmcs(truth, learned).item() == pytest.approx((1 + 2 / math.sqrt(2)) / 3)
    # the other direction: learned row 0 → 1, row 1 → 1/√2
    assert metrics.mmcs(learned, truth).item() == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


def test_mmcs_batched_over_models():
    ref = torch.eye(2).expand(3, 2, 2)
    cand = torch.stack([torch.eye(2), -torch.eye(2), torch.tensor([[1.0, 1.0], [1.0, 1.0]])])
    assert torch.allclose(metrics.mmcs(ref, cand), torch.tensor([1.0, 0.0, 1 / math.sqrt(2)]))


def test_hungarian_forbids_sharing_a_candidate():
    small = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    large = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    plain = metrics.mmcs(small, large).item()
    cos_second = 0.9 / math.hypot(0.9, 0.1)
    assert plain == pytest.approx((1 + cos_second) / 2)
    # one-to-one: best is row0→col0 (1) and row1→col1 (0.1/|.|)
    assert metrics.hungarian_mmcs(small, large) == pytest.approx((1 + 0.1 / math.hypot(0.9, 0.1)) / 2)


def test_share_above_threshold_and_summary():
    small = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    large = torch.eye(2)
    assert metrics.share_above(small, large, 0.9).item() == 0.5
    out = metrics.mmcs_with_larger(small, large, threshold=0.5)
    assert out["share_above"] == 1.0
    assert out["plain"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


def test_reconstruction_meter_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1); Σ‖x−mean‖² = 1+1+1+1 = 4
    x_hat = torch.stack([x, x + torch.tensor([[1.0, 0.0], [0.0, 0.0]])])  # model 0 exact, model 1 error 1
    codes = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 1.0, 0.0]], [[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])
    meter = metrics.ReconstructionMeter()
    meter.update(x[:1], x_hat[:, :1], codes[:, :1])  # two batches give the same totals as one
    meter.update(x[1:], x_hat[:, 1:], codes[:, 1:])
    st = meter.result()
    assert st.mse.tolist() == [0.0, 1 / 4]
    assert st.fvu.tolist() == [0.0, 1 / 4]
    assert st.l0.tolist() == [1.5, 0.5]
    assert st.dead_features.tolist() == [1, 2]
    assert st.feature_density[0].tolist() == [0.5, 1.0, 0.0]


def test_meter_without_batches_is_an_error():
    with pytest.raises(ValueError):
        metrics.ReconstructionMeter().result()


def test_ce_loss_recovered_endpoints_and_midpoint():
    assert metrics.ce_loss_recovered(2.0, 5.0, 2.0) == 1.0  # perfect reconstruction
    assert metrics.ce_loss_recovered(2.0, 5.0, 5.0) == 0.0  # as bad as zero-ablation
    assert metrics.ce_loss_recovered(2.0, 5.0, 3.5) == 0.5


def test_kl_divergence_by_hand():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_per_position(p, q).item() == pytest.approx(expected)
    assert metrics.kl_per_position(p, p).item() == pytest.approx(0.0, abs=1e-7)


def test_a_metric_that_cannot_be_computed_is_written_as_null():
    from sparse_coding.eval.report import sweep_rows
    from sparse_coding.saes import build_sae

    sae = build_sae("relu", 3, 4, [{"l1_alpha": 1.0}])
    nan = torch.tensor([float("nan")])
    stats = metrics.ReconstructionStats(mse=torch.zeros(1), fvu=nan, l0=torch.zeros(1),
                                        fire_counts=torch.ones(1, 4), n_examples=1)  # fmt: skip
    (row,) = sweep_rows([sae], [stats], [1.0], 0.9, progress=False)
    assert row["fvu"] is None and row["mse"] == 0.0
