"""PyramidDrop kernels, hand-worked (the golden fixtures are in test_pyramiddrop_golden.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from vtprune.methods import pyramiddrop as PD


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pyramiddrop"


def test_stage_counts_floor_relative_to_the_original_count():
    assert PD.stage_counts(576, (0.5, 0.25, 0.125)) == (576, 288, 144, 72)
    assert PD.stage_counts(16, (0.75, 0.5625)) == (16, 12, 9)
    assert PD.stage_counts(10, (0.33,)) == (10, 3)  # int(3.3)


def test_lambda_schedule():
    assert PD.lambda_ratios(0.5, 3) == (0.5, 0.25, 0.125)
    assert PD.PyramidDrop(layer_list=(1, 2), lam=0.75).ratios == (0.75, 0.5625)


def test_rank_drop_top_scores_in_sequence_order_ties_lowest():
    assert PD.rank_drop(torch.tensor([0.1, 0.4, 0.3, 0.4, 0.0]), 2).tolist() == [1, 3]
    assert PD.rank_drop(torch.tensor([0.2, 0.2, 0.2]), 2).tolist() == [0, 1]
    assert PD.rank_drop(torch.tensor([0.5, 0.1, 0.9, 0.3]), 3).tolist() == [0, 2, 3]


def test_decode_shifts():
    # 576 -> 288 -> 144 -> 72 after 1-based layers 8, 16, 24 (= before 0-based 8, 16, 24)
    shifts = PD.decode_shifts(576, (0.5, 0.25, 0.125), (8, 16, 24), 32)
    assert shifts == (0,) * 8 + (288,) * 8 + (432,) * 8 + (504,) * 8
