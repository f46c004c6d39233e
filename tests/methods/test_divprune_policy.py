"""Model-level tests of ``divprune`` on tiny random models of all four families.

Exact kept counts (``round(keep * n)`` of the candidates; LLaVA-NeXT newlines kept outside the budget);
the selection == the pure kernel on the unpatched model's own projected features; the stage-P oracle
(logits and 10 generated tokens == the unpatched model on the explicitly shortened input), SDPA and
eager; clear errors. A left-padded batch == each
sample alone and SDPA == eager: the conformance matrix (tests/test_conformance.py, ``divprune:keep=0.5``).
"""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.methods.divprune import DivPrune, divprune_select

from helpers import (
    assert_matches_shortened,
    batch,
    image_features,
    image_tokens,
    patched_run,
    score_batch,
    tiny,
)

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
SPEC = "divprune:keep=0.4"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_counts_selection_and_stage_p_oracle(family, attn):
    model, inp = score_batch(family, attn=attn)
    logits, gen, stats, _ = patched_run(model, inp, SPEC)
    imgs = image_tokens(model, inp)
    assert stats.visual_tokens_per_image == [
        max(1, round(0.4 * img.num_candidates)) + int((~img.candidate).sum()) for img in imgs]
    for img, feats, kept in zip(imgs, image_features(family, inp), stats.kept_index_per_image):
        cand = img.candidate_index()
        chosen = kept[img.candidate[kept]]
        assert chosen.tolist() == cand[divprune_select(feats[cand], chosen.numel())].tolist()
        assert set(torch.nonzero(~img.candidate).flatten().tolist()) <= set(kept.tolist())  # newlines
    assert_matches_shortened(model, family, inp, logits, gen, stats.kept_index_per_image)


def test_int_keep_and_keep_all():
    model, inp = batch("llava", 1)
    _, _, stats, _ = patched_run(model, inp, "divprune:keep=5", generate=False)
    assert stats.visual_tokens_per_image == [5]
    logits, _, stats, _ = patched_run(model, inp, "divprune:keep=1.0", generate=False)
    assert stats.visual_tokens_per_image == [16]
    with torch.no_grad():
        ref = model(**inp).logits[:, -1].float()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)  # all tokens == the unpatched model


def test_default_keep_is_the_reference_ratio():
    assert DivPrune().keep == 0.098


@pytest.mark.parametrize(
    "family,params,match",
    [
        ("llava", {"keep": 1.5}, r"fraction outside \(0, 1\]"),
        ("llava", {"keep": 17}, "larger than the 16 visual tokens"),
        ("llava", {"keep": 0.5, "positions": "sideways"}, "positions='sideways'"),
        ("qwen2_vl", {"keep": 0.5, "positions": "renumber"}, "positions='renumber' is not defined"),
    ],
)
def test_bad_parameters_raise(family, params, match):
    model, _ = tiny(family)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "divprune", **params)
    assert getattr(model, "_vtprune_patch", None) is None


def test_unsupported_family_is_a_clear_error():
    with pytest.raises(ValueError, match="does not support model family 'clip_vit'"):
        DivPrune().validate("clip_vit", None)
