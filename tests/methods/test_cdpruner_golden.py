"""CDPruner against the authors' code: golden fixtures from github.com/Theia-4869/CDPruner @ 9541616.

``tests/fixtures/cdpruner/cases.pt`` holds seeded per-view projected features (B, N, D), image
embeddings (B, N, C) and text embeddings (M, C) (stored in fp16, run in fp64) and the index masks the
reference ``encode_images`` returned (provenance in that folder's README). vtprune must keep the same
tokens per view: the kernels (relevance normalised over all views together, as the reference), and,
on the cases whose image embeddings are the features themselves (vtprune's LLM-space reading), the
policy with the instruction as a text signal. Past the kernel's rank the reference continues on
rounding residues and may repeat tokens; there vtprune must agree up to the rank and keep ``T``
distinct tokens.
"""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from vtprune.methods.cdpruner import (
    CDPruner,
    cdpruner_select,
    conditional_kernel,
    cosine_similarity_matrix,
    dpp_greedy_map,
    minmax_relevance,
    relevance_scores,
)
from vtprune.policy import Context, ImageTokens
from vtprune.signals import TextTokens

DATA = torch.load(Path(__file__).resolve().parents[1] / "fixtures" / "cdpruner" / "cases.pt", weights_only=True)
CASES = DATA["cases"]
REGULAR = [c for c in CASES if not c["name"].startswith("rank_exhausted")]
SAME_SPACE = [c for c in CASES if c["name"].startswith("same_space")]


def test_provenance():
    assert DATA["reference_commit"].startswith("9541616")
    assert len(CASES) == 9


def normalised_relevance(case):
    """(B, N) relevance, min-max over every view together (the reference normalises the batch)."""
    e, q = case["image_embeds"].double(), case["text_embeds"].double()
    b, n, c = e.shape
    return minmax_relevance(relevance_scores(e.reshape(b * n, c), q)).view(b, n)


@pytest.mark.parametrize("case", REGULAR, ids=[c["name"] for c in REGULAR])
def test_kernels_match_reference(case):
    feats, rel = case["features"].double(), normalised_relevance(case)
    for v in range(feats.shape[0]):
        kept = cdpruner_select(feats[v], rel[v], case["visual_token_num"])
        assert kept.tolist() == case["mask"][v].nonzero().flatten().tolist(), f"view {v}"


@pytest.mark.parametrize("case", SAME_SPACE, ids=[c["name"] for c in SAME_SPACE])
def test_policy_with_text_signal_matches_reference(case):
    feats, q = case["features"].double(), case["text_embeds"].double()
    assert torch.equal(case["image_embeds"], case["features"])
    views, n, _ = feats.shape
    side = int(n ** 0.5)
    r, col = torch.arange(n) // side, torch.arange(n) % side
    family = "llava_next" if views > 1 else "llava"
    img = ImageTokens(
        features=feats.reshape(views * n, -1), candidate=torch.ones(views * n, dtype=torch.bool),
        view=torch.arange(views).repeat_interleave(n),
        grid=torch.cat([torch.stack([r, col + side * max(0, v - 1)], 1) for v in range(views)]),
        grid_shapes=[(side, side)] + ([(side, side * (views - 1))] if views > 1 else []),
        signals={"instruction_embeds": TextTokens(ids=torch.arange(q.shape[0]), embeds=q)})
    pol = CDPruner(keep=case["visual_token_num"])
    pol.validate(family, types.SimpleNamespace(nominal_visual_tokens=lambda: None))
    assert pol.required_signals(None) == {"instruction_embeds": None}
    order, _ = pol.apply(img, Context(family))
    expected = torch.cat([case["mask"][v].nonzero().flatten() + v * n for v in range(views)])
    assert order.tolist() == expected.tolist()


def test_rank_exhausted_case_agrees_up_to_the_rank():
    case = next(c for c in CASES if c["name"].startswith("rank_exhausted"))
    feats, rel, t = case["features"].double()[0], normalised_relevance(case)[0], case["visual_token_num"]
    ref = set(case["mask"][0].nonzero().flatten().tolist())
    assert len(ref) < t  # the reference repeated tokens past the rank (recorded bug)
    rank = torch.linalg.matrix_rank(feats).item()
    order = dpp_greedy_map(conditional_kernel(cosine_similarity_matrix(feats), rel), t)
    assert torch.unique(order).numel() == t
    assert set(order[:rank].tolist()) <= ref  # identical picks while the kernel has rank
