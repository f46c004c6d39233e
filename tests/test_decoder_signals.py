"""Decoder signal kinds ``key_l1`` and ``final_norm`` (``vtprune/signals.py``) against the unpatched model's
own tensors.

A recording stage-D policy requests the kinds and keeps every token (it selects all visual
positions), so the patched run equals the unpatched one and the signals can be compared with what
the unpatched model computes: its KV cache (``key_l1``: L1 norm of the cached keys of the layer) and
the input its layer receives (``final_norm``: through the final norm; on Qwen3-VL that input
includes the DeepStack level added after the previous layer), per sample alone, for
a left-padded batch, at ``forward`` and at ``generate``'s prefill.
"""
from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.signals import DECODER_SIGNALS
from vtprune.testing import FAMILIES

from helpers import SignalRecorder, batch, layer_inputs


def _unpatched(model, inp, layer):
    """L1 norms of the keys the unpatched model caches in layer ``layer - 1`` and the input decoder layer
    ``layer`` receives (on Qwen3-VL with the DeepStack level added after layer ``layer - 1``), final-normed."""
    inputs, out = layer_inputs(model, inp, [layer], use_cache=True)
    keys = out.past_key_values.layers[layer - 1].keys[0].float()  # (Hkv, L, hd)
    key_l1 = keys.permute(1, 0, 2).reshape(keys.shape[1], -1).abs().sum(-1)
    final = model.model.language_model.norm(inputs[layer])[0]
    return key_l1, final


def test_registry_declares_the_kinds():
    assert DECODER_SIGNALS["key_l1"].aligned and not DECODER_SIGNALS["final_norm"].aligned
    assert DECODER_SIGNALS["policy_rows"].after_prune and DECODER_SIGNALS["policy_rows"].per_policy
    assert DECODER_SIGNALS["hidden_reduce"].per_policy and not DECODER_SIGNALS["hidden_reduce"].after_prune


@pytest.mark.parametrize("family", FAMILIES)
def test_key_l1_and_final_norm_equal_the_unpatched_cache_and_states(family):
    model, inp = batch(family, 2)
    assert (inp["attention_mask"] == 0).any()
    rec = SignalRecorder(kinds={1: "key_l1", 2: "final_norm"})
    with vtprune.patch(model, rec), torch.no_grad():
        model(**inp)
        model.generate(**inp, max_new_tokens=2, do_sample=False)
    assert len(rec.seen) == 4  # 2 samples x (forward, generate's prefill)
    for call in range(2):
        for i in range(2):
            _, one = batch(family, 1, first=i)
            key_l1, final = _unpatched(model, one, 2)
            got = rec.seen[2 * call + i]
            torch.testing.assert_close(got["key_l1@1"], key_l1, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["final_norm@2"], final, rtol=1e-5, atol=1e-5)
