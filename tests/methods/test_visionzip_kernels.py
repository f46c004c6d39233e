"""Pure-kernel tests of VisionZip (docs/methods/visionzip.md section 7).

Encoded: recipes 1 (dominant hand example), 2 (contextual hand example), 3 (edges) and the kernel-level
part of recipe 5 (invariants). Model-level recipes (4 recompute oracle on a tiny CLIP, 5 batch / NeXT
block layout, 6 reference-equivalence fixtures) belong to the policy and wiring tests.
"""
from __future__ import annotations

import pytest
import torch

from vtprune.methods.visionzip import (
    contextual_assign,
    contextual_merge,
    dominant_select,
    qwen_split,
    visionzip_qwen,
    visionzip_tokens,
)

F64 = torch.float64



# ---------------------------------------------------------------- recipe 1: dominant
HEADS = torch.tensor(
    [[0.05, 0.30, 0.10, 0.05, 0.20, 0.10],
     [0.20, 0.05, 0.10, 0.05, 0.25, 0.15]],
    dtype=F64,
)  # CLS-row probabilities over the 6 patch columns; patch column j is token j + 1


def test_recipe1_dominant():
    torch.testing.assert_close(
        HEADS.sum(0), torch.tensor([0.25, 0.35, 0.20, 0.10, 0.45, 0.25], dtype=F64))
    assert dominant_select(HEADS, 3).tolist() == [0, 2, 5]
    assert dominant_select(HEADS.sum(0), 3).tolist() == [0, 2, 5]
    with_cls = torch.cat([torch.full((2, 1), 0.5, dtype=F64), HEADS], dim=1)
    assert dominant_select(with_cls, 3, includes_cls=True).tolist() == [0, 2, 5]


def test_dominant_ties_and_edges():
    # patch sums .25 at columns 0 and 5 (tokens 1 and 6): the lower index wins
    assert dominant_select(HEADS, 4).tolist() == [0, 1, 2, 5]
    assert dominant_select(HEADS, 1).tolist() == [0]
    assert dominant_select(HEADS, 7).tolist() == list(range(7))
    for bad in (0, 8):
        with pytest.raises(ValueError):
            dominant_select(HEADS, bad)


# ---------------------------------------------------------------- recipe 2: contextual
# 10 tokens, dominant {0, 3, 7} -> remaining list [1, 2, 4, 5, 6, 8, 9] (N_rem = 7); c = 2 -> step 3,
# targets at list positions [0, 3] = tokens 1 (A) and 5 (B).
REM = [1, 2, 4, 5, 6, 8, 9]
POS_KEYS = [(1, 0), (1, 0.1), (0.2, 1), (0, 1), (1, 1), (-1, 0.5), (0.9, -0.2)]
DOM = torch.tensor([0, 3, 7])


def _keys():
    k = torch.tensor([[0.3, -0.7]] * 10, dtype=F64)  # dominant rows: irrelevant
    for pos, tok in enumerate(REM):
        k[tok] = torch.tensor(POS_KEYS[pos], dtype=F64)
    return k


def _hidden():
    return torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=F64)


def test_recipe2_assignment():
    asg = contextual_assign(_keys(), DOM, 2)
    assert asg.target_idx.tolist() == [1, 5]  # positions 0 and 3
    assert asg.source_idx.tolist() == [2, 4, 6, 8, 9]  # positions 1, 2, 4, 5, 6
    # pos 1 -> A, pos 2 -> B, pos 4 -> tie -> A, pos 5 -> B (-.894 vs .447), pos 6 -> A
    assert asg.assignment.tolist() == [0, 1, 0, 1, 0]


def test_recipe2_contextual_tokens():
    h = _hidden()
    ctx, tgt = contextual_merge(h, _keys(), DOM, 2)
    assert tgt.tolist() == [1, 5]
    # ctx_A = h0 + mean(h1, h4, h6), ctx_B = h3 + mean(h2, h5), in list positions
    exp_a = h[REM[0]] + (h[REM[1]] + h[REM[4]] + h[REM[6]]) / 3
    exp_b = h[REM[3]] + (h[REM[2]] + h[REM[5]]) / 2
    torch.testing.assert_close(ctx, torch.stack([exp_a, exp_b]))


