"""Model-level tests of the ``visionzip`` policy on tiny random models of all four families.

Encoded: exact token counts (``d + c`` per view, NeXT newlines kept); the stage-P oracle with
**independently computed** merged features (LLaVA: eager CLIP ``output_attentions`` / hidden states /
captured ``k_proj`` keys -> pure kernel -> the model's projector; Qwen: eager ViT attention ->
received scores -> :func:`visionzip_qwen`), fed with the explicitly shortened input to the unpatched
model: logits and 10 generated tokens, SDPA and eager; LLaVA-NeXT block layout (base block with CLS,
crop CLS and contextual tokens in base slots, crop dominant patches on the unpadded grid); batch of 2
== each alone; SDPA == eager; the adapter's recomputed CLS row / keys / hidden == eager (spec recipe
4); clear ValueErrors.
"""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.methods.visionzip import VisionZip, llava_split, qwen_split, visionzip_qwen, visionzip_tokens

from helpers import (
    SCORE_SIZES,
    assert_batch_equals_alone,
    assert_matches_shortened,
    assert_sdpa_equals_eager,
    score_batch as batch,
    captured_features,
    eager_clip,
    image_features,
    image_tokens,
    patched_run,
    qwen_received,
    tiny,
)

SPECS = {
    "llava": "visionzip:dominant=5,contextual=3",
    "llava_next": "visionzip:keep=6",
    "qwen2_vl": "visionzip:keep=0.5",
    "qwen2_5_vl": "visionzip:keep=0.75",
}


def llava_reference(inp, d, c, mode="reference"):
    """Per image: projected VisionZip tokens from eager CLIP outputs and the pure kernel."""
    model, _ = tiny("llava", "eager")
    hidden, attn, keys = eager_clip("llava", inp)
    feats = []
    with torch.no_grad():
        for i in range(inp["pixel_values"].shape[0]):
            tokens, _ = visionzip_tokens(hidden[-2][i], attn[-2][i, :, 0, :], keys[1][i], d, c, mode)
            feats.append(model.model.multi_modal_projector(tokens))
    return feats


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["reference", "mean"])
def test_llava_counts_and_oracle_with_independent_features(attn, mode):
    model, inp = batch("llava", attn=attn)
    spec = SPECS["llava"] + f",contextual_mode={mode}"
    logits, gen, stats, _ = patched_run(model, inp, spec)
    assert stats.visual_tokens_per_image == [8, 8]
    # the merged sequence [CLS, 4 dominant patches, 3 contextual] fills the first 8 placeholder slots
    assert all(k.tolist() == list(range(8)) for k in stats.kept_index_per_image)
    feats = llava_reference(inp, 5, 3, mode)
    torch.testing.assert_close(captured_features(model, inp, spec), feats, rtol=1e-5, atol=1e-5)
    assert_matches_shortened(model, "llava", inp, logits, gen, stats.kept_index_per_image, features=feats)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_counts_and_oracle_with_independent_features(family, attn):
    model, inp = batch(family, attn=attn)
    spec = SPECS[family]
    keep = float(spec.split("keep=")[1])
    logits, gen, stats, pols = patched_run(model, inp, spec)
    block = int(next(iter(pols[0].required_signals(None))).split("@")[1])
    assert block == (1 if family == "qwen2_vl" else 3)  # the last full-attention block
    scores = qwen_received(family, inp, block)
    feats, kept, counts = [], [], []
    for f, s in zip(image_features(family, inp), scores):
        d, c = qwen_split(max(1, round(keep * f.shape[0])))
        tok, rep = visionzip_qwen(f, s, d, c)
        feats.append(tok)
        kept.append(rep)
        counts.append(d + c)
    assert stats.visual_tokens_per_image == counts
    assert all(torch.equal(a, b) for a, b in zip(stats.kept_index_per_image, kept))
    assert_matches_shortened(model, family, inp, logits, gen, kept, features=feats)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_next_block_layout_counts_and_oracle(attn):
    model, inp = batch("llava_next", attn=attn)
    spec = SPECS["llava_next"]  # 6 per view -> d = round(27/32 * 6) = 5 (CLS + 4 patches), c = 1
    d, c = llava_split(6)
    assert (d, c) == (5, 1)
    logits, gen, stats, _ = patched_run(model, inp, spec)
    feats = captured_features(model, inp, spec)
    hidden, attn_maps, keys = eager_clip("llava_next", inp)
    ref_model, _ = tiny("llava_next", "eager")
    view0 = 0
    for img, kept, f in zip(image_tokens(model, inp), stats.kept_index_per_image, feats):
        n_views = int(img.view.max()) + 1
        n_nl = int((~img.candidate).sum())
        assert kept.numel() == n_views * (d + c) + n_nl == f.shape[0]
        assert set(torch.nonzero(~img.candidate).flatten().tolist()) <= set(kept.tolist())
        base_slots = (n_views - 1) * (1 + c) + d + c
        assert kept[:base_slots].tolist() == list(range(base_slots))  # base block + crop CLS + crop ctx
        crop_kept = kept[base_slots:]
        crop_patches = crop_kept[img.candidate[crop_kept]]
        assert (img.view[crop_patches] > 0).all() and crop_patches.numel() == (n_views - 1) * (d - 1)
        # the base block equals the kernel on the eager base view
        with torch.no_grad():
            tokens, _ = visionzip_tokens(hidden[-2][view0], attn_maps[-2][view0, :, 0, :], keys[1][view0], d, c)
            torch.testing.assert_close(f[: d + c], ref_model.model.multi_modal_projector(tokens), rtol=1e-5, atol=1e-5)
        view0 += n_views
    assert_matches_shortened(model, "llava_next", inp, logits, gen, stats.kept_index_per_image, features=feats)


