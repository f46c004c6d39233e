"""DivPrune kernels on hand-worked cases: cosine distances, the max-min greedy order, ties, duplicates."""
from __future__ import annotations

import math

import pytest
import torch

from vtprune.methods.divprune import cosine_distances, divprune_select, maxmin_order


def unit_circle(degrees):
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


# Five directions: 0, 10, 90, 180, 185 degrees. Nearest-other distances (1 - cos): 0 and 1: 1-cos10 =
# 0.0152; 2: 1-cos80 = 0.826; 3 and 4: 1-cos5 = 0.0038 -> the first pick is 2 (most isolated).
# Min distance to {2}: 0: 1, 1: 0.826, 3: 1, 4: 1-cos95 = 1.087 -> 4. To {2, 4}: 0: 1, 1: 0.826,
# 3: 0.0038 -> 0. To {2, 4, 0}: 1: 0.0152, 3: 0.0038 -> 1, then 3.
CIRCLE = unit_circle([0.0, 10.0, 90.0, 180.0, 185.0])


def test_cosine_distances_hand_values():
    d = cosine_distances(CIRCLE)
    assert d.shape == (5, 5) and d.dtype == torch.float64
    assert d[0, 2] == pytest.approx(1.0) and d[0, 3] == pytest.approx(2.0)
    assert d[1, 2] == pytest.approx(1 - math.cos(math.radians(80)))
    assert torch.allclose(d, d.T) and torch.allclose(d.diagonal(), torch.zeros(5, dtype=torch.float64), atol=1e-15)
    # the norm does not matter
    assert torch.allclose(cosine_distances(CIRCLE * torch.tensor([[3.0], [0.5], [1.0], [7.0], [2.0]], dtype=torch.float64)), d)


def test_maxmin_order_hand_worked():
    d = cosine_distances(CIRCLE)
    assert maxmin_order(d, 5).tolist() == [2, 4, 0, 1, 3]
    for k, expected in [(1, [2]), (2, [2, 4]), (3, [0, 2, 4]), (4, [0, 1, 2, 4])]:
        assert divprune_select(CIRCLE, k).tolist() == expected
    assert maxmin_order(d, 0).numel() == 0


def test_fp32_default_and_fp64_kept():
    assert cosine_distances(CIRCLE.float()).dtype == torch.float32
    assert cosine_distances(CIRCLE.half()).dtype == torch.float32
    assert cosine_distances(CIRCLE).dtype == torch.float64


def test_ties_go_to_the_lowest_index():
    # four axis directions: every nearest-other distance is 1 -> first pick 0; then 2 (distance 2),
    # then 1 and 3 tie at 1 -> 1, then 3
    x = unit_circle([0.0, 90.0, 180.0, 270.0])
    assert maxmin_order(cosine_distances(x), 4).tolist() == [0, 2, 1, 3]


def test_duplicates_reference_repeats_default_excludes():
    # two directions, each three times: after one of each only distance-0 duplicates remain
    x = unit_circle([0.0, 0.0, 0.0, 90.0, 90.0, 90.0])
    d = cosine_distances(x)
    d.fill_diagonal_(0.0)  # exact self-distances, so the ordering below is not a rounding accident
    ours = maxmin_order(d, 4)
    assert ours.tolist() == [0, 3, 1, 2] and torch.unique(ours).numel() == 4
    ref = maxmin_order(d, 4, exclude_selected=False)
    assert ref.tolist() == [0, 3, 0, 0]  # the reference's literal argmax re-picks chosen tokens


def test_one_token_and_bad_arguments():
    x = torch.randn(1, 4)
    assert divprune_select(x, 1).tolist() == [0]
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 5\]"):
        maxmin_order(cosine_distances(CIRCLE), 6)
    with pytest.raises(ValueError, match="features must be"):
        cosine_distances(torch.randn(3))
    with pytest.raises(ValueError, match="zero feature vector"):
        cosine_distances(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"distances must be \(n, n\)"):
        maxmin_order(torch.zeros(3, 2), 1)


def test_selection_is_sorted_and_unique_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    out = divprune_select(x, 17)
    assert out.tolist() == sorted(set(out.tolist())) and out.numel() == 17
