"""Pure-kernel tests of ToDRE (docs/methods/todre.md section 7).

Encoded: recipes 1 (golden stage-1 example), 2 (ties), 3 (NeXT pivot), 4 (stage-2 hand example,
including the causality caveat) and the kernel-level part of recipe 6 (stage-1 invariants). Model-level
recipes (5 recompute oracle, 6 keep-all / cache length / KV-cache generation / batch) belong to the
policy and wiring tests.
"""
from __future__ import annotations

import pytest
import torch

from vtprune.methods.todre import (
    center_pivot,
    cls_attention,
    cls_pivot,
    diversity_select,
    farthest_pivot,
    kcenter_select,
    maxsum_select,
    random_pivot,
    relevance_layer_index,
    relevance_ratios,
    should_drop_visual,
    todre_budget,
)

F64 = torch.float64



# ---------------------------------------------------------------- recipe 1: golden stage-1 example
X = torch.tensor(
    [[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.1, 0.9, 0.1],
     [0, 0, 1], [-1, 0.2, 0], [0.5, 0.5, 0.5], [0, -1, 0.3]],
    dtype=F64,
)
CLS = torch.tensor([0.05, 0.30, 0.10, 0.02, 0.20, 0.08, 0.15, 0.10], dtype=F64)
MAXSUM_GREEDY = [[1], [1, 5], [1, 5, 7], [1, 5, 7, 2], [1, 5, 7, 2, 0], [1, 5, 7, 2, 0, 4],
                 [1, 5, 7, 2, 0, 4, 3], [1, 5, 7, 2, 0, 4, 3, 6]]
KCENTER_GREEDY_8 = [1, 5, 7, 2, 4, 6, 3, 0]


def test_recipe1_pivot():
    assert cls_pivot(CLS) == 1


@pytest.mark.parametrize("k", range(1, 9))
def test_recipe1_maxsum_greedy(k):
    assert maxsum_select(X, k, 1, order="greedy").tolist() == MAXSUM_GREEDY[k - 1]
    assert maxsum_select(X, k, 1).tolist() == sorted(MAXSUM_GREEDY[k - 1])


def test_recipe1_kcenter():
    assert kcenter_select(X, 5, 1, order="greedy").tolist() == [1, 5, 7, 2, 4]
    for k in range(5, 9):  # "then 6, 3, 0"
        assert kcenter_select(X, k, 1, order="greedy").tolist() == KCENTER_GREEDY_8[:k]
    for k in range(1, 5):  # identical to max-sum before k = 5
        assert kcenter_select(X, k, 1, order="greedy").tolist() == MAXSUM_GREEDY[k - 1]


def test_recipe1_sorted_at_k5():
    assert maxsum_select(X, 5, 1).tolist() == [0, 1, 2, 5, 7]
    assert kcenter_select(X, 5, 1).tolist() == [1, 2, 4, 5, 7]
    assert diversity_select(X, 5, 1, "maxsum").tolist() == [0, 1, 2, 5, 7]
    assert diversity_select(X, 5, 1, "kcenter").tolist() == [1, 2, 4, 5, 7]


def test_recipe1_why_they_differ():
    # the spec's intermediate numbers after C = {1, 5, 7, 2} (recomputed independently here)
    x = X / X.norm(dim=1, keepdim=True)
    g = x @ x.T
    chosen = [1, 5, 7, 2]
    sums = {i: round(float(g[i, chosen].sum()), 3) for i in (0, 3, 4, 6)}
    assert sums == {0: 0.013, 3: 0.377, 4: 0.287, 6: 0.375}
    dists = {i: round(float((1 - g[i, chosen]).min()), 3) for i in (0, 3, 4, 6)}
    assert dists == {0: 0.006, 3: 0.012, 4: 0.713, 6: 0.362}
    assert round(float(g[0, 1]), 3) == 0.994 and round(float(g[0, 5]), 3) == -0.981


