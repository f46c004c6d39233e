"""Stage D builds one attention mask per model forward for the layers that see the same keys."""
import pytest
import torch

import vtprune

from helpers import batch

CUTS = (1, 3)  # 0-based layers that start with a cut: layers 1 and 2 share their keys, layer 3 has its own
SPEC = "transprune:prune_layers=1|3,keep_ratios=0.75|0.5"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_5"])
def test_one_mask_per_forward_per_key_set_and_mixer_type(family, monkeypatch):
    model, inp = batch(family, 2)
    built = []
    with vtprune.patch(model, SPEC) as h:
        ad = h.adapter
        orig = ad.layer_attention_mask

        def counting(layer, key_mask, q, dtype):
            built.append((layer, q))
            return orig(layer, key_mask, q, dtype)

        monkeypatch.setattr(ad, "layer_attention_mask", counting)
        n_layers = len(ad.llm_layers())
        groups = {(sum(c <= l for c in CUTS), type(ad.token_mixer(l))) for l in range(CUTS[0], n_layers)}
        with torch.no_grad():
            out = model.generate(**inp, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inp["input_ids"].shape[1] + 3
    prefill = [b for b in built if b[1] > 1]
    decode = [b for b in built if b[1] == 1]
    assert len(prefill) == len(groups)  # the prefill: once per key set and mixer type, no discarded build
    assert len(decode) == 2 * len(groups)  # two decode forwards (the first token comes from the prefill)
    assert len(groups) < n_layers - CUTS[0] or family == "qwen3_5"  # layers do share masks here
