"""DART kernels: hand-worked cases (the golden fixtures are in test_dart_golden.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vtprune.methods import dart as D

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dart"


def test_top_positions_best_first_ties_to_the_first_listed():
    assert D.top_positions(torch.tensor([1.0, 3.0, 3.0, 2.0]), [10, 11, 12, 13], 2) == [11, 12]
    assert D.top_positions(torch.tensor([1.0, 3.0, 3.0, 2.0]), [10, 12, 11, 13], 3) == [12, 11, 13]
    assert D.top_positions(torch.tensor([1.0]), [5], 4) == [5] and D.top_positions(torch.tensor([1.0]), [5], 0) == []


def test_picks_per_pivot_reference_and_exact():
    # reference: int(576 * (1 - 0.7778) / 8) = int(15.9984) = 15 per pivot -> 4 + 8 * 15 = 124 kept
    assert D.picks_per_pivot(576, 8, 4, 8, reduction_ratio=0.7778) == [15] * 8
    assert D.picks_per_pivot(576, 8, 4, 8, keep=0.222) == [15] * 8  # int(127.872 / 8)
    assert D.picks_per_pivot(576, 8, 4, 8, keep=128) == [16] * 8  # max_num_trunction: 128 // 8
    # the divisor is the configured pivot count even when fewer text pivots exist (6 pivots here)
    assert D.picks_per_pivot(576, 8, 4, 6, keep=128) == [16] * 6
    # exact: 128 - 4 image pivots = 124 picks over 8 pivots = 15 r 4
    assert D.picks_per_pivot(576, 8, 4, 8, keep=128, rule="exact") == [16] * 4 + [15] * 4
    assert D.picks_per_pivot(576, 8, 4, 8, keep=0.5, rule="exact") == [36] * 4 + [35] * 4  # 288 - 4 = 284
    assert D.picks_per_pivot(10, 8, 4, 8, keep=2, rule="exact") == [0] * 8
    with pytest.raises(ValueError, match="budget rule"):
        D.picks_per_pivot(10, 8, 4, 8, keep=2, rule="nope")


def test_budget_counts():
    assert D.dart_budget(576, 40, reduction_ratio=0.7778) == 124
    assert D.dart_budget(576, 2, reduction_ratio=0.7778) == 4 + 6 * 15  # two text pivots only
    assert D.dart_budget(576, 40, keep=128, budget_rule="exact") == 128
    assert D.dart_budget(16, 5, keep=1.0) == 16  # capped at the candidates
    assert D.dart_budget(3, 5, keep=0.5) == 3


def test_visiting_order_is_the_cpython_set_order():
    # worked by hand (CPython 3.11 set, 8 slots, mask 7; no linear probing since i + 9 > mask):
    # 40 -> slot 0; 3 -> slot 3; 35 -> 3 taken, perturb = 35 >> 5 = 1, i = (3 * 5 + 1 + 1) & 7 = 1;
    # 1 -> 1 taken, perturb = 0, i = (1 * 5 + 1) & 7 = 6. Iteration by slot: 40, 35, 3, 1.
    assert D.visiting_order([40, 3], [35, 1], "set") == [40, 35, 3, 1]
    assert D.visiting_order([40, 3], [35, 1], "score") == [40, 3, 35, 1]
    with pytest.raises(ValueError, match="pivot_order"):
        D.visiting_order([1], [2], "random")


def test_hand_worked_selection():
    # positions 1..5 visual, 6 text; the image pivot is 3 (largest key norm), the text pivot is 6
    key_norm = torch.tensor([9.0, 1.0, 2.0, 5.0, 1.5, 0.5, 3.0])
    states = torch.tensor([[0.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    kept = D.dart_select(key_norm, states, torch.arange(1, 6), torch.tensor([6]), pivot_image=1, pivot_text=1,
                         picks=1)
    # pivot 3 = (1, 0) takes the least similar candidate, 4 (cos -1); pivot 6 = (0, 1) then takes 1
    # (cos 0.0995) over 2 (cos 1) and 5 (cos 0.707); the text pivot itself is text and never counted
    assert kept.tolist() == [1, 3, 4]
    # two picks each: 3 takes 4 and 2 (cos 0), then 6 takes 1 and 5
    kept2 = D.dart_select(key_norm, states, torch.arange(1, 6), torch.tensor([6]), pivot_image=1, pivot_text=1,
                          picks=2)
    assert kept2.tolist() == [1, 2, 3, 4, 5]
    # per-pivot picks (exact budget): 3 takes two (4, 2), 6 takes none
    assert D.dart_select(key_norm, states, torch.arange(1, 6), torch.tensor([6]), pivot_image=1, pivot_text=1,
                         picks=[2, 0]).tolist() == [2, 3, 4]


def test_order_matters_and_runs_out_gracefully():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(20, 8, generator=g)
    kn = torch.rand(20, generator=g)
    vis, txt = torch.arange(2, 14), torch.arange(14, 20)
    a = D.dart_select(kn, states, vis, txt, picks=3, pivot_order="set")
    assert a.numel() == 12  # 4 image pivots + 8 candidates left: later pivots find nothing
    b = D.dart_select(kn, states, vis, txt, picks=1, pivot_order="score")
    assert b.numel() == 12 and torch.equal(torch.unique(b), b)
