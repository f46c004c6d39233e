"""VisPruner kernels on hand-worked cases: the important split, the duplicate-removal rounds, edges."""
from __future__ import annotations

import math

import pytest
import torch

from vtprune.methods.vispruner import important_count, importance_order, remove_duplicates, vispruner_select


def unit_circle(degrees):
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


# 8 tokens: importance scores and 2-D directions (degrees)
SCORES = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.4, 0.6], dtype=torch.float64)
FEATS = unit_circle([0.0, 100.0, 45.0, 170.0, 90.0, 52.0, 175.0, 120.0])


def test_important_count_is_the_floor_of_the_float_product():
    assert important_count(64, 0.5) == 32 and important_count(64, 0.75) == 48
    assert important_count(5, 0.5) == 2
    assert important_count(100, 0.29) == 28  # 100 * 0.29 = 28.999999999999996 in floating point
    assert important_count(7, 1.0) == 7 and important_count(7, 0.0) == 0
    with pytest.raises(ValueError, match="important_ratio"):
        important_count(7, 1.5)


def test_importance_order_descending_ties_lowest_index():
    assert importance_order(SCORES).tolist() == [0, 4, 7, 2, 6, 3, 5, 1]
    assert importance_order(torch.tensor([1.0, 2.0, 2.0, 1.0])).tolist() == [1, 2, 0, 3]


def test_hand_worked_rounds_with_step_2():
    # T = 4, r = 0.5: important [0, 4]; residual R = [7, 2, 6, 3, 5, 1], T_div = 2.
    # Round 1 (m = 2): A = [7, 6, 5], B = [2, 3, 1]; max cos to B: 7 -> cos20 = .940 (to 1),
    # 6 -> cos5 = .996 (to 3), 5 -> cos7 = .993 (to 2): drop 6 and 5 -> R = [7] + [2, 3, 1].
    # Round 2 (m = 2): A = [7, 3], B = [2, 1]; 7 -> .940, 3 -> cos70 = .342: drop both -> R = [2, 1].
    residual = torch.tensor([7, 2, 6, 3, 5, 1])
    assert remove_duplicates(FEATS, residual, 2, step=2).tolist() == [2, 1]
    g = vispruner_select(SCORES, FEATS, 4, 0.5, step=2)
    assert g.important.tolist() == [0, 4] and g.diverse.tolist() == [2, 1] and g.kept.tolist() == [0, 1, 2, 4]


def test_default_step_drops_at_most_all_of_a():
    # step 8: round 1 wants m = 4 but A = [7, 6, 5] has 3 members -> all dropped, R = [2, 3, 1]
    # (the reference raises here); round 2, m = 1: A = [2, 1], B = [3]: 2 -> cos125 < 0,
    # 1 -> cos70 = .342: drop 1 -> R = [2, 3].
    g = vispruner_select(SCORES, FEATS, 4, 0.5)
    assert g.diverse.tolist() == [2, 3] and g.kept.tolist() == [0, 2, 3, 4]


def test_odd_residual_list():
    # T = 3, r = 0.5: T_imp = 1 (token 0); R = [4, 7, 2, 6, 3, 5, 1] (7, odd), T_div = 2.
    # step 8, round 1: m = 5, A = [4, 2, 3, 1] (4 members): all dropped -> R = [7, 6, 5]; round 2:
    # m = 1, A = [7, 5], B = [6]: 7 -> cos55 = .574, 5 -> cos123 < 0: drop 7 -> R = [5, 6].
    g = vispruner_select(SCORES, FEATS, 3, 0.5)
    assert g.important.tolist() == [0] and g.diverse.tolist() == [5, 6] and g.kept.tolist() == [0, 5, 6]


def test_ratio_extremes_and_full_budget():
    assert vispruner_select(SCORES, FEATS, 3, 1.0).kept.tolist() == [0, 4, 7]  # attention only
    g = vispruner_select(SCORES, FEATS, 3, 0.0)
    assert g.important.numel() == 0 and g.kept.numel() == 3
    assert vispruner_select(SCORES, FEATS, 8, 0.5).kept.tolist() == list(range(8))
    assert vispruner_select(SCORES, FEATS, 0, 0.5).kept.numel() == 0


def test_ties_in_similarity_drop_the_earlier_member_of_a():
    # A = [0, 2] both identical to B's 1 -> the earlier (0) is dropped
    x = unit_circle([10.0, 10.0, 10.0, 200.0])
    assert remove_duplicates(x, torch.tensor([0, 1, 2, 3]), 3, step=1).tolist() == [2, 1, 3]


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_keep must be an int"):
        vispruner_select(SCORES, FEATS, 9)
    with pytest.raises(ValueError, match="rows for 8 scores"):
        vispruner_select(SCORES, FEATS[:7], 4)
    with pytest.raises(ValueError, match="step must be"):
        remove_duplicates(FEATS, torch.arange(8), 2, step=0)
    with pytest.raises(ValueError, match="NaN"):
        importance_order(torch.tensor([1.0, float("nan")]))
