"""DART golden fixtures: the reference's own selection code (ModelTC/LightCompress ``get_retained_image_token``,
tests/fixtures/dart/README.md) on seeded inputs; the same kept positions, exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vtprune.methods import dart as D

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dart"


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.pt")), ids=lambda p: p.stem)
def test_golden_reference_selection(path):
    f = torch.load(path, weights_only=True)
    states, keys = f["states"], f["keys"]  # (L, D), (Hkv, L, hd) as the reference's cache holds them
    L = states.shape[0]
    key_norm = keys.permute(1, 0, 2).reshape(L, -1).abs().sum(-1)
    start, m = int(f["start"]), int(f["length"])
    kept = D.dart_select(key_norm, states, torch.arange(start, start + m), torch.arange(start + m, L),
                         pivot_image=int(f["pivot_image"]), pivot_text=int(f["pivot_text"]),
                         reduction_ratio=float(f["ratio"]))
    assert kept.tolist() == f["retained"].tolist()
    assert kept.numel() == D.dart_budget(m, L - start - m, pivot_image=int(f["pivot_image"]),
                                         pivot_text=int(f["pivot_text"]), reduction_ratio=float(f["ratio"]))


def test_golden_needs_the_reference_pivot_order():
    """The visiting order changes the result: the "score" order misses the reference on this case."""
    f = torch.load(FIXTURES / "late_span_wraps_set_order.pt", weights_only=True)
    states, keys = f["states"], f["keys"]
    L = states.shape[0]
    key_norm = keys.permute(1, 0, 2).reshape(L, -1).abs().sum(-1)
    start, m = int(f["start"]), int(f["length"])
    kept = D.dart_select(key_norm, states, torch.arange(start, start + m), torch.arange(start + m, L),
                         reduction_ratio=float(f["ratio"]), pivot_order="score")
    assert kept.numel() == f["retained"].numel() and kept.tolist() != f["retained"].tolist()
