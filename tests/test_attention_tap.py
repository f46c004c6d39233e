"""Attention taps (``vtprune/adapters/tap.py``): decoder attention rows taken from the layer's own q/k
equal the rows recomputed from the layer input; the tap changes no output and ``remove()`` undoes it.

A recording stage-D policy reads ``last_row`` and ``post_visual_rows`` at layer 1 (no prune there: the
tap computes them) and ``policy_rows``-free layers 2; it keeps every token, so the patched run equals
the unpatched one. The same request with the tap disabled (the adapter hands out no tap) gives the
recomputed values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.adapters.tap import TAP_NAME
from vtprune.testing import FAMILIES, HYBRID_FAMILIES

from helpers import ATOL, SignalRecorder, batch, no_vtprune_hooks
from oracles import last_logits


def _run(model, inp, kinds, *, tap: bool):
    rec = SignalRecorder(kinds=kinds)
    h = vtprune.patch(model, rec)
    try:
        if not tap:
            h._decoder.remove()
            h._decoder.adapter.tap_llm_attention = lambda layer, cb: None
            h._decoder.install()
        tapped = set(h._decoder.tapped)
        with torch.no_grad():
            logits = model(**inp).logits
        stats = h.stats
    finally:
        h.remove()
    return rec.seen[0], tapped, stats, last_logits(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_tapped_rows_equal_recomputed_rows(family):
    model, inp = batch(family, 2)
    layer = 1 if family not in HYBRID_FAMILIES else 3  # Qwen3.5: layer 3 is full attention
    kinds = {layer: ("last_row", "post_visual_rows")}
    got, tapped, stats, logits = _run(model, inp, kinds, tap=True)
    ref, none, _, ref_logits = _run(model, inp, kinds, tap=False)
    assert tapped == {layer} and none == set()
    assert stats.tap_ms > 0
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **ATOL)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)  # the tap leaves the attention alone


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_tap_is_removed_and_leaves_the_model_as_before(family):
    model, inp = batch(family, 2)
    with torch.no_grad():
        before = last_logits(model(**inp).logits)
    attn = model.model.language_model.layers[1].self_attn
    cfg = attn.config
    with vtprune.patch(model, "fastv:layer=2,keep=4"):
        assert attn.config is not cfg and attn.config._attn_implementation == TAP_NAME
        assert model.config.text_config._attn_implementation == cfg._attn_implementation  # masks untouched
    assert attn.config is cfg and not hasattr(attn, "_vtprune_tap") and no_vtprune_hooks(model)
    with torch.no_grad():
        torch.testing.assert_close(last_logits(model(**inp).logits), before, rtol=0, atol=0)


def test_pruning_layer_rows_are_not_deferred():
    """Rows read before a prune at the same layer are computed from the layer input (the layer's own
    attention then runs on the shortened sequence)."""

    @dataclass
    class SameLayer(SignalRecorder):
        name: ClassVar[str] = "same_layer_recorder"

    model, inp = batch("llava", 2)
    rec = SameLayer(layer=2, kinds={2: "last_row"})
    with vtprune.patch(model, rec) as h:
        assert h._decoder.tapped == {2}
        with torch.no_grad():
            model(**inp)
        assert h.stats.tap_ms == 0.0
    assert "last_row@2" in rec.seen[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_received_from_lse_equals_the_softmax_path(dtype):
    """The received attention from the rows' logsumexp (what the flash kernel returns) equals the
    materialised-softmax path and ranks the keys the same (CLIP-L/336 layout, 16 heads x 577 tokens)."""
    from vtprune.adapters.tap import _flash_with_lse
    from vtprune.attention import attention_probs, received_attention, received_from_lse

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 577, 64, generator=g).to(dtype) for _ in range(3))

    class Attn(torch.nn.Module):
        is_causal = False

    got = _flash_with_lse(Attn().eval(), q, k, v, None, {"scaling": 0.125, "dropout": 0.0})
    assert got is not None
    out, lse = got
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.125).transpose(1, 2)
    assert torch.equal(out, sdpa)  # the very kernel SDPA dispatches to
    for red in ("mean", "sum"):
        ref = received_attention(attention_probs(q, k, 0.125), red)
        new = received_from_lse(q, k, 0.125, lse, red)
        torch.testing.assert_close(new, ref, rtol=2e-5, atol=1e-7)
        assert torch.equal(torch.argsort(new, dim=-1, descending=True, stable=True)[:, :192].sort(-1).values,
                           torch.argsort(ref, dim=-1, descending=True, stable=True)[:, :192].sort(-1).values)


def test_vit_signals_use_the_tapped_kernel_normalisers():
    """LLaVA's CLIP tower under SDPA: the tap returns the flash kernel's lse to ``vit_received``, the
    tower output is unchanged, and the tap is gone after the request."""
    from vtprune.adapters.llava import LlavaAdapter
    from vtprune.adapters.tap import TAP_NAME

    model, inp = batch("llava", 2)
    seen = {}
    ad = LlavaAdapter(model)
    orig = ad._view_signals

    def spy(signals, got):
        seen.update(got)
        return orig(signals, got)

    ad._view_signals = spy
    attn = ad.vit_layers()[0].self_attn
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=inp["pixel_values"], return_dict=True).pooler_output
        run = ad.run_vision(dict(inp), {"vit_received@0": None}, [], None)
    assert seen[("lse", 0)] is not None and seen[("q", 0)].dim() == 4
    assert attn.config._attn_implementation != TAP_NAME and not hasattr(attn, "_vtprune_tap")
    for a, b in zip(run.features, ref):
        assert torch.equal(a, b)
