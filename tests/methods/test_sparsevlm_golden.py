"""SparseVLM golden fixtures made with the authors' code (Gumpest/SparseVLMs, tests/fixtures/sparsevlm/README.md):
the pure functions on seeded inputs, and the whole in-LLM method end to end (v1.5 with recycling and
renumbered positions; v2.0 "SparseVLM+")."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.methods import sparsevlm as SV

from _golden_models import golden_inputs, mha_llava

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sparsevlm"


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
