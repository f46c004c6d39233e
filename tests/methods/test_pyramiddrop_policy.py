"""PyramidDrop policy (stage D, 3 stages) on tiny models of every family (4-layer LLMs, so the tests
pass explicit stages: after 1-based layers 1, 2, 3).

Oracles, one per position convention:

* ``positions="renumber"`` (LLaVA/LLaVA-NeXT default, the reference): the explicit layer-by-layer run
  of the eager model's own modules (``_staged_oracle.explicit_run``), ranking each stage with the eager
  attention weights of the pruning layer (last prompt row, head mean, image columns) and renumbering
  the survivors; cached ``generate`` == the no-cache re-run replaying the prefill's selection.
* ``positions="original"`` (Qwen default; LLaVA option): the *unpatched* model with the dropped keys
  hidden from each pruning layer on (``oracles.masked_run``, one per stage); the dropped sets are
  computed stage by stage on the eager model run with the earlier stages' masks
  (``output_attentions`` of the pruning layer). Attention-only LLMs (Qwen3-VL included).
* Hybrid Qwen3.5 (a mask cannot hide a token from a Gated DeltaNet layer): the unpatched model's own
  layers with the sequence physically shortened at each stage (``oracles.physically_shortened_run``),
  each stage ranked with the eager attention of the last full-attention layer at or before its layer
  in the run of the earlier stages; the patch's scores are compared too.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import vtprune
from vtprune.methods import pyramiddrop as PD
from vtprune.methods._common import ONE_D_POSITION_FAMILIES
from vtprune.testing import FAMILIES, HYBRID_FAMILIES

from helpers import GEN, assert_batch_equals_alone, batch, recorded_views, tiny
from _staged_oracle import (Decision, attention_weights, explicit_run, last_full_attention_layer, no_cache_generate,
                            shortened_attention)
from oracles import last_logits, masked_run, physically_shortened_run

TINY = dict(layer_list=(1, 2, 3), ratios=(0.5, 0.25, 0.125))
LLAVA = ONE_D_POSITION_FAMILIES  # renumbered by default (LLaVA-style 1-D positions)


def pdrop_decide(model, ratios=TINY["ratios"], layers=TINY["layer_list"]):
    """``decide`` for the explicit run: rank the image rows by the last row of the layer's eager attention."""
    ids_visual = {}

    def decide(l, h, index, tables, inputs):
        visual = ids_visual["v"][index]
        pos, rope, mask = tables(h, index)
        w = attention_weights(model.model.language_model.layers[l], h, rope, mask).float().mean(0)  # (L', L')
        img = torch.nonzero(visual).flatten()
        n0 = int(ids_visual["v"].sum())
        quota = PD.stage_counts(n0, (ratios[list(layers).index(l)],))[1]
        kept = img[PD.rank_drop(w[-1, img], quota)]
        keep = ~visual
        keep[kept] = True
        rows = torch.nonzero(keep).flatten()
        return Decision(rows.tolist(), index[rows].tolist())

    return decide, ids_visual


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", LLAVA)
def test_renumbered_equals_explicit_layer_run(family, attn):
    model, inp = batch(family, n=1, attn=attn, first=1)
    eager, _ = tiny(family, "eager")
    pol = PD.PyramidDrop(**TINY)
    assert pol.resolved_positions(family) == "renumber"
    with vtprune.patch(model, pol) as h, torch.no_grad():
        out = model(**inp).logits
        gen = model.generate(**inp, **GEN, output_logits=True, return_dict_in_generate=True)
        sched = h.stats.schedules[0]
        kept = h.stats.llm_kept_index[0]
    decide, vis = pdrop_decide(eager)
    vis["v"] = inp["input_ids"][0] == model.config.image_token_id
    ref, decisions = explicit_run(eager, inp, decide, TINY["layer_list"])
    n0 = int(vis["v"].sum())
    assert sched.visual_tokens_per_layer == list(PD.stage_counts(n0, TINY["ratios"]))
    assert kept.tolist() == decisions[-1].index
    torch.testing.assert_close(last_logits(out), ref, rtol=1e-4, atol=1e-5)
    # original positions give a different run: the convention matters here
    with vtprune.patch(model, "pyramiddrop", **TINY, positions="original"), torch.no_grad():
        orig = model(**inp).logits
    assert not torch.allclose(last_logits(orig), ref, rtol=1e-5, atol=1e-5)
    tokens, step_logits = no_cache_generate(eager, inp, decisions, TINY["layer_list"], n_new=GEN["max_new_tokens"])
    assert gen.sequences[0, inp["input_ids"].shape[1]:].tolist() == tokens
    for got, want in zip(gen.logits, step_logits):
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)


