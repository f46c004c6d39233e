"""Model-level tests of ``vispruner`` on tiny random models of all four families (and a SigLIP LLaVA).

Exact kept counts (per view; LLaVA-NeXT newlines kept outside the budget); the selection == the pure
kernel on **independently computed** signals (LLaVA: eager CLIP ``output_attentions`` and hidden
states; Qwen: eager ViT attention -> received scores, and the merger outputs of the unpatched model);
the stage-P oracle (logits and 10 generated tokens == the unpatched model on the explicitly shortened
input), SDPA and eager; clear errors. A left-padded batch == each sample alone and SDPA == eager: the
conformance matrix (tests/test_conformance.py, ``vispruner:keep=0.5``).
"""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.methods._common import view_grids
from vtprune.methods.vispruner import VisPruner, vispruner_select

from helpers import (
    assert_int_keep_is_per_view_and_capped,
    assert_matches_shortened,
    batch,
    eager_clip,
    image_features,
    image_tokens,
    patched_run,
    score_batch,
    qwen_received,
    tiny,
)

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
SPEC = "vispruner:keep=0.5"


def expected_counts(model, inp, keep):
    out = []
    for img in image_tokens(model, inp):
        fam = "llava_next" if bool((~img.candidate).any()) or int(img.view.max()) > 0 else "llava"
        views = view_grids(img, fam, method="test")
        out.append(sum(max(1, round(keep * g.index.numel())) for g in views) + int((~img.candidate).sum()))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_counts_and_stage_p_oracle(family, attn):
    model, inp = batch(family, attn=attn)
    logits, gen, stats, _ = patched_run(model, inp, SPEC)
    assert stats.visual_tokens_per_image == expected_counts(model, inp, 0.5)
    assert_matches_shortened(model, family, inp, logits, gen, stats.kept_index_per_image)


@pytest.mark.parametrize("ratio", [0.5, 0.0, 1.0])
def test_llava_selection_equals_kernel_on_eager_clip(ratio):
    model, inp = batch("llava")
    _, _, stats, _ = patched_run(model, inp, f"vispruner:keep=6,important_ratio={ratio}", generate=False)
    hidden, attn, _ = eager_clip("llava", inp)  # feature layer = 1 (0-based) of the 3-layer tiny CLIP
    for i in range(inp["pixel_values"].shape[0]):
        cls = attn[1][i, :, 0, 1:].float().mean(0)
        ref = vispruner_select(cls, hidden[2][i, 1:].float(), 6, ratio)
        assert stats.kept_index_per_image[i].tolist() == ref.kept.tolist()


def test_llava_next_per_view_selection_equals_kernel_on_eager_clip():
    model, inp = batch("llava_next")
    _, _, stats, _ = patched_run(model, inp, "vispruner:keep=5", generate=False)
    hidden, attn, _ = eager_clip("llava_next", inp)
    view0 = 0
    for img, kept in zip(image_tokens(model, inp), stats.kept_index_per_image):
        chosen = set()
        for g in view_grids(img, "llava_next", method="test"):
            v = view0 + g.view
            cls = attn[1][v, :, 0, 1:].float().mean(0)[g.local]
            sel = vispruner_select(cls, hidden[2][v, 1:].float()[g.local], min(5, g.index.numel()), 0.5)
            chosen |= set(g.index[sel.kept].tolist())
        assert set(kept[img.candidate[kept]].tolist()) == chosen
        assert set(torch.nonzero(~img.candidate).flatten().tolist()) <= set(kept.tolist())  # newlines
        view0 += int(img.view.max()) + 1


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_selection_equals_kernel_on_eager_received(family):
    model, inp = score_batch(family)
    _, _, stats, pols = patched_run(model, inp, "vispruner:keep=0.5,important_ratio=0.5", generate=False)
    block = int(next(iter(pols[0].required_signals(None))).split("@")[1])
    assert block == len(model.model.visual.blocks) - 1
    for s, f, kept in zip(qwen_received(family, inp, block), image_features(family, inp),
                          stats.kept_index_per_image):
        ref = vispruner_select(s, f, max(1, round(0.5 * f.shape[0])), 0.5)
        assert kept.tolist() == ref.kept.tolist()


def test_siglip_tower_uses_received_attention_of_the_last_layer():
    from vtprune.testing import tiny_llava

    model, proc = tiny_llava(vision="siglip")
    from vtprune.testing import make_inputs, tiny_images

    inp = make_inputs("llava", proc, ["what is it?", "a longer question about the picture here?"], tiny_images(2))
    pol = VisPruner(keep=6)
    pol.validate("llava", vtprune.adapters.get_adapter(model))
    assert set(pol.required_signals(None)) == {"vit_received@2", "vit_hidden@2"}
    logits, gen, stats, _ = patched_run(model, inp, "vispruner:keep=6")
    assert stats.visual_tokens_per_image == [6, 6]
    assert_matches_shortened(model, "llava", inp, logits, gen, stats.kept_index_per_image)
    with pytest.raises(ValueError, match="importance='cls' needs a vision tower with a CLS token"):
        vtprune.patch(model, "vispruner", keep=6, importance="cls")


def test_int_keep_is_per_view_and_capped():
    assert_int_keep_is_per_view_and_capped("vispruner")


def test_importance_received_option_on_a_cls_tower():
    model, inp = batch("llava")
    pol = VisPruner(keep=6, importance="received")
    pol.validate("llava", vtprune.adapters.get_adapter(model))
    assert set(pol.required_signals(None)) == {"vit_received@2", "vit_hidden@1"}
    logits, gen, stats, _ = patched_run(model, inp, "vispruner:keep=6,importance=received")
    assert_matches_shortened(model, "llava", inp, logits, gen, stats.kept_index_per_image)


@pytest.mark.parametrize(
    "family,params,match",
    [
        ("llava", {"keep": 17}, "larger than the 16 visual tokens"),
        ("llava", {"keep": 8, "important_ratio": 1.5}, "important_ratio=1.5"),
        ("llava", {"keep": 8, "step": 0}, "step=0"),
        ("llava", {"keep": 8, "importance": "text"}, "importance='text'"),
        ("llava", {"keep": 8, "layer": 5}, "layer=5"),
        ("qwen2_vl", {"keep": 0.5, "importance": "cls"}, "OneVision vision towers have none"),
        ("qwen2_vl", {"keep": 1.5}, r"fraction outside \(0, 1\]"),
    ],
)
def test_bad_parameters_raise(family, params, match):
    model, _ = tiny(family)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "vispruner", **params)
    assert getattr(model, "_vtprune_patch", None) is None


def test_multi_layer_features_are_a_clear_error():
    model, _ = tiny("llava")
    saved = model.config.vision_feature_layer
    model.config.vision_feature_layer = [-2, -1]
    try:
        with pytest.raises(ValueError, match="needs a single integer vision_feature_layer"):
            vtprune.patch(model, "vispruner", keep=8, layer=1)
    finally:
        model.config.vision_feature_layer = saved
    assert getattr(model, "_vtprune_patch", None) is None


def test_unsupported_family_is_a_clear_error():
    with pytest.raises(ValueError, match="does not support model family 'clip_vit'"):
        VisPruner().validate("clip_vit", None)
