"""Model-level tests of ``cdpruner`` on tiny random models of all four families.

Exact kept counts (per view; LLaVA-NeXT newlines kept outside the budget); the selection == the pure
kernels on **independently computed** inputs (the unpatched model's projected features and the model's
own input embeddings of the question tokens, picked from the unpadded prompt here); the instruction
changes the selection and ``relevance="off"`` does not see it; the stage-P oracle (logits and 10
generated tokens == the unpatched model on the explicitly shortened input), SDPA and eager; clear
errors. A left-padded batch == each sample alone and SDPA == eager: the conformance matrix
(tests/test_conformance.py, ``cdpruner:keep=0.5``).
"""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.methods._common import view_grids
from vtprune.methods.cdpruner import CDPruner, cdpruner_select, minmax_relevance, relevance_scores
from vtprune.testing import make_inputs, tiny_images

from helpers import (
    SCORE_SIZES,
    assert_int_keep_is_per_view_and_capped,
    assert_matches_shortened,
    batch,
    image_features,
    image_tokens,
    patched_run,
    score_batch,
    tiny,
)

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
SPEC = "cdpruner:keep=0.5"


def family_of(img) -> str:
    return "llava_next" if bool((~img.candidate).any()) else "llava"  # only NeXT has newlines


def instruction(model, inp, b):
    """(M, D) input embeddings of the tokens after sample b's last image placeholder (independent)."""
    ids = inp["input_ids"][b][inp["attention_mask"][b].bool()]
    last = int(torch.nonzero(ids == model.config.image_token_id).max())
    with torch.no_grad():
        return model.get_input_embeddings()(ids[last + 1:])


def reference_selection(model, family, inp, keep):
    """Per image, kept indices from the kernels on the unpatched features and the question embeddings."""
    out = []
    imgs = image_tokens(model, inp)
    for b, (img, feats) in enumerate(zip(imgs, image_features(family, inp))):
        cand = img.candidate_index()
        rel = minmax_relevance(relevance_scores(feats[cand], instruction(model, inp, b)))
        pos = torch.full((img.num_tokens,), -1, dtype=torch.long)
        pos[cand] = torch.arange(cand.numel())
        kept = [torch.nonzero(~img.candidate).flatten()]
        for g in view_grids(img, family_of(img), method="test"):
            k = max(1, round(keep * g.index.numel()))
            kept.append(g.index[cdpruner_select(feats[g.index], rel[pos[g.index]], k)])
        out.append(torch.sort(torch.cat(kept)).values)
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_selection_equals_kernels_and_stage_p_oracle(family, attn):
    model, inp = score_batch(family, attn=attn)
    logits, gen, stats, _ = patched_run(model, inp, SPEC)
    ref = reference_selection(model, family, inp, 0.5)
    assert [k.tolist() for k in stats.kept_index_per_image] == [r.tolist() for r in ref]
    assert_matches_shortened(model, family, inp, logits, gen, stats.kept_index_per_image)


def _same_image_two_questions(family):
    model, proc = tiny(family)
    sizes = SCORE_SIZES[family]
    img = tiny_images(1, sizes=sizes[:1] if sizes else None)
    a = make_inputs(family, proc, ["what colour is the large object?"], img)
    b = make_inputs(family, proc, ["how many people are standing on the left side?"], img)
    return model, a, b


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_instruction_changes_the_selection_unless_relevance_is_off(family):
    model, a, b = _same_image_two_questions(family)
    kept = {}
    for spec in ("cdpruner:keep=0.25", "cdpruner:keep=0.25,relevance=off"):
        kept[spec] = [patched_run(model, x, spec, generate=False)[2].kept_index_per_image[0].tolist() for x in (a, b)]
    assert kept["cdpruner:keep=0.25"][0] != kept["cdpruner:keep=0.25"][1]
    assert kept["cdpruner:keep=0.25,relevance=off"][0] == kept["cdpruner:keep=0.25,relevance=off"][1]


def test_options_select_their_signals():
    assert CDPruner().required_signals(None) == {"instruction_embeds": None}
    assert CDPruner(instruction="all_text").required_signals(None) == {"text_embeds": None}
    assert CDPruner(relevance="off").required_signals(None) == {}
    model, inp = batch("llava")
    for spec in ("cdpruner:keep=0.5,instruction=all_text", "cdpruner:keep=0.5,relevance=cosine",
                 "cdpruner:keep=0.5,theta=0.5"):
        logits, gen, stats, _ = patched_run(model, inp, spec)
        assert stats.visual_tokens_per_image == [8, 8]
        assert_matches_shortened(model, "llava", inp, logits, gen, stats.kept_index_per_image)


def test_int_keep_is_per_view_and_capped():
    assert_int_keep_is_per_view_and_capped("cdpruner")


@pytest.mark.parametrize(
    "family,params,match",
    [
        ("llava", {"keep": 17}, "larger than the 16 visual tokens"),
        ("llava", {"keep": 8, "relevance": "attention"}, "relevance='attention'"),
        ("llava", {"keep": 8, "instruction": "system"}, "instruction='system'"),
        ("llava", {"keep": 8, "theta": 1.0}, "theta=1.0"),
        ("qwen2_vl", {"keep": 1.5}, r"fraction outside \(0, 1\]"),
    ],
)
def test_bad_parameters_raise(family, params, match):
    model, _ = tiny(family)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "cdpruner", **params)
    assert getattr(model, "_vtprune_patch", None) is None


def test_empty_instruction_is_the_unconditional_dpp():
    import types

    from vtprune.policy import Context, ImageTokens
    from vtprune.signals import TextTokens

    g = torch.Generator().manual_seed(0)
    n = 16
    img = ImageTokens(features=torch.randn(n, 24, generator=g), candidate=torch.ones(n, dtype=torch.bool),
                      view=torch.zeros(n, dtype=torch.long),
                      grid=torch.stack([torch.arange(n) // 4, torch.arange(n) % 4], 1), grid_shapes=[(4, 4)],
                      signals={"instruction_embeds": TextTokens(ids=torch.zeros(0, dtype=torch.long),
                                                                embeds=torch.zeros(0, 24))})
    ad = types.SimpleNamespace(nominal_visual_tokens=lambda: None)
    kept = {}
    for rel in ("negated", "off"):
        pol = CDPruner(keep=5, relevance=rel)
        pol.validate("llava", ad)
        kept[rel] = pol.apply(img, Context("llava"))[0].tolist()
    assert len(kept["negated"]) == 5 and kept["negated"] == kept["off"]


def test_unsupported_family_is_a_clear_error():
    with pytest.raises(ValueError, match="does not support model family 'clip_vit'"):
        CDPruner().validate("clip_vit", None)
