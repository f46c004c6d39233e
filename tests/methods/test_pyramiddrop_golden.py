"""PyramidDrop golden fixtures: the authors' own ``pdrop_forward`` end to end (tests/fixtures/pyramiddrop/README.md)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.methods import pyramiddrop as PD

from _golden_models import golden_inputs, mha_llava

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pyramiddrop"


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.pt")), ids=lambda p: p.stem)
def test_golden_reference_end_to_end(path):
    """The patched tiny LLaVA (float64) == the authors' pdrop_forward on the same LLM input: kept tokens
    after every stage, prefill logits and 3 cached greedy decode steps (renumbered positions and the
    reference's per-stage decode position shifts)."""
    f = torch.load(path, weights_only=True)
    model, proc = mha_llava()
    inp = golden_inputs(proc, f["case"])
    assert torch.equal(inp["input_ids"][0], f["input_ids"])
    got = {}
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, k: got.update(k), with_kwargs=True)
    with torch.no_grad():
        model(**inp)
    hook.remove()
    torch.testing.assert_close(got["inputs_embeds"][0], f["inputs_embeds"], rtol=0, atol=1e-12)
    layers = tuple(f["layer_list"].tolist())
    pol = PD.PyramidDrop(layer_list=layers, ratios=tuple(f["ratios"].tolist()))
    kept = []
    select = pol.select
    pol.select = lambda layer, view, ctx: kept.append((view, s := select(layer, view, ctx))) or s
    n = f["logits"].shape[0]
    with vtprune.patch(model, pol), torch.no_grad():
        out = model.generate(**inp, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    L = inp["input_ids"].shape[1]
    for (view, sel), want in zip(kept[: len(layers)], f["kept_per_stage"]):
        alive = view.original_index.clone()
        keep = ~view.visual
        keep[sel] = True
        assert alive[keep].tolist() == want.tolist()
    logits = torch.stack([lg[0] for lg in out.logits])
    torch.testing.assert_close(logits.double(), f["logits"], rtol=0, atol=1e-6)  # generate returns fp32 logits
    assert out.sequences[0, L:L + n - 1].tolist() == f["tokens"].tolist()
