"""SparseVLM policy (stage D, 3 stages, token recycling) on tiny models of every family (4-layer LLMs:
ranking layers 0, 1, 2, pruning at the inputs of layers 1, 2, 3).

Oracles, one per position convention:

* Renumbered positions (v1.5 on LLaVA/LLaVA-NeXT, the reference; recycled tokens right after the
  image's visual tokens): the explicit layer-by-layer run of the eager model's own modules
  (``_staged_oracle.explicit_run``) with the selection recomputed from the eager attention weights
  (raters from the layer-0 input, rater rows of layer l's attention, DPC-kNN recycling of the layer's
  output); cached ``generate`` == the no-cache re-run replaying the prefill's decisions.
* Original positions (Qwen; LLaVA option): the *unpatched* model where, at each pruning layer's input,
  the hidden state of a recycled token's slot is replaced by the recycled token and every other dropped
  key is masked from that layer on (``masked_run``), the decisions computed stage by stage on the eager
  model run with the earlier stages' replacements and masks (``output_attentions`` and the inputs the
  layers really receive, ``helpers.layer_inputs``: on Qwen3-VL with DeepStack, whose later levels the
  model adds at a recycled token's slot as the patch does). Attention-only LLMs.
* Hybrid Qwen3.5: the physically shortened run with the recycled states put in their slots, on an
  8-layer tiny model (see the section below), decisions from the eager attention of that run.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch

import vtprune
from vtprune.methods import sparsevlm as SV
from vtprune.policy import Context
from vtprune.methods._common import ONE_D_POSITION_FAMILIES
from vtprune.testing import BUILDERS, FAMILIES, HYBRID_FAMILIES, make_inputs, tiny_images

from helpers import (GEN, QUESTIONS, SIZES, assert_batch_equals_alone, assert_inputs_batch_equals_alone, batch,
                     layer_inputs, recorded_views, tiny)
from _staged_oracle import (Decision, attention_weights, causal_mask, explicit_run, last_full_attention_layer,
                            no_cache_generate, replaced_rows, shortened_layer_inputs)
from oracles import last_logits, masked_run, physically_shortened_run

TINY = dict(layers=(0, 1, 2))
PRUNE = (1, 2, 3)
LLAVA = ONE_D_POSITION_FAMILIES  # renumbered by default (LLaVA-style 1-D positions)
NOT_HYBRID = [f for f in FAMILIES if f not in HYBRID_FAMILIES]


def raters_of(visual: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """(L,) bool text raters of one unpadded sample from its LLM input embeddings (L, D)."""
    L = visual.numel()
    vis = torch.nonzero(visual).flatten()
    text = torch.nonzero(~visual & (torch.arange(L) > int(vis.max()))).flatten()
    out = torch.zeros(L, dtype=torch.bool)
    out[text] = SV.select_raters(emb[vis], emb[text])
    return out


def recycle(family, p, relation, dropped, states, version="1.5"):
    """(merged (k, D), slots (k,)) as the policy recycles at pruning layer ``p``: ``relation`` and ``states``
    over the current visual tokens, ``dropped`` indices into them; the slots index them too."""
    pool = SV.recycle_pool(relation[dropped])
    k = SV.n_clusters(pool.numel())
    noise = torch.rand(pool.numel(), generator=Context(family=family, seed=0).rng(1000 * p + 0)) * 1e-6
    merged, centres, _ = SV.dpc_knn_merge(states[dropped[pool]], k, noise)
    return merged, dropped[pool[centres]]


def svlm_decide(model, family, inp, schedule):
    """``decide`` for the explicit (renumbered) run: the reference's v1.5 stage on the current rows."""
    visual_in = inp["input_ids"][0] == model.config.image_token_id
    n0 = int(visual_in.sum())
    state = {}

    def decide(p, h, index, tables, inputs):
        s = PRUNE.index(p)
        if "raters" not in state:
            state["raters"] = raters_of(visual_in, inputs[0][0][0])
        h_prev, idx_prev = inputs[p - 1]
        _, rope, mask = tables(h_prev, idx_prev)
        w = attention_weights(model.model.language_model.layers[p - 1], h_prev, rope, mask).float()
        raters = state["raters"][idx_prev]
        relation = SV.relation_scores(w[:, raters])  # (L',) over the rows of layer p - 1 (= rows of h)
        visual = visual_in[index]
        vis = torch.nonzero(visual).flatten()
        count = SV.schedule_counts(n0, schedule=schedule)[s] if schedule else SV.schedule_counts(n0)[s]
        local = SV.stage_keep(relation[vis], count)
        dropped = torch.ones(vis.numel(), dtype=torch.bool)
        dropped[local] = False
        dropped = torch.nonzero(dropped).flatten()
        merged, slot_local = recycle(family, p, relation[vis], dropped, h[0, vis])
        keep = ~visual
        keep[vis[local]] = True
        rows = torch.nonzero(keep).flatten().tolist()
        last_vis = int(vis.max())
        at = sum(1 for r in rows if r <= last_vis)  # recycled rows go right after the image's last visual row
        slots = vis[slot_local].tolist()
        new_rows = rows[:at] + slots + rows[at:]
        vectors = {at + j: merged[j] for j in range(len(slots))}
        return Decision(new_rows, index[torch.tensor(new_rows)].tolist(), vectors)

    return decide


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", LLAVA)
def test_renumbered_with_recycling_equals_explicit_layer_run(family, attn):
    model, inp = batch(family, n=1, attn=attn, first=1)
    eager, _ = tiny(family, "eager")
    pol = SV.SparseVLM(**TINY)
    assert pol.resolved_positions(family) == "renumber" and pol.resolved_placement(family) == "after_visual"
    with vtprune.patch(model, pol) as h, torch.no_grad():
        out = model(**inp).logits
        gen = model.generate(**inp, **GEN, output_logits=True, return_dict_in_generate=True)
        kept = h.stats.llm_kept_index[0]
        sched = h.stats.schedules[0]
    ref, decisions = explicit_run(eager, inp, svlm_decide(eager, family, inp, None), PRUNE)
    assert kept.tolist() == decisions[-1].index  # recycled tokens carry their cluster centre's index
    assert any(d.vectors for d in decisions)
    assert sched.visual_tokens_per_layer[1:] == [sum(1 for i in d.index if inp["input_ids"][0, i] ==
                                                     model.config.image_token_id) for d in decisions]
    torch.testing.assert_close(last_logits(out), ref, rtol=1e-4, atol=1e-5)
    tokens, step_logits = no_cache_generate(eager, inp, decisions, PRUNE, n_new=GEN["max_new_tokens"])
    assert gen.sequences[0, inp["input_ids"].shape[1]:].tolist() == tokens
    for got, want in zip(gen.logits, step_logits):
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)
    # without recycling the run differs: the recycled tokens matter
    with vtprune.patch(model, "sparsevlm", **TINY, recycle=False), torch.no_grad():
        plain = model(**inp).logits
    assert not torch.allclose(last_logits(plain), ref, rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def applied(model, stages):
    with contextlib.ExitStack() as stack:
        for p, keep, slots, vectors in stages:
            stack.enter_context(replaced_rows(model, p, lambda h, s=slots, v=vectors: [(0, r, x) for r, x in zip(s, v)]))
            stack.enter_context(masked_run(model, p, keep[None]))
        yield


def masked_oracle_stages(family, inp, version="1.5", rank_scale=1.0, rank_bias=0.0):
    """Per stage ``(p, keep (L,) bool, slots, vectors)`` computed on the eager model, stage by stage
    (``version="1.0"``: the count from the rank of the rater x visual relation)."""
    model, _ = tiny(family, "eager")
    visual = inp["input_ids"][0] == model.config.image_token_id
    n0 = int(visual.sum())
    stages = []
    raters = None
    alive = torch.ones_like(visual)
    for s, p in enumerate(PRUNE):
        with applied(model, stages):
            states, out = layer_inputs(model, inp, [0, p], output_attentions=True)
        if raters is None:
            raters = raters_of(visual, states[0][0].float())
        w = out.attentions[p - 1][0].float()  # (H, L, L)
        relation = SV.relation_scores(w[:, raters])
        vis = torch.nonzero(visual & alive).flatten()
        if version == "1.0":
            _, count = SV.rank_budget(w.mean(0)[raters][:, vis], rank_scale, rank_bias)
            if count >= vis.numel():  # no pruning at this layer
                stages.append((p, alive.clone(), [], []))
                continue
        else:
            count = SV.schedule_counts(n0)[s]
        local = SV.stage_keep(relation[vis], count)
        dropped = torch.ones(vis.numel(), dtype=torch.bool)
        dropped[local] = False
        dropped = torch.nonzero(dropped).flatten()
        merged, slot_local = recycle(family, p, relation[vis], dropped, states[p][0][vis])
        new = alive & ~visual
        new[vis[local]] = True
        slots = vis[slot_local]
        new[slots] = True
        stages.append((p, new, slots.tolist(), list(merged)))
        alive = new
    return stages


def assert_equals_masked_stages(model, inp, pol, stages):
    """Patched logits, kept tokens and cached generate == the unpatched model with ``stages`` applied."""
    with vtprune.patch(model, pol) as h, torch.no_grad():
        out = model(**inp).logits
        gen = model.generate(**inp, **GEN)
        kept = h.stats.llm_kept_index[0]
    assert kept.tolist() == torch.nonzero(stages[-1][1]).flatten().tolist()
    with applied(model, stages), torch.no_grad():
        ref = model(**inp).logits
        gref = model.generate(**inp, **GEN)
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    return stages


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", NOT_HYBRID)  # a mask cannot hide a token from a Gated DeltaNet layer (below)
def test_original_positions_equal_masked_run_with_replaced_slots(family, attn):
    model, inp = batch(family, n=1, attn=attn, first=1)
    params = dict(TINY, positions="original") if family in LLAVA else TINY
    pol = SV.SparseVLM(**params)
    assert pol.resolved_placement(family) == "slot"
    stages = assert_equals_masked_stages(model, inp, pol, masked_oracle_stages(family, inp))
    assert any(st[2] for st in stages)  # something was recycled


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_version_1_rank_rule_equals_masked_run(family):
    """v1.0 (the paper's rank-based count) with recycling, original positions: the masked oracle."""
    model, inp = batch(family, n=1, first=1)
    pol = SV.SparseVLM(**TINY, version="1.0", rank_scale=1.0, positions="original")
    assert_equals_masked_stages(model, inp, pol, masked_oracle_stages(family, inp, version="1.0", rank_scale=1.0))


@pytest.mark.parametrize("family,version", [(f, "1.5") for f in NOT_HYBRID] + [("llava", "2.0"), ("qwen2_vl", "2.0"),
                                                                                ("llava", "1.0")])
def test_batch_equals_each_alone(family, version):
    assert_batch_equals_alone(family, "sparsevlm", attn="sdpa", first=1, **TINY, version=version)


# ---------------------------------------------------------------------------------- hybrid LLMs (Qwen3.5)
# The 4-layer tiny Qwen3.5 has full attention at 1 and 3 only: a ranking layer needs a full-attention layer
# at or before it, and with recycling one at or after the previous stage's pruning layer, so two
# recycling stages need more layers. The 8-layer tiny model (full attention at 1, 3, 5, 7) ranks at layers
# 1, 4 and 6 (rows of layers 1, 3 and 5; layer 5 after its own cut, with stage 2's recycled tokens) and
# prunes at the inputs of layers 2, 5 and 7.
HYBRID = dict(layers=(1, 4, 6))


@functools.lru_cache(maxsize=None)
def hybrid8(family: str, attn: str):
    return BUILDERS[family](attn_implementation=attn, num_layers=8)


def hybrid_batch(family: str, n: int, attn: str = "sdpa", first: int = 0):
    model, proc = hybrid8(family, attn)
    imgs = tiny_images(first + n, sizes=SIZES[family][: first + n])[first:]
    return model, make_inputs(family, proc, QUESTIONS[first : first + n], imgs)


def physical_oracle_stages(family, inp, layers=HYBRID["layers"], scores: list | None = None):
    """``(stages {pruning layer: (1, L) keep}, replace {pruning layer: fn})`` of SparseVLM v1.5 on the
    8-layer hybrid model, computed stage by stage in the physically shortened run of the earlier stages:
    raters from the LLM input, the relation from the eager attention of the last full-attention layer
    at or before each ranking layer as it runs there, DPC-kNN on the pruning layer's input, recycled
    tokens at their centres' slots. ``scores`` collects (candidate columns, relation) per stage."""
    model, _ = hybrid8(family, "eager")
    visual = inp["input_ids"][0] == model.config.image_token_id
    n0 = int(visual.sum())
    stages, fills, raters = {}, {}, None
    alive = torch.ones_like(visual)
    for s, l in enumerate(layers):
        p, src = l + 1, last_full_attention_layer(model, l)
        got = shortened_layer_inputs(model, inp, stages, {0, src, p}, replace=fills)
        if raters is None:
            raters = raters_of(visual, got[0][0].float())
        h_src, cols_src, rope = got[src]
        w = attention_weights(model.model.language_model.layers[src], h_src[None], rope,
                              causal_mask(model, h_src.shape[0], h_src.dtype)).float()
        relation = SV.relation_scores(w[:, raters[cols_src]])  # over the columns of layer src
        h_p, cols_p, _ = got[p]
        vis = cols_p[visual[cols_p]]  # the visual tokens entering the pruning layer (recycled ones included)
        at = torch.searchsorted(cols_src, vis)
        assert torch.equal(cols_src[at], vis)  # each of them is present where its relation is read
        rel = relation[at]
        if scores is not None:
            scores.append((vis, rel))
        local = SV.stage_keep(rel, SV.schedule_counts(n0)[s])
        dropped = torch.ones(vis.numel(), dtype=torch.bool)
        dropped[local] = False
        merged, slot_local = recycle(family, p, rel, torch.nonzero(dropped).flatten(),
                                     h_p[torch.searchsorted(cols_p, vis)])
        new = alive & ~visual
        new[vis[local]] = True
        new[vis[slot_local]] = True
        stages[p] = new[None]
        fills[p] = lambda b, h, cols, slots=vis[slot_local].tolist(), m=merged: dict(zip(slots, m))
        alive = new
    return stages, fills


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_stages_with_recycling_equal_physically_shortened_run(family, attn):
    model, inp = hybrid_batch(family, 1, attn, first=1)
    pol = SV.SparseVLM(**HYBRID)
    seen = recorded_views(pol)
    with vtprune.patch(model, pol) as h, torch.no_grad():
        out = last_logits(model(**inp).logits)
        gen = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
        kept = h.stats.llm_kept_index[0]
    scores: list = []
    stages, fills = physical_oracle_stages(family, inp, scores=scores)
    assert [layer for layer, _ in seen[:3]] == [2, 5, 7]
    for (layer, view), (vis, rel) in zip(seen[:3], scores):  # the relation itself, recycled tokens included
        assert view.original_index[view.visual].tolist() == vis.tolist()
        torch.testing.assert_close(view.signals[f"policy_rows@{layer - 1}"][view.visual].float(), rel,
                                   rtol=1e-4, atol=1e-7)
    assert kept.tolist() == torch.nonzero(stages[7][0]).flatten().tolist()
    ref, gref = physically_shortened_run(model, inp, stages, None, GEN["max_new_tokens"], replace=fills)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    # without the recycled states the run differs: the replacement matters
    plain, _ = physically_shortened_run(model, inp, stages, None, 1)
    assert not torch.allclose(plain, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_batch_equals_each_alone(family):
    model, inp = hybrid_batch(family, 2, first=1)
    singles = [hybrid_batch(family, 1, first=1 + i)[1] for i in range(2)]
    assert_inputs_batch_equals_alone(model, inp, singles, "sparsevlm", **HYBRID)


@pytest.mark.parametrize(
    "params,match",
    [
        (TINY, "ranking layer 0 has no attention rows.*full-attention layers \\[1\\]"),
        (dict(layers=(1, 2), schedule=(3, 2)), "read at full-attention layer 1, before the previous stage prunes at "
                                               "layer 2, where its recycled tokens join.*or recycle=False"),
        (dict(layers=(1, 2), version="1.0"), "before the previous stage prunes at layer 2, where its recycled"),
    ],
)
def test_hybrid_ranking_layers_without_their_attention_raise(params, match):
    model, _ = batch("qwen3_5", n=1)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "sparsevlm", **params)
    assert not hasattr(model, "_vtprune_patch")
    if "schedule" in params:  # without recycling the later relation exists (read at layer 1) and it runs
        with vtprune.patch(model, "sparsevlm", **params, recycle=False):
            pass


def test_version_2_masked_run_without_recycling():
    """SparseVLM+ keeps original positions and recycles nothing: the unpatched model with the dropped keys
    masked stage by stage (the selection read back from the patch) reproduces it."""
    model, inp = batch("llava", n=1, first=1)
    pol = SV.SparseVLM(**TINY, version="2.0")
    assert pol.resolved_positions("llava") == "original" and not pol.recycles()
    seen = []
    select = pol.select
    pol.select = lambda layer, view, ctx: seen.append((layer, view, s := select(layer, view, ctx))) or s
    with vtprune.patch(model, pol), torch.no_grad():
        out = model(**inp).logits
    keep = torch.ones(inp["input_ids"].shape[1], dtype=torch.bool)
    stages = []
    for layer, view, sel in seen:
        chosen = torch.zeros(view.visual.numel(), dtype=torch.bool)
        chosen[sel] = True
        keep = keep.clone()
        keep[view.original_index[view.visual & ~chosen]] = False
        stages.append((layer, keep, [], []))
    assert [l for l, _, _, _ in stages] == list(PRUNE)
    with applied(model, stages), torch.no_grad():
        ref = model(**inp).logits
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)


