"""The declared seams: spec parsing and types, the stage knob, the signal registries, per-request state,
int budgets on dynamic-resolution images, and generate() with and without the KV cache (stage D)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune import registry
from vtprune.methods.fastv import FastV
from vtprune.policy import Context, DecoderPolicy, TokenPolicy
from vtprune.signals import DECODER_SIGNALS, register_decoder_signal

from helpers import batch, image_tokens, no_vtprune_hooks, patched_run


def _unpatched(model) -> bool:
    return getattr(model, "_vtprune_patch", None) is None and no_vtprune_hooks(model)


# ------------------------------------------------------------------ spec values and names
@pytest.mark.parametrize(
    "spec,match",
    [
        ("fastv:layer=two", r"fastv: layer='two' must be an int"),
        ("hiprune:keep=abc", r"hiprune: keep='abc' must be an int or a float \(or None\)"),
        ("pitome:prop_attn=3", r"pitome: prop_attn=3 must be a bool"),
        ("visionzip:dominant=1.5,contextual=2", r"visionzip: dominant=1.5 must be an int \(or None\)"),
        ("transprune:prune_layers=1|x|3", r"transprune: prune_layers=\(1, 'x', 3\) must be a list of ints"),
        ("pitome:stage=P", r"pitome: the parameter stage= is now called at="),
    ],
)
def test_wrongly_typed_or_renamed_values_name_the_parameter(spec, match):
    model, _ = batch("llava", 1)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, spec)
    assert _unpatched(model)


def test_values_the_methods_parse_themselves_still_pass():
    assert registry.build("transprune", {"prune_layers": "7/9/12"}).prune_layers == (7, 9, 12)
    assert registry.build("transprune", {"prune_layers": 7, "keep_ratios": 0.5}).prune_layers == (7,)
    assert registry.build("todre", {"tau": 1}).tau == 1  # an int is a valid float


@pytest.mark.parametrize("spec", ["random:at=V,keep=4,layer=0", "random:at=D,layer=1,keep=0.5", "random:keep=3",
                                  "pitome:at=P,keep=4", "pitome:ratio=0.8", "todre:keep=0.5"])
def test_spec_strings_read_back_as_the_same_policies(spec):
    (name, params), = registry.parse_spec(spec)
    parts = registry.build(name, params).parts()
    again = []
    for p in parts:
        (n2, p2), = registry.parse_spec(p.spec())
        again.extend(registry.build(n2, p2).parts())
    assert [(type(p), p.params()) for p in again] == [(type(p), p.params()) for p in parts]
    assert all(p.stage == q.stage for p, q in zip(parts, again))


# ------------------------------------------------------------------ int budgets vs dynamic resolution
@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
@pytest.mark.parametrize("method", ["random", "hiprune", "todre"])
def test_int_budget_above_an_images_tokens_keeps_them_all(family, method):
    """Dynamic-resolution images smaller than an int budget keep every token (recorded per image)."""
    model, inp = batch(family, 2)
    cands = [img.num_candidates for img in image_tokens(model, inp)]
    keep = sorted(cands)[0] + 1  # above the smaller image's candidates, below the larger's
    assert keep < max(cands)
    extra = ",relevance=off" if method == "todre" else ""
    logits, _, stats, _ = patched_run(model, inp, f"{method}:keep={keep}{extra}", generate=False)
    newlines = [n_in - c for n_in, c in zip(stats.visual_tokens_in_per_image, cands)]
    assert stats.budget_clamped == [c < keep for c in cands]
    if method != "hiprune" or family != "llava_next":  # HiPrune on NeXT: floor(K/V) per view
        assert stats.visual_tokens_per_image == [min(keep, c) + nl for c, nl in zip(cands, newlines)]
    small = cands.index(min(cands))
    assert stats.visual_tokens_per_image[small] == stats.visual_tokens_in_per_image[small]  # all of it


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_clamped_budget_equals_keep_all(family):
    model, inp = batch(family, 2)
    ref, gref, _, _ = patched_run(model, inp, "none")
    for spec in ("random:keep=100000", "pool:keep=100000", "fastv:layer=2,keep=100000"):
        logits, gen, stats, _ = patched_run(model, inp, spec)
        torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(gen, gref)
        if spec.startswith("fastv"):
            assert stats.decoder_budget_clamped == [True, True] and stats.budget_clamped == [False, False]
        else:
            assert stats.budget_clamped == [True, True] and stats.decoder_budget_clamped == [False, False]


@pytest.mark.parametrize("spec", ["random:keep=17", "fastv:keep=17", "random:at=V,keep=17", "hiprune:keep=17"])
def test_int_budget_above_a_fixed_resolution_model_still_raises_at_patch(spec):
    model, _ = batch("llava", 1)
    with pytest.raises(ValueError, match="larger than the 16 visual tokens"):
        vtprune.patch(model, spec)
    assert _unpatched(model)


# ------------------------------------------------------------------ signal registries
@dataclass
class _AskForSignal(DecoderPolicy):
    name: ClassVar[str] = "test-ask"
    kind: str = "last_row"
    seen: ClassVar[list] = []

    def signal_layers(self, num_layers: int) -> dict[int, str]:
        return {self.layer - 1: self.kind}

    def select(self, layer, view, ctx):
        _AskForSignal.seen.append(view.signals[f"{self.kind}@{self.layer - 1}"])
        return torch.nonzero(view.visual).flatten()[: self.budget_view(view, layer)]


def test_unknown_decoder_signal_is_refused_at_patch():
    model, _ = batch("llava", 1)
    with pytest.raises(ValueError, match="unknown decoder signal 'nope'; registered kinds: .*last_row"):
        vtprune.patch(model, _AskForSignal(kind="nope"))
    assert _unpatched(model)


def test_a_new_decoder_signal_is_one_registered_function():
    @register_decoder_signal("test_is_text")
    def _is_text(inp):
        return (inp.key_mask & ~inp.visual).float()

    try:
        model, inp = batch("llava", 2)
        _AskForSignal.seen.clear()
        with vtprune.patch(model, _AskForSignal(kind="test_is_text", layer=2, keep=4)), torch.no_grad():
            model(**inp)
        assert len(_AskForSignal.seen) == 2
        for sig in _AskForSignal.seen:  # the view's own tokens: 16 visual (0) + the sample's text (1)
            assert sig.dim() == 1 and int((sig == 0).sum()) == 16 and bool(((sig == 0) | (sig == 1)).all())
    finally:
        DECODER_SIGNALS.pop("test_is_text")


def test_unknown_vision_signal_is_a_clear_error():
    @dataclass
    class _AskVit(TokenPolicy):
        name: ClassVar[str] = "test-vit"

        def required_signals(self, adapter):
            return {"vit_nope@0": None}

        def select(self, image, n_keep, ctx):
            return image.candidate_index()[:n_keep]

    for family in ("llava", "qwen2_vl"):
        model, inp = batch(family, 1)
        with vtprune.patch(model, _AskVit(keep=1.0)), torch.no_grad():
            with pytest.raises(ValueError, match="unknown .*vision signal 'vit_nope@0'"):
                model(**inp)


# ------------------------------------------------------------------ per-request state
def test_policy_state_is_per_request_and_per_policy():
    a, b = FastV(), FastV()
    ctx1, ctx2 = Context("llava"), Context("llava")
    s1 = ctx1.policy_state(a, dict)
    assert ctx1.policy_state(a, dict) is s1  # the same object within a request
    assert ctx1.policy_state(b, dict) is not s1  # equal policies, distinct state
    assert ctx2.policy_state(a, dict) is not s1  # a new request starts afresh


# ------------------------------------------------------------------ generate with / without cache
@dataclass
class _CountingFastV(FastV):
    calls: ClassVar[list] = []

    def select(self, layer, view, ctx):
        _CountingFastV.calls.append(int(view.visual.sum()))
        return super().select(layer, view, ctx)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fastv_generate_selects_once_with_cache_and_every_step_without(family):
    """Cached generate(): one selection per sample at prefill. use_cache=False: every step re-runs the
    whole sequence, so every step selects again (as the reference fork without cache)."""
    model, inp = batch(family, 2)
    n_new = 4
    outs = {}
    for use_cache in (True, False):
        _CountingFastV.calls.clear()
        with vtprune.patch(model, _CountingFastV(layer=2, keep=0.5)), torch.no_grad():
            outs[use_cache] = model.generate(**inp, max_new_tokens=n_new, do_sample=False, use_cache=use_cache)
        assert len(_CountingFastV.calls) == 2 * (1 if use_cache else n_new)
    for out in outs.values():
        assert out.shape == (2, inp["input_ids"].shape[1] + n_new)
    # the first new token comes from the same prefill selection on both paths
    assert torch.equal(outs[True][:, inp["input_ids"].shape[1]], outs[False][:, inp["input_ids"].shape[1]])
