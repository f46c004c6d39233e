"""Pure-kernel tests of HiPrune (docs/methods/hiprune.md section 7).

Encoded: recipes 1-5 (hand examples; expected selections are literals from the spec) and the
kernel-level part of recipe 7 (invariants on random fp64 scores). Model-level recipes (6 recompute
oracle, 7 batch / NeXT layout / keep-all logits, 8 reference equivalence) belong to the policy and
wiring tests.
"""
from __future__ import annotations

import random

import pytest
import torch

from vtprune.methods.hiprune import (
    anchor_count,
    attention_received,
    budget_per_view,
    buffer_candidates,
    cls_row_scores,
    hiprune_groups,
    hiprune_select,
    merge_unit_scores,
    qwen_budget,
)

F64 = torch.float64




def _s(values):
    return torch.tensor(values, dtype=F64)


def _grid5_scores(peaks: dict[int, float]) -> torch.Tensor:
    s = torch.zeros(25, dtype=F64)
    for i, v in peaks.items():
        s[i] = v
    return s


# ---------------------------------------------------------------- recipe 1: 5x5, clamp vs drop
S_D_UP = torch.arange(25, dtype=F64) / 100  # s_d[i] = i / 100
R1_SO = _grid5_scores({12: 0.9, 3: 0.8})


def test_recipe1_clamp():
    g = hiprune_groups(R1_SO, S_D_UP, 12, 1.0, 5, buffer_border="clamp")
    assert g.anchors.tolist() == [12, 3]
    assert g.ab.tolist() == [0, 2, 3, 4, 7, 8, 11, 12, 13, 17]
    assert sorted(g.registers.tolist()) == [23, 24]
    assert g.kept.tolist() == [0, 2, 3, 4, 7, 8, 11, 12, 13, 17, 23, 24]


@pytest.mark.parametrize("border", ["drop", "grid"])
def test_recipe1_drop_and_grid(border):
    g = hiprune_groups(R1_SO, S_D_UP, 12, 1.0, 5, buffer_border=border)
    assert g.anchors.tolist() == [12, 3]
    assert g.ab.tolist() == [2, 3, 4, 7, 8, 11, 12, 13, 17]
    assert sorted(g.registers.tolist()) == [22, 23, 24]
    assert g.kept.tolist() == [2, 3, 4, 7, 8, 11, 12, 13, 17, 22, 23, 24]


# ---------------------------------------------------------------- recipe 2: row wrap, grid vs drop
R2_SO = _grid5_scores({10: 0.9, 24: 0.8})
S_D_DOWN = (25 - torch.arange(25, dtype=F64)) / 100  # s_d[i] = (25 - i) / 100


@pytest.mark.parametrize("border", ["drop", "clamp"])
def test_recipe2_drop_clamp_wrap(border):
    g = hiprune_groups(R2_SO, S_D_DOWN, 12, 1.0, 5, buffer_border=border)
    assert g.ab.tolist() == [5, 9, 10, 11, 15, 19, 23, 24]
    assert sorted(g.registers.tolist()) == [0, 1, 2, 3]
    assert g.kept.numel() == 12
    assert g.kept.tolist() == [0, 1, 2, 3, 5, 9, 10, 11, 15, 19, 23, 24]


def test_recipe2_grid_no_wrap():
    g = hiprune_groups(R2_SO, S_D_DOWN, 12, 1.0, 5, buffer_border="grid")
    assert g.ab.tolist() == [5, 10, 11, 15, 19, 23, 24]
    assert sorted(g.registers.tolist()) == [0, 1, 2, 3, 4]
    assert g.kept.numel() == 12
    assert g.kept.tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 15, 19, 23, 24]


# ---------------------------------------------------------------- recipe 3: subtract-one bug
R3_SO = _s([0, 0, 0, 0, 1.0, 0, 0, 0, 0])  # peaks at 4
R3_SD = _s([0.5, 0.2, 0.3, 0.1, 4.0, 0.2, 0.6, 0.1, 0.4])