@pytest.mark.parametrize("family", list(SPECS))
def test_batch_equals_each_alone(family):
    assert_batch_equals_alone(family, SPECS[family], sizes=SCORE_SIZES)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
def test_sdpa_equals_eager(family):
    assert_sdpa_equals_eager(family, SPECS[family], sizes=SCORE_SIZES)


def test_adapter_signals_equal_eager_recompute_oracle():
    """Spec recipe 4: the recomputed CLS row of the feature layer and its head-mean keys == eager."""
    model, inp = batch("llava")
    imgs = image_tokens(model, inp, ["vit_cls@1", "vit_keys@1", "vit_hidden@1"])
    hidden, attn, keys = eager_clip("llava", inp)
    for i, img in enumerate(imgs):
        torch.testing.assert_close(img.signals["vit_cls@1"], attn[1][i, :, 0, 1:].float().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(img.signals["vit_keys@1"], keys[1][i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(img.signals["vit_hidden@1"], hidden[2][i], rtol=1e-5, atol=1e-6)


def test_splits_and_all_tokens_is_not_the_unpatched_model():
    assert [llava_split(n) for n in (64, 128, 192, 32)] == [(54, 10), (108, 20), (162, 30), (27, 5)]
    # d = 16 (CLS + 15 patches), c = 0: every slot used, CLS fed -> differs from vanilla LLaVA (documented)
    model, inp = batch("llava", 1)
    logits, _, stats, _ = patched_run(model, inp, "visionzip:dominant=16,contextual=0", generate=False)
    assert stats.visual_tokens_per_image == [16]
    with torch.no_grad():
        ref = model(**inp).logits[:, -1]
    assert not torch.allclose(logits, ref)


def test_default_budget_is_54_plus_10():
    assert VisionZip()._split_for("llava", 576) == (54, 10)
    assert VisionZip(keep=128)._split_for("llava_next", 576) == (108, 20)
    assert VisionZip()._split_for("qwen2_vl", 576) == qwen_split(round(0.112 * 576))
    # a view with fewer tokens keeps them all (capped), never more
    assert VisionZip(dominant=8, contextual=4)._split_for("llava_next", 8) == (8, 1)
    assert VisionZip(keep=64)._split_for("llava_next", 20) == llava_split(21)
    assert VisionZip(dominant=5, contextual=5)._split_for("qwen2_vl", 4) == (4, 0)


@pytest.mark.parametrize(
    "family,params,match",
    [
        ("llava", {}, "keep = 64 tokens per view do not fit the 16 image placeholders"),  # default 54+10
        ("llava", {"dominant": 10, "contextual": 7}, "dominant \\+ contextual = 17 tokens per view do not fit"),
        ("llava", {"dominant": 5}, "give both dominant= and contextual="),
        ("llava", {"dominant": 0, "contextual": 3}, "dominant=0 must be an int >= 1"),
        ("llava", {"keep": 9, "dominant": 5, "contextual": 3}, "disagrees"),
        ("llava", {"keep": 8, "positions": "original"}, "positions='original' is not defined on LLaVA"),
        ("llava", {"keep": 8, "next_layout": "reference"}, "next_layout='reference'"),
        ("llava", {"keep": 8, "contextual_mode": "sum"}, "contextual_mode"),
        ("llava", {"keep": 8, "layer": 5}, "layer=5"),
        ("qwen2_vl", {"keep": 1.5}, r"fraction outside \(0, 1\]"),
    ],
)
def test_bad_parameters_raise(family, params, match):
    model, _ = tiny(family)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "visionzip", **params)
    assert getattr(model, "_vtprune_patch", None) is None


def test_unsupported_towers_and_families():
    from vtprune.testing import tiny_llava

    model, _ = tiny_llava(vision="siglip")
    with pytest.raises(ValueError, match="needs a vision tower with a CLS token"):
        vtprune.patch(model, "visionzip", keep=8)
    with pytest.raises(ValueError, match="does not support model family 'clip_vit'"):
        VisionZip(keep=8).validate("clip_vit", None)


def test_next_base_view_overflow_is_a_clear_error():
    # 16 base slots: base block 12 + 4 = 16, plus 2 crops (8 valid patches each: d capped at 9,
    # c at 0) contribute their CLS tokens -> 18 > 16
    model, inp = batch("llava_next", 1)
    with vtprune.patch(model, "visionzip", dominant=12, contextual=4):
        with pytest.raises(ValueError, match="the base view has 16 slots"):
            with torch.no_grad():
                model(**inp)
