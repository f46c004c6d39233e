"""A pruning layer's key projection computed once across its own cut (``vtprune/reuse.py``).

Serving the kept rows of the projection a signal computed before the cut must change nothing: every
stage-D method on every family gives bitwise the same logits and generated tokens with and without
it, and leaves no served forward behind.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vtprune.rows import take_rows
from vtprune.reuse import MIN_ROWS, ProjectionCapture, ServedProjection, rows_bitwise_equal
from vtprune.policy import DecoderPolicy
from vtprune.registry import registered

from helpers import batch, patched_run
from test_conformance import SUPPORTED, spec

STAGE_D = [(m, f) for m, f in SUPPORTED if issubclass(registered()[m], DecoderPolicy)]


def served_left(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in vars(m)]


@pytest.mark.parametrize("method,family", STAGE_D)
def test_serving_the_kept_key_rows_changes_nothing(method, family):
    model, inp = batch(family, 2)
    logits, new, stats, _ = patched_run(model, inp, spec(method, family))
    logits_off, new_off, stats_off, _ = patched_run(model, inp, spec(method, family), reuse_projections=False)
    assert torch.equal(logits, logits_off)
    assert torch.equal(new, new_off)
    assert stats_off.reused_key_rows == 0
    assert served_left(model) == []


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next"])
def test_transprune_pruning_layers_are_served_every_kept_row(family):
    """TransPrune's instruction rows project the uncut sequence at each pruning layer; the layer is
    then served every real row it keeps (padding rows are projected by the module)."""
    model, inp = batch(family, 2)
    _, _, stats, policies = patched_run(model, inp, spec("transprune", family), generate=False)
    n_layers = len(stats.schedules[0].llm_tokens_per_layer)
    want = sum(s.llm_tokens_per_layer[l] for s in stats.schedules for l in policies[0].pruning_layers(n_layers))
    assert stats.reused_key_rows == want > 0


def test_served_projection_serves_equal_rows_once_and_projects_the_rest():
    g = torch.Generator().manual_seed(0)
    proj = nn.Linear(8, 6)
    x = torch.randn(2, 7, 8, generator=g)
    with ProjectionCapture(proj, (2, 7)) as cap:
        proj(x[:, :3])  # another length: not recorded
        full = proj(x)
    assert cap.outputs is full
    rows = torch.tensor([[0, 2, 3, 6], [1, 4, 5, 6]])
    usable = torch.tensor([[True, True, True, True], [False, True, True, True]])
    served = ServedProjection(proj, take_rows(cap.inputs, rows, 1), take_rows(cap.outputs, rows, 1), usable).install()
    cut = take_rows(x, rows, 1).clone()
    cut[1, 2] += 1.0  # a changed row (a recycled token) is projected by the module
    sentinel = torch.full((2, 4, 6), 7.0)
    served.outputs = torch.where(usable[..., None], take_rows(full, rows, 1), sentinel)  # shows which rows were served
    out = proj(cut)
    assert served.served_rows == 6
    torch.testing.assert_close(out, nn.functional.linear(cut, proj.weight, proj.bias))
    assert "forward" not in vars(proj)  # one call only
    torch.testing.assert_close(proj(cut), out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("width", [1, 3, 6, 2048])
def test_rows_bitwise_equal_compares_bits_of_every_element(dtype, width):
    """The serving check: a row differing in any one element (any position of the widest integer the
    row is compared in) is caught, on contiguous, strided and offset rows; bits decide, not values."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3, 4, width + 1, generator=g).to(dtype)
    for x in (base[..., :width].contiguous(), base[..., 1:], torch.randn(3, 4, 2 * width, generator=g).to(dtype)[..., ::2]):
        y = x.clone()
        assert torch.equal(rows_bitwise_equal(x, y), torch.ones(3, 4, dtype=torch.bool))
        same_size_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        for col in {0, width // 2, width - 1}:
            for bit in (1, 1 << (8 * x.element_size() - 2)):  # the lowest mantissa bit, the top exponent bit
                z = y.clone()
                z.view(same_size_int)[1, 2, col] ^= bit
                expect = torch.ones(3, 4, dtype=torch.bool)
                expect[1, 2] = False
                assert torch.equal(rows_bitwise_equal(x, z), expect), (col, bit, x.stride())
    zero = torch.zeros(1, 2, width, dtype=dtype)
    neg = zero.clone()
    neg[0, 1, -1] = -0.0
    assert rows_bitwise_equal(zero, neg).tolist() == [[True, False]]  # +0 and -0 differ in their bits
    nan = torch.full((1, 1, width), float("nan"), dtype=dtype)
    assert rows_bitwise_equal(nan, nan.clone()).all()  # the same bits: the same projection
    with pytest.raises(ValueError, match="differ"):
        rows_bitwise_equal(zero, zero.float() if dtype != torch.float32 else zero.double())


def test_served_projection_falls_back_and_keeps_an_instance_forward():
    proj = nn.Linear(4, 4)
    calls = []

    def own(x):  # e.g. an accelerate device hook installed as an instance attribute
        calls.append(x.shape)
        return nn.Linear.forward(proj, x)

    proj.forward = own
    x = torch.randn(1, 5, 4)
    served = ServedProjection(proj, x, torch.zeros(1, 5, 4), torch.ones(1, 5, dtype=torch.bool)).install()
    out = proj(torch.randn(1, 3, 4))  # another shape: the module's own forward
    assert served.served_rows == 0 and calls == [(1, 3, 4)] and out.shape == (1, 3, 4)
    assert vars(proj)["forward"] is own
    ServedProjection(proj, x, torch.zeros(1, 5, 4), torch.ones(1, 5, dtype=torch.bool)).install().remove()
    assert vars(proj)["forward"] is own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 2048])
def test_a_rows_projection_does_not_depend_on_the_other_rows(dtype, width):
    """What serving relies on: a Linear's output row is the same whether computed among all rows or
    among the kept ones, from 4 rows on (fp32 takes another kernel for 1-3 rows; the decoder serves
    calls of MIN_ROWS or more)."""
    assert MIN_ROWS >= 4
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(width, width, bias=False).to(dtype)
    x = torch.randn(1, 300, width, generator=g).to(dtype)
    with torch.no_grad():
        full = lin(x)
        for m in (299, 150, 17, 4):
            rows = torch.sort(torch.randperm(300, generator=g)[:m]).values
            assert torch.equal(lin(x[:, rows]), full[:, rows]), m