def test_recipe2_mean_mode():
    h = _hidden()
    ctx, _ = contextual_merge(h, _keys(), DOM, 2, mode="mean")
    exp_a = (h[REM[0]] + h[REM[1]] + h[REM[4]] + h[REM[6]]) / 4
    exp_b = (h[REM[3]] + h[REM[2]] + h[REM[5]]) / 3
    torch.testing.assert_close(ctx, torch.stack([exp_a, exp_b]))


def test_recipe2_through_visionzip_tokens():
    h = _hidden()
    cls_attn = torch.full((9,), 0.05, dtype=F64)
    cls_attn[2] = 0.4  # token 3
    cls_attn[6] = 0.3  # token 7
    heads = torch.stack([cls_attn / 2, cls_attn / 2])
    keys_heads = torch.stack([_keys() + 1.0, _keys() - 1.0])  # head mean = _keys()
    tokens, dom = visionzip_tokens(h, heads, keys_heads, 3, 2)
    assert dom.tolist() == [0, 3, 7]
    assert tokens.shape == (5, 4)
    exp_a = h[1] + (h[2] + h[6] + h[9]) / 3
    exp_b = h[5] + (h[4] + h[8]) / 2
    torch.testing.assert_close(tokens, torch.stack([h[0], h[3], h[7], exp_a, exp_b]))
    # the full CLS row (with the CLS column) gives the same result
    tokens2, dom2 = visionzip_tokens(h, torch.cat([torch.ones(1, dtype=F64), cls_attn]), _keys(), 3, 2)
    assert dom2.tolist() == [0, 3, 7]
    torch.testing.assert_close(tokens2, tokens)


# ---------------------------------------------------------------- recipe 3: edges
def test_recipe3_single_target():
    h = _hidden()
    asg = contextual_assign(_keys(), DOM, 1)
    assert asg.target_idx.tolist() == [1]  # step = N_rem = 7, list position 0
    assert asg.assignment.tolist() == [0] * 6
    ctx, _ = contextual_merge(h, _keys(), DOM, 1)
    torch.testing.assert_close(ctx[0], h[1] + h[[2, 4, 5, 6, 8, 9]].mean(0))


def test_recipe3_target_without_sources():
    h = _hidden()
    k = torch.tensor([[1.0, 0.0]] * 10, dtype=F64)
    k[5] = torch.tensor([0.0, 1.0], dtype=F64)  # target B (token 5) is orthogonal to every source
    asg = contextual_assign(k, DOM, 2)
    assert asg.target_idx.tolist() == [1, 5]
    assert asg.assignment.tolist() == [0] * 5
    ctx, _ = contextual_merge(h, k, DOM, 2)
    torch.testing.assert_close(ctx[1], h[5])  # counts clamped at 1: ctx = h_target


def test_budget_errors():
    h = _hidden()
    with pytest.raises(ValueError):
        visionzip_tokens(h, HEADS[:, :1].expand(2, 9).contiguous(), _keys(), 6, 5)  # d + c = 11 > 10
    with pytest.raises(ValueError):
        visionzip_tokens(h, torch.rand(9, dtype=F64), _keys(), 0, 2)


