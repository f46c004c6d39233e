"""SparseVLM kernels, hand-worked (the golden fixtures are in test_sparsevlm_golden.py)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from vtprune.methods import sparsevlm as SV

from _golden_models import mha_llava

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sparsevlm"


def test_select_raters_hand_worked():
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    # row 1: softmax([1, 0, 5]) = (0.0179, 0.0066, 0.9755); row 2: softmax([0, 0, 0]) = 1/3 each
    # m = (0.1756, 0.1700, 0.6544); mean(m) = 1/3 -> only the third text token is a rater
    assert SV.select_raters(visual, text).tolist() == [False, False, True]


def test_relation_scores_hand_worked():
    probs = torch.tensor([[[0.2, 0.8, 0.0], [0.1, 0.3, 0.6]],
                          [[0.4, 0.6, 0.0], [0.3, 0.3, 0.4]]])  # (H=2, R=2, L=3)
    # head mean: [[0.3, 0.7, 0.0], [0.2, 0.3, 0.5]]; row mean: [0.25, 0.5, 0.25]
    torch.testing.assert_close(SV.relation_scores(probs), torch.tensor([0.25, 0.5, 0.25]))
    # a filler row is ignored
    torch.testing.assert_close(SV.relation_scores(probs, torch.tensor([True, False])), torch.tensor([0.3, 0.7, 0.0]))


def test_stage_keep_always_drops_one():
    rel = torch.tensor([0.1, 0.5, 0.3, 0.5])
    assert SV.stage_keep(rel, 10).tolist() == [1, 2, 3]  # min(10, 4 - 1) = 3
    assert SV.stage_keep(rel, 2).tolist() == [1, 3]  # ties: the lowest index first
    assert SV.stage_keep(torch.tensor([0.4]), 5).tolist() == []


def test_recycle_pool_and_cluster_counts():
    rel = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0])
    assert SV.recycle_pool(rel).tolist() == [1, 3, 5]  # int(7 * 0.3) + 1 = 3, best first
    assert SV.recycle_pool(rel, 0.0).tolist() == [1]
    assert [SV.n_clusters(n) for n in (1, 3, 9, 10, 83)] == [1, 1, 1, 2, 9]


def test_dpc_knn_merge_hand_worked():
    x = torch.tensor([[0.0], [0.1], [0.3], [5.0], [5.2]], dtype=torch.float64)
    noise = torch.tensor([0.0, 1e-3, 0.0, 2e-3, 0.0], dtype=torch.float64)
    merged, centres, assign = SV.dpc_knn_merge(x, 2, noise)
    # densities (2 nearest incl. self): exp(-0.005) for 0, 1 (+1e-3 for 1), exp(-0.02) for 2, 3, 4 (+2e-3 for 3);
    # delta: 1 is the densest (max distance 5.2), 0 -> 0.1 (to 1), 2 -> 0.2 (to 1), 3 -> 4.9 (to 1), 4 -> 0.2 (to 3)
    # score delta * density: 1 (5.18) and 3 (4.81) are the centres; 0 and 2 join 1, 4 joins 3
    assert centres.tolist() == [1, 3] and assign.tolist() == [0, 0, 0, 1, 1]
    torch.testing.assert_close(merged, torch.tensor([[0.4 / (3 + 1e-6)], [10.2 / (2 + 1e-6)]], dtype=torch.float64))


def test_schedules():
    assert SV.schedule_counts(576) == (300, 200, 110)
    assert SV.schedule_counts(576, retain=64, version="2.0") == (66, 34, 20)
    assert SV.schedule_counts(64) == (33, 22, 12)  # 300 * 64 // 576, ...
    assert SV.schedule_counts(64, schedule=(5, 4, 3)) == (5, 4, 3)
    assert [SV.default_priority_heads(h) for h in (32, 4, 40, 1)] == [14, 2, 18, 1]


def test_priority_heads_and_gravity():
    probs = torch.tensor([[[0.5, 0.1, 0.4]], [[0.1, 0.1, 0.8]], [[0.3, 0.6, 0.1]]])  # (H=3, R=1, L=3)
    visual = torch.tensor([True, True, False])
    # visual sums: 0.6, 0.2, 0.9 -> heads 2, 0
    assert SV.priority_heads(probs, torch.tensor([True]), visual, 2).tolist() == [2, 0]
    rope = torch.tensor([[2.0, 4.0, -1.0]])
    torch.testing.assert_close(SV.gravity_corrected(probs, rope)[0, 0], torch.tensor([0.25, 0.025, -0.4]))


def test_rope_scores_of_all_ones_depend_on_the_distance_only():
    model, proc = mha_llava(num_layers=2)
    from vtprune.adapters import get_adapter

    ad = get_adapter(model)
    h = torch.zeros(1, 6, 64, dtype=torch.float64)
    pos = torch.arange(6)[None]
    scores = ad.llm_rope_scores(0, h, ad.rotary(h, pos), torch.tensor([[5, 2]]))  # (1, 2, 6)
    hd = 16
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    want = torch.stack([2 * torch.cos((r - torch.arange(6, dtype=torch.float64))[:, None] * inv).sum(-1) / math.sqrt(hd)
                        for r in (5, 2)])
    torch.testing.assert_close(scores[0], want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ golden
def test_rank_budget_hand_worked():
    rows = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # rank 2, v = 4
    assert SV.rank_budget(rows, 1.0, 0.5) == (2, 2)  # int(2 * 1 + 0.5)
    assert SV.rank_budget(rows, 13.5, 0.0) == (2, 3)  # capped at v - 1
    assert SV.rank_budget(torch.eye(3), 13.5, 0.0) == (3, 3)  # rank == v: no pruning
