"""Model-level tests of ``todre`` (stage 1, P) and ``todre-relevance`` (stage 2, D) on tiny models.

Stage 1: exact kept counts (``round(keep * n)`` of the candidates, NeXT newlines kept outside the
budget); the stage-P oracle (logits and 10 generated tokens == the unpatched model on the explicitly
shortened input), SDPA and eager; the selection == the pure kernels on features of the unpatched model
and the pivot from eager CLIP ``output_attentions`` (LLaVA; NeXT: the base view's argmax only, spec
recipe 3) or the farthest token (Qwen); batch of 2 == each alone; SDPA == eager; clear ValueErrors.

Stage 2: the hand example of spec recipe 4 on a hand-built view; composed ``todre + todre-relevance``
== the stage-D oracle (the shortened input with the visual keys hidden from layer ``ℓ + 1`` on, same
positions); the decision's ``α_t→v`` == eager ``output_attentions`` of layer ``ℓ`` (recompute
oracle); a batch where one sample drops and the other keeps == each alone.
"""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.methods.todre import ToDRE, ToDRERelevance, farthest_pivot, maxsum_select, kcenter_select
from vtprune.policy import Context, DecoderView

from oracles import last_logits, masked_run, shortened_inputs
from helpers import (
    SCORE_SIZES,
    GEN,
    assert_batch_equals_alone,
    assert_matches_shortened,
    assert_sdpa_equals_eager,
    score_batch as batch,
    eager_clip,
    image_features,
    image_tokens,
    patched_run,
    tiny,
)

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_count_and_stage_p_oracle(family, attn):
    model, inp = batch(family, attn=attn)
    logits, gen, stats, _ = patched_run(model, inp, "todre:relevance=off,keep=0.4")
    expected = [max(1, round(0.4 * img.num_candidates)) + int((~img.candidate).sum())
                for img in image_tokens(model, inp)]
    assert stats.visual_tokens_per_image == expected
    assert_matches_shortened(model, family, inp, logits, gen, stats.kept_index_per_image)


@pytest.mark.parametrize("diversity", ["maxsum", "kcenter", None])
def test_llava_selection_equals_kernel_with_eager_cls_pivot(diversity):
    model, inp = batch("llava")
    spec = "todre:relevance=off,keep=6" + (f",diversity={diversity}" if diversity else "")
    _, _, stats, _ = patched_run(model, inp, spec, generate=False)
    _, attn, _ = eager_clip("llava", inp)
    cls = attn[1][:, :, 0, 1:].float().mean(1)  # feature layer 1 of the 3-layer tiny CLIP
    fn = maxsum_select if diversity == "maxsum" else kcenter_select  # default: k-center (the design card's v1)
    for i, f in enumerate(image_features("llava", inp)):
        pivot = int(torch.argmax(cls[i]))
        ref = fn(f, 6, pivot)
        assert stats.kept_index_per_image[i].tolist() == ref.tolist()
        assert pivot in ref.tolist()


def test_keep_one_keeps_exactly_the_pivot():
    # LLaVA: the CLS argmax; NeXT: the argmax over the base view only; Qwen: the farthest token
    model, inp = batch("llava_next")
    _, _, stats, _ = patched_run(model, inp, "todre:relevance=off,keep=1", generate=False)
    _, attn, _ = eager_clip("llava_next", inp)
    view0 = 0
    for img, kept in zip(image_tokens(model, inp), stats.kept_index_per_image):
        base = attn[1][view0, :, 0, 1:].float().mean(0)  # base view comes first in the native layout
        chosen = kept[img.candidate[kept]]
        assert chosen.tolist() == [int(torch.argmax(base))]
        view0 += int(img.view.max()) + 1
    for family in ("qwen2_vl", "qwen2_5_vl"):
        model, inp = batch(family)
        _, _, stats, _ = patched_run(model, inp, "todre:relevance=off,keep=1", generate=False)
        for f, kept in zip(image_features(family, inp), stats.kept_index_per_image):
            assert kept.tolist() == [farthest_pivot(f)]


def test_next_pivot_is_from_the_base_view_even_if_a_crop_scores_higher():
    """Spec recipe 3, on the policy: a crop token with the global CLS-attention maximum is ignored."""
    model, inp = batch("llava_next", 1)
    img = image_tokens(model, inp, ["vit_cls@1"])[0]
    sig = img.signals["vit_cls@1"].clone()
    crop_tok = int(torch.nonzero(img.candidate & (img.view > 0))[0])
    sig[crop_tok] = 10.0
    img.signals["vit_cls@1"] = sig
    pol = ToDRE(keep=1)
    pol.validate("llava_next", vtprune.adapters.get_adapter(model))
    chosen = pol.select(img, 1, Context("llava_next"))
    base = img.signals["vit_cls@1"].clone()
    base[img.view != 0] = -1
    assert chosen.tolist() == [int(torch.argmax(base))] != [crop_tok]


