"""Model-level tests of the ``hiprune`` policy on tiny random models of all four families.

Encoded: exact kept counts (LLaVA ``keep``; NeXT ``floor(K/V)`` per view capped by the valid crop
tokens, newlines kept; Qwen ``round(n*keep)``); the stage-P oracle (patched logits and 10 generated
tokens == the unpatched model on the explicitly shortened input), SDPA and eager; batch of 2 with
left padding == each alone; SDPA == eager selections; the selection == the pure kernel on scores from
*eager* attention maps (``output_attentions`` on CLIP, captured eager weights on the Qwen ViTs: the
recompute oracle of spec section 7 recipe 6); layer defaults on small towers; clear ValueErrors.
"""
from __future__ import annotations

import types

import pytest
import torch

import vtprune
from vtprune.methods.hiprune import HiPrune, attention_received, budget_per_view, hiprune_select

from helpers import (
    SCORE_SIZES,
    assert_batch_equals_alone,
    assert_matches_shortened,
    assert_sdpa_equals_eager,
    score_batch as batch,
    eager_clip,
    image_tokens,
    patched_run,
    qwen_received,
    tiny,
)

SPECS = {
    "llava": "hiprune:keep=8,alpha=1.0",
    "llava_next": "hiprune:keep=30,alpha=0.5",
    "qwen2_vl": "hiprune:keep=0.5,alpha=1.0",
    "qwen2_5_vl": "hiprune:keep=0.4,alpha=1.0",
}
FAMILIES = list(SPECS)


def expected_counts(family, model, inp, keep):
    """Kept tokens per image (newlines included) from the spec's budget rule."""
    out = []
    for img in image_tokens(model, inp):
        cand = img.candidate
        if family == "llava":
            out.append(keep)
        elif family == "llava_next":
            views = img.view[cand]
            n_views = int(views.max()) + 1
            per_view = budget_per_view(keep, n_views)
            kept = sum(min(b, int((views == v).sum())) for v, b in enumerate(per_view))
            out.append(kept + int((~cand).sum()))
        else:
            out.append(max(1, round(keep * img.num_tokens)))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_kept_count_and_stage_p_oracle(family, attn):
    model, inp = batch(family, attn=attn)
    spec = SPECS[family]
    logits, gen, stats, _ = patched_run(model, inp, spec)
    keep = float(spec.split("keep=")[1].split(",")[0]) if family.startswith("qwen") else int(
        spec.split("keep=")[1].split(",")[0])
    assert stats.visual_tokens_per_image == expected_counts(family, model, inp, keep)
    assert all(o < i for o, i in zip(stats.visual_tokens_per_image, stats.visual_tokens_in_per_image))
    assert_matches_shortened(model, family, inp, logits, gen, stats.kept_index_per_image)


def test_llava_selection_equals_kernel_on_eager_attentions():
    model, inp = batch("llava")
    _, _, stats, _ = patched_run(model, inp, SPECS["llava"], generate=False)
    _, attentions, _ = eager_clip("llava", inp)
    # tiny CLIP: 3 layers; object_layer default 9 of 24 -> 1 of 3 (0-based 0); deep = feature layer 1
    s_o = attention_received(attentions[0])
    s_d = attention_received(attentions[1])
    for i in range(2):
        ref = hiprune_select(s_o[i], s_d[i], 8, 1.0, 4)
        assert stats.kept_index_per_image[i].tolist() == ref.tolist()