def masked_oracle_keeps(family, inp, ratios=TINY["ratios"], layers=TINY["layer_list"]) -> list[torch.Tensor]:
    """Per stage, the (L,) bool mask of the LLM-input tokens alive after it (batch size 1), from the
    eager model's ``output_attentions`` under the earlier stages' masks."""
    model, _ = tiny(family, "eager")
    visual = inp["input_ids"][0] == model.config.image_token_id
    n0 = int(visual.sum())
    keeps: list[torch.Tensor] = []
    for s, l in enumerate(layers):
        with contextlib.ExitStack() as stack, torch.no_grad():
            for t in range(s):
                stack.enter_context(masked_run(model, layers[t], keeps[t][None]))
            att = model(**inp, output_attentions=True).attentions[l][0].float().mean(0)  # (L, L)
        alive = keeps[-1] if keeps else torch.ones_like(visual)
        img = torch.nonzero(visual & alive).flatten()
        quota = PD.stage_counts(n0, (ratios[s],))[1]
        new = alive.clone()
        new[img] = False
        new[img[PD.rank_drop(att[-1, img], quota)]] = True
        keeps.append(new)
    return keeps


def physical_oracle_keeps(family, inp, ratios=TINY["ratios"], layers=TINY["layer_list"],
                          scores: list | None = None) -> list[torch.Tensor]:
    """Hybrid LLMs: per stage, the (L,) bool mask of the LLM-input tokens alive after it (batch size 1).
    Stage ``s`` ranks with the eager attention of the last full-attention layer at or before its layer,
    read in the physically shortened run of the earlier stages (the attention that layer computes
    there: after its own cut when an earlier stage cut at it). ``scores`` collects each stage's
    (candidate LLM-input indices, their scores)."""
    model, _ = tiny(family, "eager")
    visual = inp["input_ids"][0] == model.config.image_token_id
    n0 = int(visual.sum())
    keeps: list[torch.Tensor] = []
    for s, l in enumerate(layers):
        stages = {layers[t]: keeps[t][None] for t in range(s)}
        probs, cols, _ = shortened_attention(model, inp, stages, last_full_attention_layer(model, l))
        alive = keeps[-1] if keeps else torch.ones_like(visual)
        img = torch.nonzero(visual & alive).flatten()
        at = torch.searchsorted(cols, img)
        assert torch.equal(cols[at], img)  # every candidate is present where its row is read
        quota = PD.stage_counts(n0, (ratios[s],))[1]
        row = probs.mean(0)[-1, at]
        if scores is not None:
            scores.append((img, row))
        new = alive.clone()
        new[img] = False
        new[img[PD.rank_drop(row, quota)]] = True
        keeps.append(new)
    return keeps


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_stages_equal_physically_shortened_run(family, attn):
    """Qwen3.5 (tiny: Gated DeltaNet layers 0, 2; full attention 1, 3): stages after layers 1, 2, 3 rank
    with the rows of layers 1, 1 (after stage 1's cut, as layer 1 runs) and 3; the patched model ==
    the unpatched model's own layers with the sequence physically shortened at each stage."""
    model, inp = batch(family, n=1, attn=attn, first=1)
    pol = PD.PyramidDrop(**TINY)
    seen = recorded_views(pol)
    with vtprune.patch(model, pol) as h, torch.no_grad():
        out = last_logits(model(**inp).logits)
        gen = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
        kept = h.stats.llm_kept_index[0]
        sched = h.stats.schedules[0]
    scores: list = []
    keeps = physical_oracle_keeps(family, inp, scores=scores)
    assert [layer for layer, _ in seen[:3]] == list(TINY["layer_list"])
    for (layer, view), (img, row) in zip(seen[:3], scores):  # the scores themselves, not only the ranking
        assert view.original_index[view.visual].tolist() == img.tolist()
        torch.testing.assert_close(view.signals[f"last_row@{layer}"][view.visual].float(), row, rtol=1e-4, atol=1e-7)
    n0 = int((inp["input_ids"] == model.config.image_token_id).sum())
    assert sched.visual_tokens_per_layer == list(PD.stage_counts(n0, TINY["ratios"]))
    assert kept.tolist() == torch.nonzero(keeps[-1]).flatten().tolist()
    stages = {l: k[None] for l, k in zip(TINY["layer_list"], keeps)}
    ref, gref = physically_shortened_run(model, inp, stages, None, GEN["max_new_tokens"])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in HYBRID_FAMILIES])  # a mask cannot hide a
