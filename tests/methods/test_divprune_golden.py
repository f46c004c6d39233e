"""DivPrune against the authors' code: golden fixtures from github.com/vbdi/divprune @ 799e2d9.

``tests/fixtures/divprune/cases.pt`` holds seeded features (stored in fp32, run in fp64) and the greedy
order the reference ``DivPrune()`` returned (provenance in that folder's README). vtprune's kernel
must give the same order, index for index; on the duplicate case the reference re-picks chosen tokens
(fewer than ``k`` distinct), which the kernel's ``exclude_selected=False`` reproduces and the default
(the paper's reading, module docstring item 1) fixes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vtprune.methods.divprune import DivPrune, cosine_distances, divprune_select, maxmin_order
from vtprune.policy import Context, ImageTokens

DATA = torch.load(Path(__file__).resolve().parents[1] / "fixtures" / "divprune" / "cases.pt", weights_only=True)
CASES = DATA["cases"]
REGULAR = [c for c in CASES if not c["name"].startswith("duplicates")]
IDS = [c["name"] for c in REGULAR]


def test_provenance():
    assert DATA["reference_commit"].startswith("799e2d9")
    assert len(CASES) == 8


@pytest.mark.parametrize("case", REGULAR, ids=IDS)
def test_greedy_order_matches_reference(case):
    x = case["features"].double()
    assert round(case["ratio"] * x.shape[0]) == case["k"]
    order = maxmin_order(cosine_distances(x), case["k"])
    assert order.tolist() == case["order"].tolist()
    assert divprune_select(x, case["k"]).tolist() == case["mask"].nonzero().flatten().tolist()


@pytest.mark.parametrize("case", REGULAR, ids=IDS)
def test_policy_budget_and_selection_match_reference(case):
    x = case["features"].double()
    n = x.shape[0]
    img = ImageTokens(features=x, candidate=torch.ones(n, dtype=torch.bool), view=torch.zeros(n, dtype=torch.long),
                      grid=torch.zeros(n, 2, dtype=torch.long), grid_shapes=[(1, n)])
    pol = DivPrune(keep=case["ratio"])
    assert pol.budget(img) == case["k"]
    order, _ = pol.apply(img, Context("llava"))
    assert order.tolist() == case["mask"].nonzero().flatten().tolist()


def test_duplicates_reference_repeats_tokens_and_the_default_does_not():
    case = next(c for c in CASES if c["name"].startswith("duplicates"))
    x, k = case["features"].double(), case["k"]
    d = cosine_distances(x)
    assert torch.unique(case["order"]).numel() < k  # the reference's bug, recorded
    assert maxmin_order(d, k, exclude_selected=False).tolist() == case["order"].tolist()
    ours = maxmin_order(d, k)
    assert torch.unique(ours).numel() == k
    # identical up to the reference's first repeat
    first_repeat = next(i for i in range(k) if int(case["order"][i]) in case["order"][:i].tolist())
    assert ours[:first_repeat].tolist() == case["order"][:first_repeat].tolist()