# ---------------------------------------------------------------- recipe 2: ties
# rows 3 and 4 are duplicates with equal similarity to everything; every value below is exact.
TIE_X = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0], [-1, 0, 0]], dtype=F64)


def test_recipe2_ties_lowest_index():
    assert maxsum_select(TIE_X, 2, 0, order="greedy").tolist() == [0, 3]
    assert kcenter_select(TIE_X, 2, 0, order="greedy").tolist() == [0, 3]
    # then 1, 2, 4 tie (max-sum: all 0; k-center: 1, 1 and 0): lowest index again
    assert maxsum_select(TIE_X, 5, 0, order="greedy").tolist() == [0, 3, 1, 2, 4]
    assert kcenter_select(TIE_X, 5, 0, order="greedy").tolist() == [0, 3, 1, 2, 4]
    assert cls_pivot(torch.tensor([0.1, 0.3, 0.3, 0.2])) == 1


# ---------------------------------------------------------------- recipe 3: NeXT pivot
def test_recipe3_next_pivot_from_thumbnail():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(5 * 576, generator=gen, dtype=F64) * 0.5
    a[100] = 0.9  # thumbnail (base view) argmax
    a[576 * 3 + 17] = 2.0  # global argmax, in a crop
    assert cls_pivot(a) == 576 * 3 + 17  # video / plain rule: global argmax
    assert cls_pivot(a, n_base=576) == 100


def test_cls_attention_head_mean_drop_cls():
    row = torch.tensor([[0.2, 0.5, 0.3], [0.4, 0.2, 0.4]], dtype=F64)  # (H=2, T=3)
    torch.testing.assert_close(cls_attention(row), torch.tensor([0.35, 0.35], dtype=F64))
    assert cls_pivot(cls_attention(row)) == 0  # tie -> lowest index


# ---------------------------------------------------------------- recipe 4: stage-2 hand example
def _stage2_matrix(row4):
    return torch.tensor(
        [[1, 0, 0, 0, 0, 0],
         [0.5, 0.5, 0, 0, 0, 0],
         [0.3, 0.3, 0.4, 0, 0, 0],
         [0.25, 0.25, 0.25, 0.25, 0, 0],
         row4,
         [0.40, 0.01, 0.01, 0.02, 0.26, 0.30]],
        dtype=F64,
    )


S, V, T = [0], [1, 2, 3], [4, 5]


def test_recipe4_drop():
    a = _stage2_matrix([0.50, 0.02, 0.03, 0.01, 0.44, 0])
    t2v, v2t = relevance_ratios(a, S, V, T)
    torch.testing.assert_close(t2v, torch.tensor(0.05, dtype=F64))  # (.06 + .04) / 2
    assert v2t.item() == 0.0  # causal: text after the image
    assert should_drop_visual(t2v, v2t, 0.10)


def test_recipe4_keep():
    a = _stage2_matrix([0.30, 0.12, 0.05, 0.03, 0.50, 0])
    t2v, v2t = relevance_ratios(a, S, V, T)
    torch.testing.assert_close(t2v, torch.tensor(0.12, dtype=F64))  # (.20 + .04) / 2
    assert v2t.item() == 0.0
    assert not should_drop_visual(t2v, v2t, 0.10)


def test_stage2_heads_and_partial_rows():
    a = _stage2_matrix([0.50, 0.02, 0.03, 0.01, 0.44, 0])
    delta = torch.zeros_like(a)
    delta[4, 0], delta[4, 4] = 0.1, -0.1  # heads differ, mean equals a
    heads = torch.stack([a + delta, a - delta])
    t2v, v2t = relevance_ratios(heads, S, V, T)
    torch.testing.assert_close(t2v, torch.tensor(0.05, dtype=F64))
    # only the rows of V and T, with their positions; sets as bool masks / tensors
    t2v2, v2t2 = relevance_ratios(a[1:], torch.tensor(S), torch.tensor([0, 1, 1, 1, 0, 0]).bool(),
                                  T, query_positions=[1, 2, 3, 4, 5])
    torch.testing.assert_close(t2v2, torch.tensor(0.05, dtype=F64))
    assert v2t2.item() == 0.0


