"""PyramidDrop kernels (hand-worked) and the end-to-end golden fixtures made with the authors' own
``pdrop_forward`` (tests/fixtures/pyramiddrop/README.md)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.methods import pyramiddrop as PD

from _golden_models import golden_inputs, mha_llava

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pyramiddrop"


def test_stage_counts_floor_relative_to_the_original_count():
    assert PD.stage_counts(576, (0.5, 0.25, 0.125)) == (576, 288, 144, 72)
    assert PD.stage_counts(16, (0.75, 0.5625)) == (16, 12, 9)
    assert PD.stage_counts(10, (0.33,)) == (10, 3)  # int(3.3)


def test_lambda_schedule():
    assert PD.lambda_ratios(0.5, 3) == (0.5, 0.25, 0.125)
    assert PD.PyramidDrop(layer_list=(1, 2), lam=0.75).ratios == (0.75, 0.5625)


def test_rank_drop_top_scores_in_sequence_order_ties_lowest():
    assert PD.rank_drop(torch.tensor([0.1, 0.4, 0.3, 0.4, 0.0]), 2).tolist() == [1, 3]
    assert PD.rank_drop(torch.tensor([0.2, 0.2, 0.2]), 2).tolist() == [0, 1]
    assert PD.rank_drop(torch.tensor([0.5, 0.1, 0.9, 0.3]), 3).tolist() == [0, 2, 3]


def test_decode_shifts():
    # 576 -> 288 -> 144 -> 72 after 1-based layers 8, 16, 24 (= before 0-based 8, 16, 24)
    shifts = PD.decode_shifts(576, (0.5, 0.25, 0.125), (8, 16, 24), 32)
    assert shifts == (0,) * 8 + (288,) * 8 + (432,) * 8 + (504,) * 8


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