def test_recipe3_exclude():
    g = hiprune_groups(R3_SO, R3_SD, 7, 1.0, 3, register_exclusion="exclude")
    assert anchor_count(7, 1.0) == 1
    assert g.ab.tolist() == [1, 3, 4, 5, 7]
    assert g.registers.tolist() == [6, 0]
    assert g.kept.tolist() == [0, 1, 3, 4, 5, 6, 7]


def test_recipe3_subtract_one_documents_reference_bug():
    g = hiprune_groups(R3_SO, R3_SD, 7, 1.0, 3, register_exclusion="subtract_one")
    assert g.ab.tolist() == [1, 3, 4, 5, 7]
    assert g.registers.tolist() == [4, 6]  # 4 re-picked at 4.0 - 1 = 3.0
    assert g.kept.tolist() == [1, 3, 4, 5, 6, 7]  # 6 tokens instead of 7: the reference bug
    sel = hiprune_select(R3_SO, R3_SD, 7, 1.0, 3, register_exclusion="subtract_one")
    assert sel.tolist() == [1, 3, 4, 5, 6, 7]


# ---------------------------------------------------------------- recipe 4: banker's rounding
@pytest.mark.parametrize(
    "n_keep, expected", [(125, 2), (175, 4), (192, 4), (128, 3), (64, 1)]
)
def test_recipe4_anchor_count(n_keep, expected):
    assert anchor_count(n_keep, 0.1) == expected


# ---------------------------------------------------------------- recipe 5: Qwen reduction
R5_UNITS = [[1, 1, 1, 1], [2, 2, 2, 2], [0, 0, 0, 4], [0.5, 0.5, 0.5, 0.5]]


def test_recipe5_qwen_units_raster():
    s_patch = _s([v for unit in R5_UNITS for v in unit])
    assert merge_unit_scores(s_patch).tolist() == [1, 2, 1, 0.5]
    assert merge_unit_scores(s_patch, [0, 1, 2, 3]).tolist() == [1, 2, 1, 0.5]


def test_recipe5_qwen_units_window_order():
    window_index = [2, 0, 3, 1]  # window position -> raster unit; unit 2's patches come first
    s_patch_win = _s([v for w in window_index for v in R5_UNITS[w]])
    assert s_patch_win[:4].tolist() == [0, 0, 0, 4]
    assert merge_unit_scores(s_patch_win, torch.tensor(window_index)).tolist() == [1, 2, 1, 0.5]


# ---------------------------------------------------------------- reductions (own hand example)
# 1 view, 2 heads, 3 tokens (CLS + 2 patches); rows are queries, each sums to 1.
PROBS = torch.tensor(
    [[[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]],
      [[0.4, 0.4, 0.2], [0.2, 0.2, 0.6], [0.3, 0.5, 0.2]]]],
    dtype=F64,
)


def test_clip_reduction_mean_all_rows_drop_cls():
    s = attention_received(PROBS, family="clip")
    assert s.shape == (1, 2) and s.dtype == F64
    # head mean columns sums over the 3 rows: [.85, 1.1, 1.05]; mean over rows; CLS column dropped
    torch.testing.assert_close(s, torch.tensor([[1.1 / 3, 1.05 / 3]], dtype=F64))


def test_qwen_reduction_sum_over_queries():
    s = attention_received(PROBS[0], family="qwen")
    torch.testing.assert_close(s, torch.tensor([0.85, 1.1, 1.05], dtype=F64))


def test_cls_row_option():
    torch.testing.assert_close(cls_row_scores(PROBS), torch.tensor([[0.35, 0.2]], dtype=F64))


def test_reduction_fp32_default():
    assert attention_received(PROBS.half(), family="clip").dtype == torch.float32


# ---------------------------------------------------------------- budgets
def test_budget_per_view():
    assert budget_per_view(640, 5) == [128] * 5
    assert budget_per_view(640, 3) == [213, 213, 213]  # 639 in total
    assert budget_per_view(640, 3, "exact") == [214, 213, 213]
    assert budget_per_view(160, 5, "exact") == [32] * 5


