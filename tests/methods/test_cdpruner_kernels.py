"""CDPruner kernels on hand-worked cases: relevance, its normalisation, the kernel, the greedy DPP MAP."""
from __future__ import annotations

import math

import pytest
import torch

from vtprune.methods.cdpruner import (
    cdpruner_select,
    conditional_kernel,
    cosine_similarity_matrix,
    dpp_greedy_map,
    minmax_relevance,
    relevance_scores,
)


def unit_circle(degrees):
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1)


def test_relevance_negated_mean_cosine():
    img = unit_circle([0.0, 90.0, 180.0])
    text = unit_circle([0.0])
    assert relevance_scores(img, text).tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert relevance_scores(img, text, sign="cosine").tolist() == pytest.approx([1.0, 0.0, -1.0])
    # mean over text rows: texts at 0 and 90 degrees -> token at 45 degrees: -(cos45 + cos45) / 2
    two = unit_circle([0.0, 90.0])
    assert relevance_scores(unit_circle([45.0]), two).item() == pytest.approx(-math.cos(math.pi / 4))
    assert relevance_scores(img * 5, text * 0.1).tolist() == pytest.approx([-1.0, 0.0, 1.0])  # scale-free
    with pytest.raises(ValueError, match="no text embeddings"):
        relevance_scores(img, text[:0])


def test_minmax_is_the_references_formula():
    r = minmax_relevance(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert r.tolist() == pytest.approx([1e-6 / 2, (1 + 1e-6) / 2, (2 + 1e-6) / 2], abs=1e-15)
    assert minmax_relevance(torch.tensor([0.3, 0.3])).tolist() == [1.0, 1.0]  # constant: no division by 0


def test_conditional_kernel_and_theta():
    s = torch.eye(3, dtype=torch.float64)
    q = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    assert torch.allclose(conditional_kernel(s, q), torch.diag(q * q))
    e = torch.exp(0.5 * q)  # theta 0.5 -> alpha = 0.5 / (2 * 0.5) = 0.5
    assert torch.allclose(conditional_kernel(s, q, theta=0.5), torch.diag(e * e))
    full = torch.ones(3, 3, dtype=torch.float64)
    assert torch.allclose(conditional_kernel(full, q), q[:, None] * q[None, :])
    with pytest.raises(ValueError, match="theta"):
        conditional_kernel(s, q, theta=1.0)


def test_greedy_map_hand_worked_full_rank():
    # x0 = e1, x1 at 10 degrees from x0 in the same plane, x2 = e3; relevance q = (1, .9, .5).
    # Gains start at q^2 = (1, .81, .25) -> 0. Given {0}: x1 keeps .81 sin^2(10) = .0244, x2 keeps .25
    # -> 2. Given {0, 2}: x1 keeps .0244 (x2 is orthogonal) -> 1.
    a = math.radians(10)
    x = torch.tensor([[1.0, 0, 0], [math.cos(a), math.sin(a), 0], [0, 0, 1.0]], dtype=torch.float64)
    q = torch.tensor([1.0, 0.9, 0.5], dtype=torch.float64)
    k = conditional_kernel(cosine_similarity_matrix(x), q)
    assert dpp_greedy_map(k, 3).tolist() == [0, 2, 1]
    assert cdpruner_select(x, q, 2).tolist() == [0, 2]
    # without relevance the first pick is a tie (every diagonal is 1 up to rounding); the second is
    # the orthogonal x2, never x0's near-duplicate x1
    ones = torch.ones(3, dtype=torch.float64)
    first, second = dpp_greedy_map(conditional_kernel(cosine_similarity_matrix(x), ones), 2).tolist()
    assert first in (0, 1) and second == 2
    # relevance decides when similarity does not: orthogonal tokens, q = (.2, 1, .6) -> order 1, 2, 0
    eye = torch.eye(3, dtype=torch.float64)
    q2 = torch.tensor([0.2, 1.0, 0.6], dtype=torch.float64)
    assert dpp_greedy_map(conditional_kernel(eye, q2), 3).tolist() == [1, 2, 0]


def test_greedy_map_stops_at_the_rank_and_fills_by_quality():
    # four 2-D directions: after two picks every remaining gain is 0 (rank 2); the rest come by q^2.
    x = unit_circle([0.0, 10.0, 90.0, 45.0])
    q = torch.tensor([1.0, 0.9, 0.5, 0.95], dtype=torch.float64)
    k = conditional_kernel(cosine_similarity_matrix(x), q)
    # gains (1, .81, .25, .9025) -> 0; given {0}: x3 keeps .9025 sin^2(45) = .451, x2 .25, x1 .0244 -> 3;
    # given {0, 3}: x1 and x2 lie in the span -> 0 -> by quality: 1 (.81), then 2 (.25)
    assert dpp_greedy_map(k, 4).tolist() == [0, 3, 1, 2]


def test_ties_and_bad_arguments():
    assert dpp_greedy_map(torch.eye(3), 2).tolist() == [0, 1]  # equal gains: lowest index
    assert dpp_greedy_map(torch.eye(3), 0).numel() == 0
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 3\]"):
        dpp_greedy_map(torch.eye(3), 4)
    with pytest.raises(ValueError, match="NaN"):
        dpp_greedy_map(torch.full((2, 2), float("nan")), 1)
    with pytest.raises(ValueError, match="zero feature vector"):
        cosine_similarity_matrix(torch.zeros(2, 3))
    assert cosine_similarity_matrix(torch.randn(4, 3)).dtype == torch.float32
    assert cosine_similarity_matrix(torch.randn(4, 3).half()).dtype == torch.float32
