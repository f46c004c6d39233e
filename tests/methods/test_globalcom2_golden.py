"""GlobalCom² against the authors' code: golden fixtures from github.com/xuyang-liu16/GlobalCom2 @ 96b2d00.

``tests/fixtures/globalcom2/cases.pt`` holds seeded head-mean CLS logits of the thumbnail and the crops
of one LLaVA-NeXT image, and what the reference produced (provenance in that folder's README): the
per-crop scales, the thumbnail indices (score order), the per-crop kept indices into each crop's valid
list, and the final image sequence of ``compress_thumbnail`` + ``compress_crops``, whose identity
features decode to ``(view, patch)`` pairs and ``(-1, -1)`` for a newline.

Reference-faithful setting: the reference's sequence places kept crop tokens at their index inside the
valid list (bug P3) and adds one newline per padded row (bug P4); :func:`assemble_reference`
reproduces it exactly. vtprune's default native layout (true positions, one newline per unpadded row)
is checked to keep the same token set. Through the policy, the kept tokens and the thumbnail order
are compared.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vtprune.methods.globalcom2 import (
    NEWLINE,
    GlobalCom2,
    assemble_native,
    assemble_reference,
    crop_scales,
    crop_valid_indices,
    globalcom2_select,
    valid_region,
)
from vtprune.policy import Context, ImageTokens

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "globalcom2" / "cases.pt"
DATA = torch.load(FIXTURE, weights_only=True)
CASES = DATA["cases"]
IDS = [c["name"] for c in CASES]
F64 = torch.float64


def test_fixture_provenance():
    assert DATA["reference_commit"].startswith("96b2d00")
    assert len(CASES) == 9


def _select(case, rounding="original"):
    (w0, h0), (nph, npw) = case["image_wh"], case["grid"]
    valid = valid_region(h0, w0, nph, npw, rounding=rounding)
    g = case["logits"][0].to(F64)
    return globalcom2_select(g, case["logits"][1:].to(F64), valid, case["r"]), valid


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_scales_thumbnail_and_crops_match_reference(case):
    nph, npw = case["grid"]
    torch.testing.assert_close(crop_scales(case["logits"][0].to(F64), nph, npw, case["r"]), case["scales"],
                               rtol=0, atol=1e-12)
    sel, valid = _select(case)
    assert sel.thumbnail.tolist() == case["thumbnail"].tolist()  # descending-score order (P2)
    assert [(w, h) for h, w in valid.crop_shapes()] == [tuple(d) for d in case["crop_dims_wh"]]
    for c, ref in enumerate(case["crops"]):
        assert sel.crops[c].tolist() == sorted(ref.tolist()), f"crop {c}"
    assert sel.budgets == [x.numel() for x in case["crops"]]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_layout_sequence_matches_reference(case):
    sel, valid = _select(case)
    got = assemble_reference(sel.thumbnail, sel.crops, valid)
    assert got == [tuple(t) for t in case["sequence"].tolist()]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_native_layout_keeps_the_same_tokens(case):
    """Library default (bug fixes P3/P4): same kept tokens, at their true positions, one newline per
    unpadded row. Where the reference placement is already right (no column padding) only the
    newline count changes."""
    sel, valid = _select(case, rounding="hf")
    assert valid == _select(case)[1]  # HF and original LLaVA unpadding agree on these sizes
    native = assemble_native(sel.thumbnail, sel.crops, valid)
    ref = [tuple(t) for t in case["sequence"].tolist()]
    assert sorted(t for t in native if t != NEWLINE) == sorted(t for t in ref if t != NEWLINE)
    assert native.count(NEWLINE) == valid.H_u and ref.count(NEWLINE) == valid.H
    if valid.left == 0:  # row padding only: the reference order is right, only the newlines differ
        assert [t for t in native if t != NEWLINE] == [t for t in ref if t != NEWLINE]


# ------------------------------------------------------------------------------------ the policy
def _native_image(case) -> ImageTokens:
    """One LLaVA-NeXT image in the native layout the adapter builds: thumbnail (view 0) raster, then
    the unpadded crop grid row by row, each row followed by a newline token."""
    (w0, h0), (nph, npw) = case["image_wh"], case["grid"]
    valid = valid_region(h0, w0, nph, npw, rounding="hf")
    view, grid, src = [], [], []
    for p in range(576):
        view.append(0), grid.append((p // 24, p % 24)), src.append((0, p))
    for y in range(valid.top, valid.bottom):
        for x in range(valid.left, valid.right):
            c = (y // 24) * npw + x // 24
            view.append(c + 1), grid.append((y, x)), src.append((c + 1, (y % 24) * 24 + x % 24))
        view.append(-1), grid.append((-1, -1)), src.append(NEWLINE)
    view_t = torch.tensor(view)
    logits = case["logits"]
    score = torch.tensor([0.0 if v < 0 else float(logits[v, p]) for v, p in src])
    n = len(view)
    img = ImageTokens(features=torch.zeros(n, 1), candidate=view_t >= 0, view=view_t, grid=torch.tensor(grid),
                      grid_shapes=[(24, 24), (nph * 24, npw * 24)], signals={"vit_cls_logits@-1": score})
    return img, src


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_policy_matches_reference(case):
    img, src = _native_image(case)
    pol = GlobalCom2(keep=case["r"])
    assert pol.sorted_output is False  # the thumbnail's score order reaches the LLM (reference P2)
    order, feats = pol.apply(img, Context("llava_next"))
    assert feats is None
    got = [src[i] for i in order.tolist()]
    k_g = case["thumbnail"].numel()
    assert got[:k_g] == [(0, int(p)) for p in case["thumbnail"].tolist()]
    ref = [tuple(t) for t in case["sequence"].tolist() if tuple(t) != NEWLINE]
    assert sorted(t for t in got[k_g:] if t != NEWLINE) == sorted(ref[k_g:])
    assert got.count(NEWLINE) == int(img.view.eq(-1).sum())  # every native newline kept
