"""HiPrune against the authors' code: golden fixtures from github.com/Danielement321/HiPrune @ 6e83a12.

``tests/fixtures/hiprune/cases.pt`` holds seeded inputs and the masks the reference selection returned
(provenance in that folder's README). The inputs are low-rank query/key tensors (float16, exact in
float64); the attention maps are ``softmax(q k^T)`` in float64, recomputed here exactly as the driver did.

Reference-faithful settings: the reference clamps buffer neighbours to ``[0, N-1]`` and subtracts 1
from the deep scores of anchors/buffers, so it is compared with ``buffer_border="clamp"`` and
``register_exclusion="subtract_one"`` (vtprune's bug-compatible options). vtprune's defaults (``"grid"``,
``"exclude"``) fix those two bugs: they are compared on the cases where the bugs do not bind (no anchor
on the grid border, LLaVA scores below 1) and shown to differ where they do.
"""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from vtprune.methods.hiprune import (
    HiPrune,
    attention_received,
    budget_per_view,
    buffer_candidates,
    hiprune_groups,
    hiprune_select,
    merge_unit_scores,
    qwen_budget,
)
from vtprune.policy import Context, ImageTokens

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hiprune" / "cases.pt"
DATA = torch.load(FIXTURE, weights_only=True)
LLAVA = [c for c in DATA["cases"] if c["family"] == "llava"]
QWEN = [c for c in DATA["cases"] if c["family"] == "qwen2_5_vl"]
LLAVA_RUNS = [(c, r) for c in LLAVA for r in c["runs"]]


def _ids(runs):
    return [f"{c['name']}-keep{r['keep_per_view']}-a{r['alpha']}" for c, r in runs]


def probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The maps the reference received: softmax(q k^T) over keys, float64."""
    return torch.softmax(q.double() @ k.double().transpose(-1, -2), dim=-1)


def llava_scores(case):
    """(V, 576) object-layer and deep-layer scores (head mean, mean over all 577 query rows)."""
    s_o = attention_received(probs(case["q_obj"], case["k_obj"]), family="clip")
    s_d = attention_received(probs(case["q_deep"], case["k_deep"]), family="clip")
    return s_o, s_d


def test_fixture_provenance():
    assert DATA["reference_commit"].startswith("6e83a12")
    assert len(LLAVA_RUNS) == 11 and len(QWEN) == 3


# ------------------------------------------------------------------------------------ LLaVA kernels
@pytest.mark.parametrize("case,run", LLAVA_RUNS, ids=_ids(LLAVA_RUNS))
def test_llava_bug_compatible_settings_match_reference(case, run):
    s_o, s_d = llava_scores(case)
    for v in range(case["views"]):
        got = hiprune_select(s_o[v], s_d[v], run["keep_per_view"], run["alpha"], 24,
                             buffer_border="clamp", register_exclusion="subtract_one")
        expected = run["mask"][v].nonzero().flatten()
        assert got.tolist() == expected.tolist(), f"view {v}"


def _border_binds(s_o, keep, alpha):
    """True where the reference's clamped buffers differ from true grid neighbours."""
    anchors = hiprune_groups(s_o, s_o, keep, alpha, 24).anchors
    return not torch.equal(buffer_candidates(anchors, 576, 24, buffer_border="clamp"),
                           buffer_candidates(anchors, 576, 24, buffer_border="grid"))


def test_llava_defaults_match_reference_where_the_fixed_bugs_do_not_bind():
    """Default ``grid``/``exclude``: equal to the reference unless an anchor sits on the grid border
    (bug fix: no clamped token 0/575, no row wrap); LLaVA scores are means < 1, so exact exclusion and
    subtract-one agree. Where the border rule binds the two may differ (always with exactly N' kept)."""
    agree = differ = 0
    for case, run in LLAVA_RUNS:
        s_o, s_d = llava_scores(case)
        for v in range(case["views"]):
            got = hiprune_select(s_o[v], s_d[v], run["keep_per_view"], run["alpha"], 24)
            expected = run["mask"][v].nonzero().flatten()
            assert got.numel() == run["keep_per_view"]
            if _border_binds(s_o[v], run["keep_per_view"], run["alpha"]):
                differ += got.tolist() != expected.tolist()
            else:
                assert got.tolist() == expected.tolist(), f"{case['name']} view {v}"
                agree += 1
    assert agree >= 8 and differ >= 2  # both situations are covered by the fixture


def test_llava_border_case_shows_the_clamp_bug():
    """Anchors 5 (first row), 48 (first column), 570 (last row), 95 (last column): the reference's
    clamp adds 0 and 575 (not neighbours) and the row wrap adds 47 and 96; vtprune's ``grid`` border
    keeps only the true 2-D neighbours."""
    case = next(c for c in LLAVA if c["name"] == "llava_1view_border_anchors")
    run = next(r for r in case["runs"] if r["keep_per_view"] == 192)
    s_o, s_d = llava_scores(case)
    ref = set(run["mask"][0].nonzero().flatten().tolist())
    groups = hiprune_groups(s_o[0], s_d[0], 192, 0.1, 24)
    assert sorted(groups.anchors.tolist()) == [5, 48, 95, 570]
    assert {0, 47, 575, 96} <= ref
    assert not {0, 47, 575, 96} & set(groups.ab.tolist())
    assert set(groups.ab.tolist()) < ref  # the true neighbours are kept by both