# ---------------------------------------------------------------- recipe 5: invariants
@pytest.mark.parametrize("d, c", [(54, 10), (108, 20), (162, 30), (6, 3), (1, 5), (577, 0)])
def test_invariants(d, c):
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        h = torch.randn(577, 32, generator=gen, dtype=F64)
        attn = torch.softmax(torch.randn(4, 577, generator=gen, dtype=F64), dim=-1)
        keys = torch.randn(4, 577, 8, generator=gen, dtype=F64)
        tokens, dom = visionzip_tokens(h, attn, keys, d, c)
        assert tokens.shape == (d + c, 32)
        assert dom.numel() == d and dom[0].item() == 0
        assert torch.all(dom[1:] > dom[:-1])
        torch.testing.assert_close(tokens[:d], h[dom])
        # dominant = CLS + top d-1 patches by the head-summed CLS row (python oracle)
        s = attn[:, 1:].sum(0).tolist()
        top = sorted(range(576), key=lambda j: (-s[j], j))[: d - 1]
        assert dom.tolist() == [0] + sorted(j + 1 for j in top)
        # targets are strided in the remaining list, disjoint from the dominant tokens
        asg = contextual_assign(keys, dom, c)
        dom_set = set(dom.tolist())
        rem = [i for i in range(577) if i not in dom_set]
        if c:
            step = max(1, len(rem) // c)
            assert asg.target_idx.tolist() == rem[::step][:c]
        assert sorted(asg.target_idx.tolist() + asg.source_idx.tolist()) == rem
        t2, d2 = visionzip_tokens(h, attn, keys, d, c)
        assert torch.equal(t2, tokens) and torch.equal(d2, dom)


def test_keep_all_is_all_tokens_in_order():
    h = torch.randn(577, 8, dtype=F64)
    tokens, dom = visionzip_tokens(h, torch.rand(576, dtype=F64), torch.randn(577, 4, dtype=F64), 577, 0)
    assert dom.tolist() == list(range(577))
    assert torch.equal(tokens, h)  # includes the CLS token: NOT the unpatched model (spec recipe 5)


def test_patch_valid_excludes_margin():
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(577, 8, generator=gen, dtype=F64)
    attn = torch.rand(576, generator=gen, dtype=F64)
    keys = torch.randn(577, 4, generator=gen, dtype=F64)
    pv = torch.zeros(24, 24, dtype=torch.bool)
    pv[4:20] = True
    pv = pv.reshape(-1)
    attn[0] = 10.0  # best patch, but invalid
    tokens, dom = visionzip_tokens(h, attn, keys, 54, 10, patch_valid=pv)
    assert tokens.shape == (64, 8)
    valid_tok = set((pv.nonzero().reshape(-1) + 1).tolist()) | {0}
    assert set(dom.tolist()) <= valid_tok and 1 not in dom.tolist()
    asg = contextual_assign(keys, dom, 10, patch_valid=pv)
    assert set(asg.target_idx.tolist()) | set(asg.source_idx.tolist()) == valid_tok - set(dom.tolist())


def test_fp16_hidden_returns_fp16():
    h = torch.randn(17, 8).half()
    tokens, _ = visionzip_tokens(h, torch.rand(16), torch.randn(17, 4).half(), 6, 3)
    assert tokens.dtype == torch.float16 and tokens.shape == (9, 8)


# ---------------------------------------------------------------- Qwen extension
def test_qwen_split():
    assert qwen_split(64) == (54, 10)
    assert qwen_split(128) == (108, 20)  # round(107.52)
    assert qwen_split(192) == (161, 31)  # round(161.28)
    assert qwen_split(4) == (3, 1)  # round(3.36)
    assert qwen_split(1) == (1, 0)
    assert qwen_split(0) == (0, 0)


def test_qwen_hand_example():
    f = torch.tensor([[1, 0], [1, 1], [0.9, 0.1], [2, -1], [0, 1], [0.1, 0.9]], dtype=F64)
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.05], dtype=F64)
    # dominant {1, 3}; remaining [0, 2, 4, 5], c = 2 -> step 2 -> targets tokens 0 and 4;
    # 2 -> target 0, 5 -> target 4; output ordered by representative
    tokens, reps = visionzip_qwen(f, scores, 2, 2)
    assert reps.tolist() == [0, 1, 3, 4]
    torch.testing.assert_close(tokens, torch.stack([f[0] + f[2], f[1], f[3], f[4] + f[5]]))


def test_qwen_invariants():
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        n = 256
        f = torch.randn(n, 16, generator=gen, dtype=F64)
        s = torch.rand(n, generator=gen, dtype=F64)
        for keep in (0.334, 0.223, 0.112):
            d, c = qwen_split(int(round(n * keep)))
            tokens, reps = visionzip_qwen(f, s, d, c)
            assert tokens.shape == (d + c, 16) and reps.numel() == d + c
            assert torch.all(reps[1:] > reps[:-1])
            sl = s.tolist()
            top = sorted(range(n), key=lambda j: (-sl[j], j))[:d]
            assert set(top) <= set(reps.tolist())
            pos = {r: i for i, r in enumerate(reps.tolist())}
            for j in top:  # dominant tokens pass through unchanged
                assert torch.equal(tokens[pos[j]], f[j])
            t2, r2 = visionzip_qwen(f, s, d, c)
            assert torch.equal(t2, tokens) and torch.equal(r2, reps)
