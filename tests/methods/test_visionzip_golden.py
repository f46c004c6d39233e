"""VisionZip against the authors' code: golden fixtures from github.com/dvlab-research/VisionZip @ 3151f6d.

``tests/fixtures/visionzip/cases.pt`` holds seeded inputs (feature-layer hidden states with the CLS
token, the CLS attention row per head, per-head keys) and what the reference tower forward returned:
the ``d + c`` output tokens and ``all_indices`` (provenance in that folder's README).

Compared: the dominant set (exact; the reference returns it in score order, vtprune in ascending
order, the order in which both emit the dominant tokens) and every output token to 1e-6 in float64,
through the kernel :func:`visionzip_tokens` and through the registered policy. Ties in the dominant
top-k that cross the cut are not covered (the reference's ``topk`` order is unspecified; vtprune takes
the lowest index); ties that stay inside the dominant set and exact ties in the contextual assignment
(first target on both sides) are.
"""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from vtprune.methods.visionzip import VisionZip, contextual_assign, visionzip_tokens
from vtprune.policy import Context, ImageTokens

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "visionzip" / "cases.pt"
DATA = torch.load(FIXTURE, weights_only=True)
RUNS = [(c, r) for c in DATA["cases"] for r in c["runs"]]
IDS = [f"{c['name']}-d{r['dominant']}-c{r['contextual']}" for c, r in RUNS]
F64 = torch.float64


def test_fixture_provenance():
    assert DATA["reference_commit"].startswith("3151f6d")
    assert len(RUNS) == 11


@pytest.mark.parametrize("case,run", RUNS, ids=IDS)
def test_kernel_matches_reference(case, run):
    d, c = run["dominant"], run["contextual"]
    for v in range(case["hidden"].shape[0]):
        tokens, dom = visionzip_tokens(case["hidden"][v].to(F64), case["cls_row"][v].to(F64),
                                       case["keys"][v].to(F64), d, c)
        assert dom.tolist() == sorted(run["all_indices"][v].tolist())
        assert run["all_indices"][v, 0] == 0  # the CLS token is always dominant
        assert tokens.dtype == F64 and tokens.shape == run["tokens"][v].shape
        torch.testing.assert_close(tokens, run["tokens"][v], rtol=0, atol=1e-6)


def test_assignment_ties_go_to_the_first_target():
    """Two targets with identical keys and a source identical to both: the reference's ``argmax``
    and vtprune both pick the first target."""
    case = next(c for c in DATA["cases"] if c["name"] == "tiny17_assignment_ties")
    run = case["runs"][0]
    dom = torch.tensor(sorted(run["all_indices"][0].tolist()))
    asg = contextual_assign(case["keys"][0].to(F64), dom, 3)
    keys = case["keys"][0].mean(0)
    t1, t2 = asg.target_idx[1], asg.target_idx[2]
    assert torch.equal(keys[t1], keys[t2])
    tied = [i for i, s in enumerate(asg.source_idx.tolist()) if torch.equal(keys[s], keys[t1])]
    assert tied and all(asg.assignment[i] == 1 for i in tied)


def test_targets_without_sources_and_all_tokens():
    """``d + c`` = all 17 tokens: every remaining token is a target with no source, so the contextual
    tokens are the targets themselves (the reference clamps the counts at 1)."""
    case = next(c for c in DATA["cases"] if c["name"] == "tiny17")
    run = next(r for r in case["runs"] if r["dominant"] + r["contextual"] == 17)
    dom = sorted(run["all_indices"][0].tolist())
    rest = [i for i in range(17) if i not in dom]
    torch.testing.assert_close(run["tokens"][0, 7:], case["hidden"][0, rest].to(F64), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ the policy
def _adapter(n_patches: int):
    return types.SimpleNamespace(
        family="llava", config=types.SimpleNamespace(vision_feature_layer=-2), vit_has_cls=lambda: True,
        feature_offset=lambda: 1, nominal_visual_tokens=lambda: n_patches, vit_layers=lambda: [None] * 24)


def _image(hidden, cls_row, keys) -> ImageTokens:
    """One LLaVA-1.5 image: the T-1 patch placeholders of a square grid, signals at layer 22."""
    n = hidden.shape[0] - 1
    side = int(n**0.5)
    r, c = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    signals = {
        "vit_cls@22": cls_row.to(F64).mean(0)[1:],  # head mean per patch token (same ranking as the sum)
        "vit_keys@22": keys.to(F64).mean(0),         # head-mean keys incl. CLS
        "vit_hidden@22": hidden.to(F64),             # layer output incl. CLS
        "projector": lambda x: x,                     # identity: compare the merged encoder tokens
    }
    return ImageTokens(features=torch.zeros(n, hidden.shape[1], dtype=F64), candidate=torch.ones(n, dtype=torch.bool),
                       view=torch.zeros(n, dtype=torch.long), grid=torch.stack([r.flatten(), c.flatten()], 1),
                       grid_shapes=[(side, side)], signals=signals)


# HF LLaVA has one placeholder per patch, so the policy emits at most T - 1 tokens per view (documented)
POLICY_RUNS = [(c, r) for c, r in RUNS if r["dominant"] + r["contextual"] < c["hidden"].shape[1]]


@pytest.mark.parametrize("case,run", POLICY_RUNS,
                         ids=[f"{c['name']}-d{r['dominant']}-c{r['contextual']}" for c, r in POLICY_RUNS])
def test_policy_matches_reference(case, run):
    d, c = run["dominant"], run["contextual"]
    for v in range(case["hidden"].shape[0]):  # two views = two LLaVA-1.5 images
        img = _image(case["hidden"][v], case["cls_row"][v], case["keys"][v])
        pol = VisionZip(dominant=d, contextual=c)
        pol.validate("llava", _adapter(img.num_tokens))
        assert set(pol.required_signals(_adapter(img.num_tokens))) == set(img.signals)
        order, feats = pol.apply(img, Context("llava"))
        assert order.tolist() == list(range(d + c))  # the first d + c placeholder slots, in reference order
        torch.testing.assert_close(feats, run["tokens"][v], rtol=0, atol=1e-6)