def test_original_positions_equal_masked_stages(family, attn):  # token from a Gated DeltaNet layer (above)
    model, inp = batch(family, n=1, attn=attn, first=1)
    params = dict(TINY, positions="original") if family in LLAVA else TINY
    with vtprune.patch(model, "pyramiddrop", **params) as h, torch.no_grad():
        out = model(**inp).logits
        gen = model.generate(**inp, **GEN)
        kept = h.stats.llm_kept_index[0]
    keeps = masked_oracle_keeps(family, inp)
    assert kept.tolist() == torch.nonzero(keeps[-1]).flatten().tolist()
    with contextlib.ExitStack() as stack, torch.no_grad():
        for l, k in zip(TINY["layer_list"], keeps):
            stack.enter_context(masked_run(model, l, k[None]))
        ref = model(**inp).logits
        gref = model.generate(**inp, **GEN)
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


@pytest.mark.parametrize("family,attn", [(f, "sdpa") for f in FAMILIES] + [("llava", "eager")])
def test_batch_equals_each_alone(family, attn):
    assert_batch_equals_alone(family, "pyramiddrop", attn=attn, first=1, **TINY)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_ratios_one_equal_the_unpatched_model(family):
    model, inp = batch(family, n=2)
    with torch.no_grad():
        ref = model(**inp).logits
        gref = model.generate(**inp, **GEN)
        with vtprune.patch(model, "pyramiddrop", layer_list=(1, 2, 3), ratios=(1.0, 1.0, 1.0)):
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


def test_two_images_per_sample_get_per_image_quotas():
    from vtprune.testing import prompt_for, tiny_images

    model, proc = tiny("llava")
    inp = proc(text=[prompt_for("llava", "compare them", n_images=2)], images=tiny_images(2), return_tensors="pt")
    seen = []
    pol = PD.PyramidDrop(**TINY)
    select = pol.select
    pol.select = lambda layer, view, ctx: seen.append((view.image_id, s := select(layer, view, ctx))) or s
    with vtprune.patch(model, pol) as h, torch.no_grad():
        model(**inp)
    assert h.stats.schedules[0].visual_tokens_per_layer == [32, 16, 8, 4]
    for (image_id, sel), per_image in zip(seen, (8, 4, 2)):
        assert torch.bincount(image_id[sel], minlength=2).tolist() == [per_image, per_image]


@pytest.mark.parametrize(
    "params,match",
    [
        ({}, r"layer_list=\(8, 16, 24\) must lie in 1..3"),
        ({"layer_list": (2, 1), "ratios": (0.5, 0.25)}, "strictly increasing"),
        ({"layer_list": (1, 2), "ratios": (0.5,)}, "one ratio per layer"),
        ({"layer_list": (1, 2), "ratios": (0.25, 0.5)}, "not increase"),
        ({"layer_list": (1, 2), "ratios": (0.5, 0.0)}, r"must lie in \(0, 1\]"),
        ({"layer_list": (1, 2, 3), "positions": "contiguous"}, "positions='contiguous'"),
        ({"layer_list": (1, 2, 3), "keep": 0.5}, "use layer_list"),
        ({"layer_list": "1/x"}, "numbers separated by '/'"),
        ({"layer_list": (1, 2, 3), "lam": 1.5}, r"lam=1.5 must lie in \(0, 1\]"),
    ],
)
def test_bad_settings_raise(params, match):
    model, _ = batch("llava", n=1)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "pyramiddrop", **params)
    assert not hasattr(model, "_vtprune_patch")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_refuses_renumbering(family):
    model, _ = batch(family, n=1)
    assert PD.PyramidDrop(**TINY).position_handling(4, family) == {1: "original", 2: "original", 3: "original"}
    with pytest.raises(ValueError, match="positions='renumber' is defined for LLaVA"):
        vtprune.patch(model, "pyramiddrop", **TINY, positions="renumber")
    assert not hasattr(model, "_vtprune_patch")