def test_recycling_keeps_the_visual_count_of_the_reference():
    model, inp = batch("llava", n=2)
    with vtprune.patch(model, "sparsevlm", **TINY) as h, torch.no_grad():
        model(**inp)
    # 16 tokens: keep 8 (+ 1 cluster of int(8 * 0.3) + 1 = 3), keep 5 of 9 (+ 1), keep 3 of 6 (+ 1)
    assert [s.visual_tokens_per_layer for s in h.stats.schedules] == [[16, 9, 6, 4]] * 2
    with vtprune.patch(model, "sparsevlm", **TINY, recycle=False) as h, torch.no_grad():
        model(**inp)
    assert [s.visual_tokens_per_layer for s in h.stats.schedules] == [[16, 8, 5, 3]] * 2


@pytest.mark.parametrize(
    "params,match",
    [
        ({}, r"layers=\(2, 6, 15\) must be strictly increasing 0-based layers in 0..2"),
        ({"layers": (0, 1, 2), "version": "3.0"}, "version='3.0'"),
        ({"layers": (0, 1, 2), "version": "1.0", "schedule": (3, 2, 1)}, "rank"),
        ({"version": "1.0"}, r"default \(2, 6, 15, 19\) needs >= 21 layers"),
        ({"layers": (0, 1, 2), "retain": 100}, "retain=100 has no schedule"),
        ({"layers": (0, 1), "retain": 192}, "3 stages"),
        ({"layers": (0, 1), "schedule": (5,)}, "one count"),
        ({"layers": (1, 0, 2)}, "strictly increasing"),
        ({"layers": (0, 1, 2), "recycle_ratio": 1.5}, "recycle_ratio=1.5"),
        ({"layers": (0, 1, 2), "positions": "renumbered"}, "positions='renumbered'"),
        ({"layers": (0, 1, 2), "recycle_placement": "end"}, "recycle_placement='end'"),
        ({"layers": (0, 1, 2), "keep": 0.5}, "use layers"),
        ({"layers": "0/x/2"}, "numbers separated by '/'"),
    ],
)
def test_bad_settings_raise(params, match):
    model, _ = batch("llava", n=1)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "sparsevlm", **params)
    assert not hasattr(model, "_vtprune_patch")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_refuses_renumbering(family):
    model, _ = batch(family, n=1)
    with pytest.raises(ValueError, match="positions='renumber' is defined for LLaVA"):
        vtprune.patch(model, "sparsevlm", **TINY, positions="renumber")
    assert not hasattr(model, "_vtprune_patch")
