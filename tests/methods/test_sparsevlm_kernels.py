"""SparseVLM kernels (hand-worked) and the golden fixtures made with the authors' code (Gumpest/SparseVLMs,
tests/fixtures/sparsevlm/README.md): the pure functions on seeded inputs, and the whole in-LLM method
end to end (v1.5 with recycling and renumbered positions; v2.0 "SparseVLM+")."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.methods import sparsevlm as SV

from _golden_models import golden_inputs, mha_llava

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
@pytest.mark.parametrize("path", sorted(FIXTURES.glob("cluster_*.pt")), ids=lambda p: p.stem)
def test_golden_cluster_and_merge(path):
    f = torch.load(path, weights_only=True)
    merged, centres, assign = SV.dpc_knn_merge(f["x"], int(f["k"]), f["noise"] * 1e-6)  # the reference: U(0, 1) * 1e-6
    torch.testing.assert_close(merged, f["merged"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("relation_*.pt")), ids=lambda p: p.stem)
def test_golden_relation_and_selection(path):
    f = torch.load(path, weights_only=True)
    probs = f["probs_rows_visual"]  # (H, R, v) rater rows x visual columns of the reference's attention
    if path.stem.endswith("v20"):  # text-visual priority heads: 14 of the heads by their row x visual sum
        rows_ok = torch.ones(probs.shape[1], dtype=torch.bool)
        probs = probs[SV.priority_heads(probs, rows_ok, torch.ones(probs.shape[2], dtype=torch.bool), 14)]
    relation = SV.relation_scores(probs)
    torch.testing.assert_close(relation, f["relation"], rtol=0, atol=1e-12)
    assert SV.stage_keep(relation, int(f["count"])).tolist() == f["mask"].tolist()


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("rank_*_v10.pt")), ids=lambda p: p.stem)
def test_golden_v10_rank_budget(path):
    """v1.0 (the paper's rank-based ratio): the count from the rank of the rater x visual relation."""
    f = torch.load(path, weights_only=True)
    probs = f["probs_rows_visual"]  # (H, R, v)
    rank, k = SV.rank_budget(probs.mean(0), float(f["scale"]), float(f["bias"]))
    relation = SV.relation_scores(probs)
    torch.testing.assert_close(relation, f["relation"], rtol=0, atol=1e-12)
    kept = torch.arange(probs.shape[2]) if k >= probs.shape[2] else SV.stage_keep(relation, k)
    assert kept.tolist() == f["mask"].tolist()
    assert (k < probs.shape[2]) == bool(f["s_flag"])  # the reference skips recycling when nothing is pruned


def test_rank_budget_hand_worked():
    rows = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # rank 2, v = 4
    assert SV.rank_budget(rows, 1.0, 0.5) == (2, 2)  # int(2 * 1 + 0.5)
    assert SV.rank_budget(rows, 13.5, 0.0) == (2, 3)  # capped at v - 1
    assert SV.rank_budget(torch.eye(3), 13.5, 0.0) == (3, 3)  # rank == v: no pruning


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("e2e_*.pt")), ids=lambda p: p.stem)
def test_golden_end_to_end(path):
    """The patched tiny LLaVA (float64, 18 layers, 64 visual tokens) == the authors' LlamaDynamicvitModel on
    the same LLM input: relation and kept tokens at each stage, recycled tokens, prefill logits and 3
    cached greedy decode steps."""
    f = torch.load(path, weights_only=True)
    v20 = f["version"] == "2.0"
    model, proc = mha_llava(num_layers=18, image_size=112, num_heads=32 if v20 else 4)
    inp = golden_inputs(proc, f["case"])
    assert torch.equal(inp["input_ids"][0], f["input_ids"])
    pol = SV.SparseVLM(version=f["version"], schedule=tuple(f["schedule"].tolist()))
    seen = []
    select = pol.select
    pol.select = lambda layer, view, ctx: seen.append((layer, view, s := select(layer, view, ctx))) or s
    got = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: got.setdefault("k", k) and None,
                                                                with_kwargs=True)
    try:
        with vtprune.patch(model, pol), torch.no_grad():
            prefill = model(**inp).logits[0, -1]
            n = f["logits"].shape[0]
            out = model.generate(**inp, max_new_tokens=n, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        hook.remove()
    torch.testing.assert_close(got["k"]["inputs_embeds"][0].norm(dim=-1), f["inputs_embeds_norms"], rtol=0, atol=1e-12)
    stages = seen[:3]
    assert [l for l, _, _ in stages] == [3, 7, 16]
    merged = []
    for (layer, view, sel), mask, rel in zip(stages, f["stage_masks"], f["stage_relations"]):
        vis = torch.nonzero(view.visual).flatten()
        torch.testing.assert_close(view.signals[f"policy_rows@{layer - 1}"][vis].double(), rel, rtol=0, atol=1e-6)
        keep = sel.keep if isinstance(sel, vtprune.policy.DecoderSelection) else sel
        assert torch.searchsorted(vis, keep).tolist() == mask.tolist()
        if isinstance(sel, vtprune.policy.DecoderSelection):
            merged.append(sel.recycled)
    assert len(merged) == len(f["merged"])
    for mine, ref in zip(merged, f["merged"]):
        torch.testing.assert_close(mine.double(), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(prefill, f["logits"][0], rtol=0, atol=1e-6)
    logits = torch.stack([lg[0] for lg in out.logits]).double()  # generate returns fp32 logits
    torch.testing.assert_close(logits, f["logits"], rtol=0, atol=1e-6)
    L = inp["input_ids"].shape[1]
    assert out.sequences[0, L:L + n - 1].tolist() == f["tokens"].tolist()