def test_llava_next_views_budget_is_floor_per_view():
    """The reference divides the budget by the number of views (B = 1 + crops at batch size 1)."""
    case = next(c for c in LLAVA if c["views"] == 5)
    for run in case["runs"]:
        total = run["keep_per_view"] * 5
        assert budget_per_view(total, 5) == [run["keep_per_view"]] * 5
        assert run["mask"].sum(dim=1).tolist() == [run["keep_per_view"]] * 5


# ------------------------------------------------------------------------------------ LLaVA policy
def _llava_adapter():
    config = types.SimpleNamespace(vision_feature_layer=-2)
    return types.SimpleNamespace(family="llava", config=config, vit_has_cls=lambda: True,
                                 nominal_visual_tokens=lambda: 576, vit_layers=lambda: [None] * 24)


def _image(scores: dict[str, torch.Tensor], rows: int, cols: int) -> ImageTokens:
    n = rows * cols
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return ImageTokens(features=torch.zeros(n, 1), candidate=torch.ones(n, dtype=torch.bool),
                       view=torch.zeros(n, dtype=torch.long), grid=torch.stack([r.flatten(), c.flatten()], 1),
                       grid_shapes=[(rows, cols)], signals=scores)


@pytest.mark.parametrize("case,run", [x for x in LLAVA_RUNS if x[0]["views"] == 1],
                         ids=_ids([x for x in LLAVA_RUNS if x[0]["views"] == 1]))
def test_llava_policy_matches_reference(case, run):
    """Through the registered policy (signals at the default layers 8 and 22 of a 24-layer CLIP)."""
    pol = HiPrune(keep=run["keep_per_view"], alpha=run["alpha"], buffer_border="clamp",
                  register_exclusion="subtract_one")
    pol.validate("llava", _llava_adapter())
    assert set(pol.required_signals(_llava_adapter())) == {"vit_received@8", "vit_received@22"}
    s_o, s_d = llava_scores(case)
    img = _image({"vit_received@8": s_o[0], "vit_received@22": s_d[0]}, 24, 24)
    order, feats = pol.apply(img, Context("llava"))
    assert feats is None
    assert order.tolist() == run["mask"][0].nonzero().flatten().tolist()


# ------------------------------------------------------------------------------------ Qwen2.5-VL
def qwen_unit_scores(case):
    """Raster-order merge-unit scores of the object and deep blocks (head mean, column sum, unit mean,
    un-permuted by argsort(window_index))."""
    out = []
    for q, k in ((case["q_obj"], case["k_obj"]), (case["q_deep"], case["k_deep"])):
        s_patch = attention_received(probs(q, k)[0], family="qwen")
        out.append(merge_unit_scores(s_patch, case["window_index"]))
    return out


@pytest.mark.parametrize("case", QWEN, ids=[c["name"] for c in QWEN])
def test_qwen_bug_compatible_settings_match_reference(case):
    _, gh, gw = case["grid_thw"][0].tolist()
    s_o, s_d = qwen_unit_scores(case)
    n_keep = qwen_budget(s_o.numel(), case["retain"])
    got = hiprune_select(s_o, s_d, n_keep, case["alpha"], gw // 2, buffer_border="clamp",
                         register_exclusion="subtract_one")
    assert got.tolist() == case["mask"].nonzero().flatten().tolist()


def test_qwen_subtract_one_duplicates_are_the_reference_bug():
    """Qwen deep scores are column sums (>> 1): subtract-one re-picks anchors/buffers, so the reference
    keeps fewer than N' tokens. vtprune's default (exact exclusion) keeps exactly N'; the policy with
    ``subtract_one`` refuses with a ValueError instead of silently under-filling the budget."""
    case = next(c for c in QWEN if c["name"] == "qwen_subtract_one_duplicates")
    _, gh, gw = case["grid_thw"][0].tolist()
    s_o, s_d = qwen_unit_scores(case)
    n_keep = qwen_budget(s_o.numel(), case["retain"])
    assert int(case["mask"].sum()) < n_keep
    fixed = hiprune_select(s_o, s_d, n_keep, case["alpha"], gw // 2, buffer_border="clamp")
    assert fixed.numel() == n_keep and set(case["mask"].nonzero().flatten().tolist()) < set(fixed.tolist())


def _qwen_adapter():
    return types.SimpleNamespace(family="qwen2_5_vl", config=types.SimpleNamespace(), nominal_visual_tokens=lambda: None,
                                 vit_blocks=lambda: [None] * 32, full_attention_blocks=lambda: [7, 15, 23, 31])


@pytest.mark.parametrize("case", QWEN, ids=[c["name"] for c in QWEN])
def test_qwen_policy_matches_reference(case):
    _, gh, gw = case["grid_thw"][0].tolist()
    pol = HiPrune(keep=case["retain"], alpha=case["alpha"], buffer_border="clamp", register_exclusion="subtract_one")
    pol.validate("qwen2_5_vl", _qwen_adapter())
    assert set(pol.required_signals(_qwen_adapter())) == {"vit_received@15", "vit_received@31"}
    s_o, s_d = qwen_unit_scores(case)
    img = _image({"vit_received@15": s_o, "vit_received@31": s_d}, gh // 2, gw // 2)
    expected = case["mask"].nonzero().flatten().tolist()
    if len(expected) < pol.budget(img):
        with pytest.raises(ValueError, match="subtract_one"):
            pol.apply(img, Context("qwen2_5_vl"))
    else:
        order, _ = pol.apply(img, Context("qwen2_5_vl"))
        assert order.tolist() == expected
