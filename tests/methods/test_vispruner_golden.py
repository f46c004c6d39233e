"""VisPruner against the authors' code: golden fixtures from github.com/Theia-4869/VisPruner @ aefa01a.

``tests/fixtures/vispruner/cases.pt`` holds seeded per-view features (B, 576, C) and CLS attention rows
(B, H, 576) (stored in fp32, run in fp64) and the index masks the reference ``encode_images`` returned
(provenance in that folder's README). vtprune must keep the same tokens, per view: the kernel on the
head-mean scores, and the policy wired as on LLaVA-1.5 / LLaVA-NeXT (signals ``vit_cls@22`` and
``vit_hidden@22`` with the CLS row at encoder index 0) through a stand-in adapter of CLIP-L's depth.
"""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from vtprune.methods.vispruner import VisPruner, vispruner_select
from vtprune.policy import Context, ImageTokens

DATA = torch.load(Path(__file__).resolve().parents[1] / "fixtures" / "vispruner" / "cases.pt", weights_only=True)
CASES = DATA["cases"]
IDS = [c["name"] for c in CASES]


def test_provenance():
    assert DATA["reference_commit"].startswith("aefa01a")
    assert len(CASES) == 9


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_reference(case):
    feats, attn = case["features"].double(), case["attentions"].double()
    for v in range(feats.shape[0]):
        g = vispruner_select(attn[v].mean(0), feats[v], case["visual_token_num"], case["important_ratio"])
        assert g.kept.tolist() == case["mask"][v].nonzero().flatten().tolist(), f"view {v}"


def clip_l_adapter():
    """Stand-in for a LLaVA adapter on a 24-layer CLIP tower with vision_feature_layer=-2."""
    return types.SimpleNamespace(
        family="llava", vit_has_cls=lambda: True, feature_offset=lambda: 1, vit_layers=lambda: [None] * 24,
        config=types.SimpleNamespace(vision_feature_layer=-2), nominal_visual_tokens=lambda: None)


def image_of(case, family):
    """The fixture's views as one image in vtprune's layout (NeXT: base view + crops side by side)."""
    feats, attn = case["features"].double(), case["attentions"].double()
    views, n, c = feats.shape
    side = int(n ** 0.5)
    r, col = torch.arange(n) // side, torch.arange(n) % side
    grid = torch.cat([torch.stack([r, col + side * max(0, v - 1)], 1) for v in range(views)])
    hidden = torch.cat([torch.zeros(views, 1, c, dtype=feats.dtype), feats], dim=1)  # CLS row at index 0
    sig = {"vit_cls@22": attn.mean(1).reshape(-1), "vit_hidden@22": hidden if family == "llava_next" else hidden[0]}
    shapes = [(side, side)] + ([(side, side * (views - 1))] if views > 1 else [])
    return ImageTokens(features=torch.zeros(views * n, 4), candidate=torch.ones(views * n, dtype=torch.bool),
                       view=torch.arange(views).repeat_interleave(n), grid=grid, grid_shapes=shapes, signals=sig)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_policy_wiring_matches_reference(case):
    views = case["features"].shape[0]
    family = "llava_next" if views > 1 else "llava"
    pol = VisPruner(keep=case["visual_token_num"], important_ratio=case["important_ratio"])
    pol.validate(family, clip_l_adapter())
    assert pol.required_signals(None) == {"vit_cls@22": None, "vit_hidden@22": None}
    order, _ = pol.apply(image_of(case, family), Context(family))
    n = case["features"].shape[1]
    expected = torch.cat([case["mask"][v].nonzero().flatten() + v * n for v in range(views)])
    assert order.tolist() == expected.tolist()