@pytest.mark.parametrize("pivot", ["center", "random", "attention"])
def test_qwen_pivot_options_run_with_exact_counts(pivot):
    model, inp = batch("qwen2_5_vl")
    logits, gen, stats, _ = patched_run(model, inp, f"todre:relevance=off,keep=0.3,pivot={pivot}")
    assert stats.visual_tokens_per_image == [max(1, round(0.3 * n)) for n in stats.visual_tokens_in_per_image]
    assert_matches_shortened(model, "qwen2_5_vl", inp, logits, gen, stats.kept_index_per_image)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_alone(family):
    assert_batch_equals_alone(family, "todre:relevance=off,keep=0.4", sizes=SCORE_SIZES)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_sdpa_equals_eager(family):
    assert_sdpa_equals_eager(family, "todre:relevance=off,keep=0.4", sizes=SCORE_SIZES)


def test_nominal_tokens_and_counts():
    model, inp = batch("llava_next", 1)
    _, _, stats, _ = patched_run(model, inp, "todre:relevance=off,keep=0.25,nominal_tokens=8", generate=False)
    img = image_tokens(model, inp)[0]
    assert stats.visual_tokens_per_image == [2 + int((~img.candidate).sum())]


@pytest.mark.parametrize(
    "method,family,params,match",
    [
        ("todre", "llava", {"order": "greedy"}, "order='greedy' needs unsorted"),
        ("todre", "llava", {"relevance": "on"}, "relevance layer 3 .* leaves no later layer"),
        ("todre", "llava", {"diversity": "dpp"}, "diversity='dpp'"),
        ("todre", "llava", {"pivot": "best"}, "pivot='best'"),
        ("todre", "llava", {"pivot_layer": 7}, "pivot_layer=7"),
        ("todre", "llava", {"keep": 17}, "larger than the 16"),
        ("todre", "llava", {"nominal_tokens": 0}, "nominal_tokens=0"),
        ("todre", "qwen2_vl", {"pivot": "cls"}, "Qwen vision towers have none"),
        ("todre-relevance", "llava", {}, "relevance layer 3 .* leaves no later layer"),
        ("todre-relevance", "llava", {"relevance_layer": 1, "tau": 2.0}, "tau=2.0"),
        ("todre-relevance", "llava", {"relevance_layer": 1, "relevance_scan": "all"}, "relevance_scan"),
    ],
)
def test_bad_parameters_raise(method, family, params, match):
    model, _ = tiny(family)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, method, **params)
    assert getattr(model, "_vtprune_patch", None) is None


def test_unsupported_family_and_cls_less_tower():
    with pytest.raises(ValueError, match="does not support model family 'clip_vit'"):
        ToDRE().validate("clip_vit", None)
    from vtprune.testing import tiny_llava

    model, _ = tiny_llava(vision="siglip")
    with pytest.raises(ValueError, match="pivot='cls' needs a vision tower with a CLS token"):
        vtprune.patch(model, "todre", relevance="off")
    with vtprune.patch(model, "todre", pivot="farthest", relevance="off"):
        pass


def test_parts_and_defaults():
    assert ToDRE().relevance == "on"  # the paper runs both stages
    model, _ = batch("llava")
    with vtprune.patch(model, "todre:keep=0.5,relevance_layer=1") as h:  # one spec, both stages
        assert [p.name for p in h.policies] == ["todre", "todre-relevance"]
    assert [type(p) for p in ToDRE(relevance="on", tau=0.2).parts()] == [ToDRE, ToDRERelevance]
    assert ToDRE(relevance="on", tau=0.2).parts()[1].tau == 0.2
    assert ToDRE().keep == 0.25 and ToDRE().diversity == "kcenter" and ToDRERelevance().tau == 0.10
    assert ToDRERelevance()._relevance_layer(32) == 27 and ToDRERelevance()._relevance_layer(36) == 31


# ---------------------------------------------------------------------------- stage 2
def _hand_view(row4):
    """Spec recipe 4: L = 6, S = {0}, V = {1, 2, 3}, T = {4, 5}; the signal is the T-row mean."""
    row5 = torch.tensor([.40, .01, .01, .02, .26, .30])
    visual = torch.tensor([False, True, True, True, False, False])
    mean_t = (torch.tensor(row4) + row5) / 2
    return DecoderView(hidden=torch.zeros(6, 4), visual=visual, image_id=torch.where(visual, 0, -1),
                       signals={"post_visual_rows@2": mean_t}, original_index=torch.arange(6))