def test_llava_score_cls_and_explicit_layers():
    model, inp = batch("llava")
    _, _, stats, _ = patched_run(model, inp, "hiprune:keep=6,alpha=1.0,score=cls,object_layer=3,deep_layer=0",
                                 generate=False)
    _, attentions, _ = eager_clip("llava", inp)
    s_o = attentions[2][:, :, 0, 1:].float().mean(1)
    s_d = attentions[0][:, :, 0, 1:].float().mean(1)
    for i in range(2):
        assert stats.kept_index_per_image[i].tolist() == hiprune_select(s_o[i], s_d[i], 6, 1.0, 4).tolist()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_selection_equals_kernel_on_eager_attention(family):
    model, inp = batch(family)
    _, _, stats, pols = patched_run(model, inp, SPECS[family], generate=False)
    names = sorted(pols[0].required_signals(None))
    blocks = sorted(int(n.split("@")[1]) for n in names)
    assert blocks == ([0, 1] if family == "qwen2_vl" else [1, 3])  # 16 of 32 -> 1 of 2 / 2 of 4; last
    s_o = qwen_received(family, inp, blocks[0])
    s_d = qwen_received(family, inp, blocks[1])
    keep = 0.5 if family == "qwen2_vl" else 0.4
    for i, t in enumerate(inp["image_grid_thw"].tolist()):
        n = s_o[i].numel()
        ref = hiprune_select(s_o[i], s_d[i], max(1, round(keep * n)), 1.0, t[2] // 2)
        assert stats.kept_index_per_image[i].tolist() == ref.tolist()


def test_next_layout_views_and_newlines():
    model, inp = batch("llava_next")
    _, _, stats, _ = patched_run(model, inp, SPECS["llava_next"], generate=False)
    for img, kept in zip(image_tokens(model, inp), stats.kept_index_per_image):
        newline = torch.nonzero(~img.candidate).flatten()
        assert set(newline.tolist()) <= set(kept.tolist())  # all newlines kept, not budgeted
        views = img.view[kept][img.candidate[kept]]
        n_views = int(img.view.max()) + 1
        for v, b in enumerate(budget_per_view(30, n_views)):
            assert int((views == v).sum()) == min(b, int((img.view == v).sum()))
        assert torch.equal(kept, torch.sort(kept).values)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_alone(family):
    assert_batch_equals_alone(family, SPECS[family], sizes=SCORE_SIZES)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_sdpa_equals_eager(family):
    assert_sdpa_equals_eager(family, SPECS[family], sizes=SCORE_SIZES)


def _stub(family, depth, **cfg):
    config = types.SimpleNamespace(vision_feature_layer=-2, **cfg)
    ad = types.SimpleNamespace(family=family, config=config, vit_has_cls=lambda: True,
                               nominal_visual_tokens=lambda: None, position_modes=("original", "renumber"))
    if family.startswith("qwen"):
        ad.vit_blocks = lambda: [None] * depth
        ad.full_attention_blocks = lambda: [7, 15, 23, 31] if depth == 32 else list(range(depth))
    else:
        ad.vit_layers = lambda: [None] * depth
    return ad


def test_layer_defaults_on_reference_and_small_towers():
    assert set(HiPrune().required_signals(_stub("llava", 24))) == {"vit_received@8", "vit_received@22"}
    assert set(HiPrune().required_signals(_stub("qwen2_5_vl", 32))) == {"vit_received@15", "vit_received@31"}
    assert set(HiPrune().required_signals(_stub("llava", 3))) == {"vit_received@0", "vit_received@1"}
    assert set(HiPrune().required_signals(_stub("llava", 12))) == {"vit_received@3", "vit_received@10"}  # round(4.5) = 4
    assert set(HiPrune(deep_layer=-1).required_signals(_stub("llava", 24))) == {"vit_received@8", "vit_received@23"}


@pytest.mark.parametrize(
    "family,params,match",
    [
        ("llava", {"keep": 17}, "larger than the 16 visual tokens"),
        ("llava", {"keep": 192}, "larger than the 16"),  # the paper default does not fit a tiny model
        ("llava", {"keep": 8, "buffer_border": "wrap"}, "buffer_border='wrap'; choose one of"),
        ("llava", {"keep": 8, "register_exclusion": "x"}, "register_exclusion"),
        ("llava", {"keep": 8, "object_layer": 4}, r"object_layer=4 \(1-based\) must be in 1..3"),
        ("llava", {"keep": 8, "object_layer": 0}, "must be in 1..3"),
        ("llava", {"keep": 8, "deep_layer": 3}, "deep_layer=3"),
        ("llava", {"keep": 8, "next_layout": "reference"}, "next_layout='reference'"),
        ("llava", {"keep": 8, "alpha": -1}, "alpha"),
        ("qwen2_vl", {"keep": 0.5, "score": "cls"}, "Qwen vision towers have none"),
        ("qwen2_vl", {"keep": 1.5}, r"fraction outside \(0, 1\]"),
    ],
)
def test_bad_parameters_raise(family, params, match):
    model, _ = tiny(family)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "hiprune", **params)
    assert getattr(model, "_vtprune_patch", None) is None


def test_unsupported_family_and_siglip_cls_score():
    with pytest.raises(ValueError, match="does not support model family 'clip_vit'"):
        HiPrune(keep=8).validate("clip_vit", _stub("llava", 3))
    from vtprune.testing import tiny_llava

    model, _ = tiny_llava(vision="siglip")
    with pytest.raises(ValueError, match="score='cls' needs a vision tower with a CLS token"):
        vtprune.patch(model, "hiprune", keep=8, score="cls")


def test_next_budget_smaller_than_views_and_anchor_overflow():
    # floor(K/V) per view: keep=2 with 3 views keeps no patch at all, only the newlines
    model, inp = batch("llava_next", 1)
    _, _, stats, _ = patched_run(model, inp, "hiprune:keep=2", generate=False)
    img = image_tokens(model, inp)[0]
    assert stats.visual_tokens_per_image == [int((~img.candidate).sum())]
    # alpha too large for the budget: |AB| > N' is a clear ValueError at the request
    model, inp = batch("llava", 1)
    with vtprune.patch(model, "hiprune", keep=4, alpha=5.0):
        with pytest.raises(ValueError, match="anchors\\+buffers .* exceed the budget"):
            with torch.no_grad():
                model(**inp)


def test_next_global_budget_option_keeps_exact_total_and_follows_deep_scores():
    """next_budget_split='global': the same total as the per-view split, registers ranked across views."""
    import vtprune
    from vtprune.testing import tiny_llava_next, make_inputs, tiny_images

    model, proc = tiny_llava_next()
    inp = make_inputs("llava_next", proc, ["q?"], tiny_images(1, sizes=[(112, 112)]))
    with vtprune.patch(model, "hiprune:keep=20,next_budget_split=global") as h, torch.no_grad():
        model(**inp)
    (kept,) = h.stats.kept_index_per_image
    assert kept.numel() - (h.stats.visual_tokens_per_image[0] - 20) >= 0
    n_newlines = h.stats.visual_tokens_in_per_image[0] - 5 * 16  # 5 views of 16 patches
    assert h.stats.visual_tokens_per_image == [20 + n_newlines]
    with vtprune.patch(model, "hiprune:keep=20") as h2, torch.no_grad():
        model(**inp)
    assert h2.stats.visual_tokens_per_image == [20 + n_newlines]  # floor(20/5) = 4 per view
