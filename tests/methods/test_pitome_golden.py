"""PiToMe against the authors' code: golden fixtures from github.com/hchautran/PiToMe @ 550b5de.

``tests/fixtures/pitome/cases.pt`` holds seeded tokens and what the reference produced (provenance in
that folder's README):

* ``single`` cases: one merge step of ``pitome_vision`` (BSM or PiToMe, with or without a class token)
  applied with ``merge_mean``, ``merge_wavg`` and ``merge_source``;
* ``chain`` cases: the reference LLaVA encoder loop ``PiToMeCLIPEncoder.forward`` (BSM in layers 0-12,
  PiToMe after, margins ``0.9 - 0.9*l/24``) over 24 stub layers ``x -> x + tanh(x @ W_l)``; stored are
  the tokens entering the last layer (what LLaVA feeds the projector, CLS included) and the final
  source membership.

Merged tensors are compared to 1e-6 in float64, token order and membership exactly. The reference's
``argsort`` is unstable and vtprune's stable; the inputs have no exact ties in energy or similarity.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vtprune.methods.pitome import (
    PiToMe,
    bsm_merge,
    init_sources,
    merge_count,
    pitome_merge,
    reference_schedule,
)
from vtprune.policy import Context, ViTInfo

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pitome" / "cases.pt"
DATA = torch.load(FIXTURE, weights_only=True)
SINGLE = [(c, r) for c in DATA["cases"] if c["kind"] == "single" for r in c["runs"]]
CHAIN = [c for c in DATA["cases"] if c["kind"] == "chain"]
F64 = torch.float64


def test_fixture_provenance():
    assert DATA["reference_commit"].startswith("550b5de")
    assert len(SINGLE) == 12 and len(CHAIN) == 2


def _owner(sources: torch.Tensor) -> torch.Tensor:
    """(B, N, T0) 0/1 membership -> (B, T0) output token of every original token."""
    assert bool((sources.sum(dim=1) == 1).all())
    return sources.argmax(dim=1)


def _step(x, r, run, cls, mode, sources=None, sizes=None):
    if run["use_bsm"]:
        return bsm_merge(x, x, r, class_token=cls, mode=mode, sources=sources, sizes=sizes)
    return pitome_merge(x, x, r, run["margin"], class_token=cls, mode=mode, sources=sources, sizes=sizes)


@pytest.mark.parametrize("case,run", SINGLE, ids=[f"{c['name']}-{r['ratio']}-{'bsm' if r['use_bsm'] else 'pitome'}"
                                                  for c, r in SINGLE])
def test_single_step_matches_reference(case, run):
    x = case["x"].to(F64)
    cls = case["class_token"]
    B, T, _ = x.shape
    # r = floor(T - T*rho): T counts the CLS token for BSM and excludes it for PiToMe (reference)
    r = merge_count(T if (run["use_bsm"] or not cls) else T - 1, run["ratio"])
    res = _step(x, r, run, cls, "mean", sources=init_sources(B, T, F64))
    assert res.x.shape == run["mean"].shape
    torch.testing.assert_close(res.x, run["mean"], rtol=0, atol=1e-6)
    assert _owner(res.sources).tolist() == run["owner"].long().tolist()
    if "wavg" in run:
        w = _step(x, r, run, cls, "wavg")
        torch.testing.assert_close(w.x, run["wavg"], rtol=0, atol=1e-6)
        torch.testing.assert_close(w.sizes.to(F64), run["size"], rtol=0, atol=0)


def _layer(W):
    return lambda h: h + torch.tanh(h @ W.to(F64))


@pytest.mark.parametrize("case", CHAIN, ids=[c["name"] for c in CHAIN])
def test_encoder_chain_matches_reference(case):
    """vtprune's reference schedule and kernels over the same 23 layers (0..22, LLaVA feature layer)."""
    plan = reference_schedule(case["ratio"], 577, 24, 22)
    x = case["x"].to(F64)
    src = init_sources(1, 577, F64)
    for l, step in enumerate(plan):
        x = _layer(case["W"][l])(x)
        assert step.algorithm == ("bsm" if l <= 12 else "pitome")
        if step.algorithm == "bsm":
            res = bsm_merge(x, x, step.r, class_token=True, sources=src)
        else:
            assert step.margin == pytest.approx(0.9 - 0.9 * l / 24, abs=0)
            res = pitome_merge(x, x, step.r, step.margin, class_token=True, sources=src)
        x, src = res.x, res.sources
    torch.testing.assert_close(x, case["features"], rtol=0, atol=1e-6)
    assert _owner(src).tolist() == case["owner"].long().tolist()


@pytest.mark.parametrize("case", CHAIN, ids=[c["name"] for c in CHAIN])
def test_policy_after_layer_matches_reference(case):
    """Through the registered stage-V policy, driven as the LLaVA adapter drives it (``after_layer``
    after each of layers 0..22 of a 24-layer CLIP; ``order="reference"`` keeps the kernel order)."""
    pol = PiToMe(ratio=case["ratio"])
    assert pol.layers(24) == list(range(24)) and pol.sorted_output is False
    ctx = Context("llava", vit=ViTInfo(layers=24, last_layer=22, tokens=577, drop_cls=True))
    x = case["x"].to(F64)
    rep = torch.arange(577)[None]
    for l in range(23):
        x = _layer(case["W"][l])(x)
        res = pol.after_layer(l, x, ctx)
        if res is not None:
            x, s = res
            rep = torch.gather(rep, 1, s)
    torch.testing.assert_close(x, case["features"], rtol=0, atol=1e-6)
    # each output token's representative is the smallest original token it contains
    owner = case["owner"].long()[0]
    first = [int(torch.nonzero(owner == j).min()) for j in range(x.shape[1])]
    assert rep[0].tolist() == first