def test_qwen_budget_half_to_even():
    assert qwen_budget(10, 0.25) == 2  # round(2.5)
    assert qwen_budget(14, 0.25) == 4  # round(3.5)
    assert qwen_budget(256, 0.334) == 86
    assert qwen_budget(256, 0.112) == 29
    assert qwen_budget(256, 64) == 64
    assert qwen_budget(40, 64) == 40


# ---------------------------------------------------------------- more hand examples (ours)
def test_ties_lowest_index():
    z = torch.zeros(25, dtype=F64)
    g = hiprune_groups(z, z, 12, 1.0, 5)
    assert g.anchors.tolist() == [0, 1]
    assert g.ab.tolist() == [0, 1, 2, 5, 6]
    assert g.registers.tolist() == [3, 4, 7, 8, 9, 10, 11]
    assert g.kept.tolist() == list(range(12))


def test_square_buffers():
    a = torch.tensor([12])
    assert buffer_candidates(a, 25, 5, buffer_shape="square").tolist() == [
        6, 7, 8, 11, 12, 13, 16, 17, 18]
    a = torch.tensor([10])
    assert buffer_candidates(a, 25, 5, buffer_shape="square", buffer_border="grid").tolist() == [
        5, 6, 10, 11, 15, 16]
    assert buffer_candidates(a, 25, 5, buffer_shape="square", buffer_border="drop").tolist() == [
        4, 5, 6, 9, 10, 11, 14, 15, 16]
    a = torch.tensor([0])
    assert buffer_candidates(a, 25, 5, buffer_shape="square", buffer_border="clamp").tolist() == [
        0, 1, 4, 5, 6]