def test_stage2_v2t_literal_formula_non_causal():
    a = _stage2_matrix([0.50, 0.02, 0.03, 0.01, 0.44, 0])
    a[1] = torch.tensor([0.5, 0.3, 0, 0, 0.2, 0], dtype=F64)  # a visual row that sees text
    _, v2t = relevance_ratios(a, S, V, T)
    torch.testing.assert_close(v2t, torch.tensor(0.2 / 3, dtype=F64))


def test_should_drop_strict():
    assert not should_drop_visual(0.10, 0.0, 0.10)
    assert not should_drop_visual(0.05, 0.10, 0.10)
    assert should_drop_visual(0.0999, 0.0999, 0.10)
    assert not should_drop_visual(torch.tensor(float("nan")), 0.0, 0.10)


def test_relevance_layer_index():
    # spec section 3 stage 2 step 1
    assert relevance_layer_index(32) == 27
    assert relevance_layer_index(40) == 34
    assert relevance_layer_index(28) == 23  # round(24.5) = 24
    assert relevance_layer_index(36) == 31  # round(31.5) = 32


def test_todre_budget():
    assert todre_budget(2880, 0.25) == 720
    assert todre_budget(2880, 0.10) == 288
    assert todre_budget(10, 0.25) == 2  # round(2.5), half-to-even
    assert todre_budget(14, 0.25) == 4  # round(3.5)
    assert todre_budget(3, 0.1) == 1  # max(1, round(0.3))
    assert todre_budget(5, 10) == 5
    assert todre_budget(576, 192) == 192
    assert todre_budget(2000, 0.25, nominal_tokens=2880) == 720
    assert todre_budget(600, 0.25, nominal_tokens=2880) == 600


def test_no_cls_pivots():
    f = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=F64)
    assert farthest_pivot(f) == 3
    assert center_pivot(f) == 0
    assert random_pivot(100, seed=3) == random_pivot(100, seed=3)
    assert 0 <= random_pivot(7, seed=1) < 7


# ---------------------------------------------------------------- recipe 6: stage-1 invariants
@pytest.mark.parametrize("diversity", ["maxsum", "kcenter"])
def test_stage1_invariants(diversity):
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        n = 200
        f = torch.randn(n, 16, generator=gen, dtype=F64)
        pivot = cls_pivot(torch.rand(n, generator=gen, dtype=F64))
        greedy_full = diversity_select(f, 60, pivot, diversity, order="greedy").tolist()
        for k in (1, 5, 24, 60):
            sel = diversity_select(f, k, pivot, diversity).tolist()
            assert len(sel) == k
            assert all(a < b for a, b in zip(sel, sel[1:]))
            assert pivot in sel
            assert diversity_select(f, k, pivot, diversity).tolist() == sel
            greedy = diversity_select(f, k, pivot, diversity, order="greedy").tolist()
            assert greedy[0] == pivot and sorted(greedy) == sel
            assert greedy == greedy_full[:k]  # greedy prefix property
        assert diversity_select(f, n, pivot, diversity).tolist() == list(range(n))


def test_maxsum_python_oracle():
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        f = torch.randn(40, 8, generator=gen, dtype=F64)
        x = (f / f.norm(dim=1, keepdim=True)).tolist()

        def cos(i, j):
            return sum(a * b for a, b in zip(x[i], x[j]))

        chosen = [7]
        while len(chosen) < 15:
            rest = [i for i in range(40) if i not in chosen]
            chosen.append(min(rest, key=lambda i: (sum(cos(i, j) for j in chosen), i)))
        assert maxsum_select(f, 15, 7, order="greedy").tolist() == chosen


def test_bad_arguments():
    with pytest.raises(ValueError):
        maxsum_select(X, 9, 1)
    with pytest.raises(ValueError):
        kcenter_select(X, 3, 8)
    assert maxsum_select(X, 0, 1).numel() == 0
