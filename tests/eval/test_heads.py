"""Per-head attribution: each latent's share of its decoder's squared norm per head block, by hand."""

import pytest
import torch

from sparse_coding.eval.heads import head_shares, head_summary


def test_shares_are_each_head_blocks_part_of_the_squared_norm():
    decoder = torch.tensor(
        [
            [3.0, 0.0, 0.0, 4.0],  # heads of 2 columns: 9 in head 0, 16 in head 1
            [0.0, 0.0, 1.0, 1.0],  # all in head 1
            [0.0, 0.0, 0.0, 0.0],  # a zero row: no share anywhere
        ]
    )
    shares = head_shares(decoder, n_heads=2)
    torch.testing.assert_close(shares, torch.tensor([[9 / 25, 16 / 25], [0.0, 1.0], [0.0, 0.0]]))
    summary = head_summary(shares[:2])
    assert summary["head_top_share_mean"] == pytest.approx((16 / 25 + 1) / 2)
    assert summary["head_single_share"] == 0.5 and summary["latents_per_head"] == [0, 2]


def test_a_crosscoder_over_two_layers_has_every_layers_heads():
    decoder = torch.zeros(1, 2 * 3 * 4)  # 2 layers × 3 heads × d_head 4, layer-major
    decoder[0, 4 * 4 : 5 * 4] = 1.0  # layer 1, head 1
    torch.testing.assert_close(head_shares(decoder, 3, n_blocks=2), torch.tensor([[0.0, 0, 0, 0, 1, 0]]))
    with pytest.raises(ValueError, match="not 2 × 5 heads"):
        head_shares(decoder, 5, n_blocks=2)