def test_valid_mask_native_next():
    valid = torch.ones(25, dtype=torch.bool)
    valid[:5] = False
    valid[20:] = False  # first and last rows are unpadding margin
    s_o = _grid5_scores({2: 0.95, 12: 0.9, 7: 0.8})
    g = hiprune_groups(s_o, S_D_UP, 12, 1.0, 5, valid=valid)
    assert sorted(g.anchors.tolist()) == [7, 12]  # 2 is invalid
    assert g.ab.tolist() == [6, 7, 8, 11, 12, 13, 17]  # buffer candidate 2 dropped
    assert sorted(g.registers.tolist()) == [14, 15, 16, 18, 19]  # never 20..24
    assert g.kept.tolist() == [6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    # budget above n_valid keeps every valid position
    assert hiprune_select(s_o, S_D_UP, 20, 1.0, 5, valid=valid).tolist() == list(range(5, 20))


def test_ab_over_budget_raises():
    s_o = _grid5_scores({6: 0.9, 8: 0.8, 16: 0.7, 18: 0.6})
    assert anchor_count(8, 2.5) == 4
    with pytest.raises(ValueError):
        hiprune_select(s_o, S_D_UP, 8, 2.5, 5)


def test_keep_all_and_zero():
    g = torch.Generator().manual_seed(0)
    s_o, s_d = torch.rand(576, generator=g, dtype=F64), torch.rand(576, generator=g, dtype=F64)
    assert hiprune_select(s_o, s_d, 576, 0.1, 24).tolist() == list(range(576))
    assert hiprune_select(s_o, s_d, 0, 0.1, 24).numel() == 0


# ---------------------------------------------------------------- recipe 7: invariants
def _topk_oracle(scores: list[float], k: int, cands: list[int]) -> list[int]:
    return sorted(cands, key=lambda i: (-scores[i], i))[:k]


def _grid_neighbours(a: int, n: int, c: int) -> set[int]:
    out = {a}
    r, col = divmod(a, c)
    for dr, dc in ((0, -1), (0, 1), (-1, 0), (1, 0)):
        rr, cc = r + dr, col + dc
        if 0 <= cc < c and rr >= 0 and rr * c + cc < n:
            out.add(rr * c + cc)
    return out


def _check_invariants(g, n_keep, n, exclusion="exclude"):
    kept = g.kept.tolist()
    assert len(kept) == n_keep
    assert all(a < b for a, b in zip(kept, kept[1:]))  # strictly increasing => no duplicates
    assert 0 <= kept[0] and kept[-1] < n
    ab, reg = set(g.ab.tolist()), g.registers.tolist()
    assert set(g.anchors.tolist()) <= ab <= set(kept)
    if exclusion == "exclude":
        assert not ab & set(reg)
        assert len(reg) == len(set(reg))
    assert set(kept) == ab | set(reg)


CASES = [(576, 24), (280, 20)]
KEEPS = [192, 128, 64, 5, 125]


@pytest.mark.parametrize("n, c", CASES)
def test_invariants_default_against_python_oracle(n, c):
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        s_o = torch.rand(n, generator=gen, dtype=F64)
        s_d = torch.rand(n, generator=gen, dtype=F64)
        so, sd = s_o.tolist(), s_d.tolist()
        for keep in KEEPS:
            g = hiprune_groups(s_o, s_d, keep, 0.1, c)
            _check_invariants(g, keep, n)
            # independent oracle: anchors, grid-cross buffers, registers
            anchors = _topk_oracle(so, anchor_count(keep, 0.1), list(range(n)))
            assert g.anchors.tolist() == anchors
            ab = set().union(*[_grid_neighbours(a, n, c) for a in anchors]) if anchors else set()
            assert g.ab.tolist() == sorted(ab)
            rest = [i for i in range(n) if i not in ab]
            assert g.registers.tolist() == _topk_oracle(sd, keep - len(ab), rest)
            # determinism
            assert torch.equal(hiprune_select(s_o, s_d, keep, 0.1, c), g.kept)


@pytest.mark.parametrize("border", ["grid", "drop", "clamp"])
@pytest.mark.parametrize("shape", ["cross", "square"])
@pytest.mark.parametrize("n, c", CASES)
def test_invariants_all_options(n, c, border, shape):
    for seed in range(20):
        gen = torch.Generator().manual_seed(1000 + seed)
        s_o = torch.rand(n, generator=gen, dtype=F64)
        s_d = torch.rand(n, generator=gen, dtype=F64)
        for keep in KEEPS:
            g = hiprune_groups(s_o, s_d, keep, 0.1, c, buffer_border=border, buffer_shape=shape)
            _check_invariants(g, keep, n)
            # LLaVA-like scores in [0, 1): subtract_one is harmless and equals exact exclusion
            g1 = hiprune_groups(s_o, s_d, keep, 0.1, c, buffer_border=border, buffer_shape=shape,
                                register_exclusion="subtract_one")
            assert torch.equal(g1.kept, g.kept)


def test_invariants_ties_integer_scores():
    # many exact ties: the selection must follow (score desc, index asc)
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        s_o = torch.randint(0, 3, (576,), generator=gen).to(F64)
        s_d = torch.randint(0, 3, (576,), generator=gen).to(F64)
        so, sd = s_o.tolist(), s_d.tolist()
        g = hiprune_groups(s_o, s_d, 128, 0.1, 24)
        _check_invariants(g, 128, 576)
        anchors = _topk_oracle(so, 3, list(range(576)))
        assert g.anchors.tolist() == anchors
        ab = set().union(*[_grid_neighbours(a, 576, 24) for a in anchors])
        rest = [i for i in range(576) if i not in ab]
        assert g.registers.tolist() == _topk_oracle(sd, 128 - len(ab), rest)


def test_invariants_valid_mask():
    rnd = random.Random(0)
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        s_o = torch.rand(576, generator=gen, dtype=F64)
        s_d = torch.rand(576, generator=gen, dtype=F64)
        valid = torch.zeros(24, 24, dtype=torch.bool)
        top, bottom = rnd.randint(0, 10), rnd.randint(14, 24)
        valid[top:bottom] = True  # unpadding keeps a band of rows
        valid = valid.reshape(-1)
        n_valid = int(valid.sum())
        for keep in KEEPS:
            g = hiprune_groups(s_o, s_d, keep, 0.1, 24, valid=valid)
            kept = g.kept.tolist()
            assert len(kept) == min(keep, n_valid)
            assert all(valid[i] for i in kept)
            assert all(a < b for a, b in zip(kept, kept[1:]))
            assert set(g.ab.tolist()) <= set(kept) and not set(g.ab.tolist()) & set(g.registers.tolist())
