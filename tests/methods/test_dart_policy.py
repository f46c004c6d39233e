"""DART policy (stage D) on tiny models of every family.

Independent reference: the *unpatched* model run once with its KV cache and hidden states (as the
reference port reads them: layer K-1's cached keys, layer K's input through the final norm), the
pure kernel :func:`dart_select` on those, then the unpatched model with the dropped keys masked from
layer K on (``oracles.masked_run``), or on the hybrid Qwen3.5 with the sequence physically shortened
from layer K on (``oracles.physically_shortened_run``: a mask cannot hide a token from a Gated DeltaNet
layer): logits and cached ``generate`` must match the patched model.
"""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.methods import dart as D
from vtprune.testing import FAMILIES

from helpers import GEN, assert_batch_equals_alone, batch, layer_inputs, recorded_views
from oracles import last_logits, stage_d_reference

ATTN = ["sdpa", "eager"]
SPEC = dict(layer=2, keep=0.5, pivot_image=2, pivot_text=2)


def reference_keep(model, inp, *, layer=2, **params) -> torch.Tensor:
    """(L,) bool over the LLM input of one unpadded sample: tokens DART keeps, from the unpatched model."""
    inputs, out = layer_inputs(model, inp, [layer], use_cache=True)
    keys = out.past_key_values.layers[layer - 1].keys[0]  # (Hkv, L, hd), rotary applied
    L = keys.shape[1]
    key_norm = keys.float().permute(1, 0, 2).reshape(L, -1).abs().sum(-1)
    states = model.model.language_model.norm(inputs[layer])[0]  # input of layer K (Qwen3-VL: with DeepStack), final norm
    ids = inp["input_ids"][0]
    visual = ids == model.config.image_token_id
    vis = torch.nonzero(visual).flatten()
    text = torch.nonzero(~visual & (torch.arange(L) > int(vis.max()))).flatten()
    kept = D.dart_select(key_norm, states, vis, text, **params)
    keep = ~visual
    keep[kept] = True
    return keep


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_physical_removal_equals_cache_reference_and_mask_run(family, attn):
    model, inp = batch(family, n=1, attn=attn, first=1)
    params = dict(SPEC)
    layer = params.pop("layer")
    with vtprune.patch(model, "dart", layer=layer, **params) as h, torch.no_grad():
        logits = model(**inp).logits
        gen = model.generate(**inp, **GEN)
        kept_index = h.stats.llm_kept_index
        sched = h.stats.schedules[0]
    keep = reference_keep(model, inp, layer=layer, **params)
    assert kept_index[0].tolist() == torch.nonzero(keep).flatten().tolist()
    n_vis = int((inp["input_ids"] == model.config.image_token_id).sum())
    n_text_after = int(keep.numel() - 1 - int(torch.nonzero(inp["input_ids"][0] == model.config.image_token_id).max()))
    budget = D.dart_budget(n_vis, n_text_after, **params)
    assert sched.visual_tokens_per_layer == [n_vis] * layer + [budget] * (4 - layer)
    ref, gref = stage_d_reference(model, family, inp, layer, keep[None], GEN["max_new_tokens"])
    torch.testing.assert_close(last_logits(logits), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen[:, inp["input_ids"].shape[1]:], gref)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_padding_equals_each_alone(family):
    assert_batch_equals_alone(family, "dart", attn="sdpa", first=1, **SPEC)


def test_reduction_ratio_and_exact_budget():
    model, inp = batch("llava", n=2)
    with vtprune.patch(model, "dart", reduction_ratio=0.5, pivot_image=2, pivot_text=2) as h, torch.no_grad():
        model(**inp)
    assert [s.visual_tokens_per_layer[-1] for s in h.stats.schedules] == [2 + 4 * 2] * 2  # int(16 * 0.5 / 4) = 2
    with vtprune.patch(model, "dart", keep=9, budget_rule="exact") as h, torch.no_grad():
        model(**inp)
    assert [s.visual_tokens_per_layer[-1] for s in h.stats.schedules] == [9, 9]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_keeping_every_token_equals_the_unpatched_model(family):
    model, inp = batch(family, n=2)
    with torch.no_grad():
        ref = model(**inp).logits
        gref = model.generate(**inp, **GEN)
        with vtprune.patch(model, "dart", keep=1.0, budget_rule="exact") as h:
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
    assert all(s.visual_tokens_per_layer[0] == s.visual_tokens_per_layer[-1] for s in h.stats.schedules)
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


def test_similarity_on_raw_hidden_states_is_an_option():
    model, inp = batch("llava", n=1, first=1)
    keep = reference_keep(model, inp, **{k: v for k, v in SPEC.items() if k != "layer"})
    with vtprune.patch(model, "dart", **SPEC, similarity="hidden") as h, torch.no_grad():
        model(**inp)
    assert h.stats.llm_kept_index[0].numel() == int(keep.sum())


@pytest.mark.parametrize(
    "params,match",
    [
        ({"layer": 4}, "layer=4 must be in 1..3"),
        ({"layer": 0}, "layer=0 must be in 1..3"),
        ({"pivot_image": -1}, "pivot_image=-1"),
        ({"pivot_image": 0, "pivot_text": 0}, "at least 1"),
        ({"pivot_order": "random"}, "pivot_order='random'"),
        ({"budget_rule": "round"}, "budget_rule='round'"),
        ({"similarity": "keys"}, "similarity='keys'"),
        ({"reduction_ratio": 1.0}, r"reduction_ratio=1.0 must lie in \[0, 1\)"),
        ({"keep": 1.5}, "keep=1.5"),
    ],
)
def test_bad_settings_raise(params, match):
    model, _ = batch("llava", n=1)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "dart", **params)
    assert not hasattr(model, "_vtprune_patch")


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_hybrid_needs_a_full_attention_layer_at_or_before_k_minus_1(family):
    """Tiny Qwen3.5 layers: [linear, full, linear, full]. K=3 reads layer 1's keys (as K=2 does); K=1 would
    read layer 0's, a Gated DeltaNet layer with no full-attention layer before it: refused, naming K >= 2."""
    model, inp = batch(family, n=1, first=1)
    with pytest.raises(ValueError, match=r"dart: the key norms of layer K-1 = 0 .*\(the first is 1\): use layer >= 2"):
        vtprune.patch(model, "dart", layer=1)
    assert not hasattr(model, "_vtprune_patch")
    key_l1 = {}
    for k in (2, 3):
        pol = D.DART(layer=k, keep=0.5, pivot_image=2, pivot_text=2)
        seen = recorded_views(pol)
        with vtprune.patch(model, pol), torch.no_grad():
            model(**inp)
        key_l1[k] = seen[0][1].signals[f"key_l1@{k - 1}"]
    torch.testing.assert_close(key_l1[3], key_l1[2])