def test_stage2_hand_example():
    pol = ToDRERelevance(relevance_layer=2)
    view = _hand_view([.50, .02, .03, .01, .44, 0])
    t2v, v2t = pol.ratios(view, 2)
    assert t2v == pytest.approx(0.05) and v2t == 0.0
    assert pol.budget_view(view, 3) == 0 and pol.select(3, view, Context("llava")).numel() == 0
    view = _hand_view([.30, .12, .05, .03, .50, 0])
    assert pol.ratios(view, 2)[0] == pytest.approx(0.12)
    assert pol.budget_view(view, 3) == 3 and pol.select(3, view, Context("llava")).tolist() == [1, 2, 3]
    # no token after the last visual token: undefined, never dropped
    view.visual = torch.tensor([False, False, False, True, True, True])
    assert pol.budget_view(view, 3) == 3


def _stage2_alpha_eager(family, short, ell):
    """α_t→v per sample from eager output_attentions of layer ``ell`` on the shortened input."""
    model, _ = tiny(family, "eager")
    with torch.no_grad():
        att = model(**short, output_attentions=True).attentions[ell].float().mean(1)  # (B, L, L)
    out = []
    vis_all = short["input_ids"] == model.config.image_token_id
    for b in range(att.shape[0]):
        valid = short["attention_mask"][b].bool()
        vis = vis_all[b] & valid
        last = int(torch.nonzero(vis).max())
        rows = torch.nonzero(valid).flatten()
        rows = rows[rows > last]
        out.append(float(att[b][rows][:, vis].sum(-1).mean()))
    return out


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_stage2_drop_equals_mask_oracle_and_alpha_equals_eager(family):
    model, inp = batch(family)
    ell = 1
    spec = f"todre:relevance=off,keep=0.5 + todre-relevance:relevance_layer={ell},tau=1.0"
    with vtprune.patch(model, spec) as h:
        with torch.no_grad():
            logits = last_logits(model(**inp).logits)
            stats = h.stats
            gen = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
        ratios = list(h.policies[1].last_ratios[ell + 1])[:2]
    for s, n in zip(stats.schedules, stats.visual_tokens_per_image):
        assert s.visual_tokens_per_layer == [n, n, 0, 0]
    positions = "original" if family.startswith("qwen") else "renumber"
    short = shortened_inputs(model, family, inp, stats.kept_index_per_image, positions=positions)
    keep = short["attention_mask"].bool() & (short["input_ids"] != model.config.image_token_id)
    with masked_run(model, ell + 1, keep), torch.no_grad():
        ref = last_logits(model(**short).logits)
        gref = model.generate(**short, **GEN)[:, short["input_ids"].shape[1]:]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    alphas = _stage2_alpha_eager(family, short, ell)
    assert [r[0] for r in ratios] == pytest.approx(alphas, abs=1e-5)
    assert all(r[1] == 0.0 for r in ratios)


def test_stage2_tau_zero_never_drops_and_batch_decisions_are_per_sample():
    family, ell = "llava", 1
    model, inp = batch(family)
    base, _, s0, _ = patched_run(model, inp, "todre:relevance=off,keep=0.5", generate=False)
    never, _, s1, _ = patched_run(model, inp, f"todre:relevance=off,keep=0.5 + todre-relevance:relevance_layer={ell},tau=0.0",
                                  generate=False)
    torch.testing.assert_close(never, base, rtol=0, atol=0)
    assert [s.visual_tokens_per_layer for s in s1.schedules] == [[n] * 4 for n in s1.visual_tokens_per_image]
    short = shortened_inputs(model, family, inp, s0.kept_index_per_image, positions="renumber")
    a = _stage2_alpha_eager(family, short, ell)
    assert abs(a[0] - a[1]) > 1e-3
    tau = (a[0] + a[1]) / 2  # exactly one sample drops
    spec = f"todre:relevance=off,keep=0.5 + todre-relevance:relevance_layer={ell},tau={tau}"
    _, _, st, _ = patched_run(model, inp, spec, generate=False)
    dropped = [s.visual_tokens_per_layer[-1] == 0 for s in st.schedules]
    assert dropped == [a[0] < tau, a[1] < tau] and sum(dropped) == 1
    assert_batch_equals_alone(family, spec, sizes=SCORE_SIZES)


def test_stage2_scan_from_drops_at_the_first_layer_that_satisfies_the_rule():
    model, inp = batch("qwen2_5_vl")
    spec = "todre:relevance=off,keep=0.5 + todre-relevance:relevance_layer=0,relevance_scan=from,tau=1.0"
    _, _, stats, pols = patched_run(model, inp, spec, generate=False)
    assert pols[1].pruning_layers(4) == [1, 2, 3] and pols[1].signal_layers(4) == {0: "post_visual_rows",
                                                                                  1: "post_visual_rows",
                                                                                  2: "post_visual_rows"}
    for s, n in zip(stats.schedules, stats.visual_tokens_per_image):
        assert s.visual_tokens_per_layer == [n, 0, 0, 0]
