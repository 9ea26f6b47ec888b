"""SAEBench's core metrics on hand-computed cases (their agreement with SAELens' own functions is checked in
tests/pipelines/test_evaluate.py)."""

import math

import pytest
import torch

from sparse_coding.eval import core, metrics
from sparse_coding.saes import build_sae


def _stats():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # ‖x‖ = 5, 2; mean (1.5, 3); Σ‖x − mean‖² = 2.25·2 + 1·2 = 6.5
    x_hat = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])  # errors 16 and 1; ‖x̂‖ = 3, 1
    codes = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.5]]])
    meter = metrics.ReconstructionMeter()
    meter.update(x[:1], x_hat[:, :1], codes[:, :1])
    meter.update(x[1:], x_hat[:, 1:], codes[:, 1:])
    return meter.result()


def test_reconstruction_statistics_by_hand():
    st = _stats()
    assert st.fvu.item() == pytest.approx(17 / 6.5)
    assert st.mse_per_token.item() == pytest.approx(17 / 2) and st.mse.item() == pytest.approx(17 / 4)
    assert st.l0.item() == 1.5 and st.l1.item() == pytest.approx((3 + 0.5) / 2)
    assert st.cossim.item() == pytest.approx((9 / 15 + 2 / 2) / 2)
    assert st.l2_norm_in.item() == pytest.approx(3.5) and st.l2_norm_out.item() == pytest.approx(2.0)
    assert st.l2_ratio.item() == pytest.approx((3 / 5 + 1 / 2) / 2)
    assert st.relative_reconstruction_bias.item() == pytest.approx((9 + 1) / (9 + 2))  # E‖x̂‖² / E[x·x̂]


def test_max_other_cosine_ignores_itself_and_works_in_chunks():
    rows = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    expected = [1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]
    assert core.max_other_cosine(rows).tolist() == pytest.approx(expected)
    assert core.max_other_cosine(rows, chunk=2).tolist() == pytest.approx(expected)


def test_density_metrics_by_hand():
    d = torch.tensor([0.0, 0.005, 0.02, 0.5])
    out = core.density_metrics(d)
    assert out["frac_alive"] == 0.75
    assert out["freq_over_1_percent"] == 0.5 and out["freq_over_10_percent"] == 0.25
    assert out["normalized_freq_over_1_percent"] == pytest.approx(0.52 / 0.525)
    assert out["normalized_freq_over_10_percent"] == pytest.approx(0.5 / 0.525)


def test_scores_by_hand():
    assert metrics.ce_loss_recovered(2.0, 5.0, 3.5) == 0.5
    assert metrics.kl_score(2.0, 0.5) == 0.75


def test_core_metrics_are_saebenchs_categories_and_keys():
    sae = build_sae("relu", 2, 3, [{"l1_alpha": 1.0}])
    out = core.core_metrics(_stats(), 0, core.weight_metrics(sae, 0), None, (10, 20))
    assert set(out) == {"model_behavior_preservation", "model_performance_preservation", "reconstruction_quality",
                        "shrinkage", "sparsity", "token_stats", "misc_metrics"}  # fmt: skip
    assert out["model_performance_preservation"]["ce_loss_score"] is None  # no model: null, never NaN
    assert out["token_stats"] == {"total_tokens_eval_reconstruction": 0, "total_tokens_eval_sparsity_variance": 20}
    assert out["reconstruction_quality"]["explained_variance"] == pytest.approx(1 - 17 / 6.5)
    assert out["misc_metrics"]["frac_alive"] == pytest.approx(2 / 3)  # latent 1 never fires
    enc = core.max_other_cosine(sae.export(0)["W_enc"].T).mean().item()
    assert out["misc_metrics"]["average_max_encoder_cosine_sim"] == pytest.approx(enc)
