"""DivPrune: max-min diversity selection of the projected visual tokens (stage P).

Paper: Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", CVPR 2025, arXiv 2503.02175. Reference implementation: github.com/vbdi/divprune
at commit ``799e2d9`` (``LLaVA/llava/model/llava_arch.py``: ``pairwise_cosine_similarity``,
``DivPrune`` and the call site at the end of ``prepare_inputs_labels_for_multimodal``; run with
``LAYER_INDEX=0 SUBSET_RATIO=0.098``), CC BY-NC 4.0, read, not copied. Also read: the ModelTC/LightCompress port
(``llmc/compression/token_reduction/divprune.py`` at ``9701d03``), which adds Qwen2.5-VL with the
same kernel on the merger outputs.

Idea. Token pruning as a Max-Min Diversity Problem: keep the ``k`` visual tokens whose smallest
pairwise cosine distance is as large as possible, solved greedily. Text-agnostic, once per image at
prefill, on the features the LLM receives (after the projector / merger).

Algorithm (one image; ``X`` (n, D) its candidate features in LLM order):

1. ``D = 1 - Xn Xn^T`` (n, n) with ``Xn = X / ||X||`` (row-wise; plain division, as the reference).
2. Budget ``k = round(keep * n)`` (Python half-to-even, at least 1; an int ``keep`` is a count). The
   reference's ``SUBSET_RATIO=0.098`` gives 56 of LLaVA-1.5's 576 tokens.
3. First pick: the most isolated token, ``argmax_j`` of the second-smallest entry of column ``j`` of
   ``D`` (the smallest is ``D[j, j] ~ 0``), i.e. its distance to its nearest other token.
4. Each further pick: ``argmax_j min_{s in S} D[s, j]`` over the tokens not yet chosen (farthest
   from the chosen set), until ``|S| = k``. Ties: the lowest index (``torch.argmax``'s rule).
5. The kept tokens enter the LLM in their original (ascending) order; the reference sorts its kept
   positions too.

Reference code vs paper, and what vtprune does (default = the code unless marked "bug fix"):

1. Step 4's argmax: the paper's greedy adds a token not yet in the subset (its MMDP selects a set of
   distinct tokens; the full paper text was not available offline, so this is read from that
   formulation, not from its pseudo-code); the code takes the argmax over **all** tokens, where a
   chosen token scores its rounding-level self-distance. The two agree whenever the code returns
   ``k`` distinct tokens; on images with more duplicates than ``n - k`` (flat regions, a pasted
   logo) the code re-picks chosen tokens and the LLM gets fewer tokens, some twice.
   **Bug fix**: vtprune excludes chosen tokens (the paper's reading, exactly ``k`` distinct tokens).
   The kernel's ``exclude_selected=False`` reproduces the code for the golden test of that case;
   the policy cannot return duplicates, so it has no such option.
2. Step 3 follows the code (second-smallest column entry). The nearest-other-token reading differs
   only when rounding makes a token's self-distance exceed its distance to an exact duplicate.
3. Running minimum: the code recomputes ``min`` over all chosen rows at every step (O(k^2 n));
   vtprune keeps a running minimum (O(k n)), the same values exactly.

vtprune deviations and extensions:

* Precision: distances in fp32 (fp64 inputs stay fp64); the reference computes in the model dtype
  (fp16 for its LLaVA runs), where more near-ties occur.
* Pool: one pool per image, all candidate tokens. LLaVA-NeXT: the reference treats the whole packed
  image as one pool **including the row-newline tokens** (and budgets them); vtprune keeps every
  newline outside the budget (native layout) and selects among the base-view and unpadded crop tokens.
* Qwen2-VL / Qwen2.5-VL: the merger outputs of each image (one token per 2x2 merge unit), as the
  LightCompress port; original M-RoPE positions of the kept tokens (the port gathers them too).
* Batching and several images per sample: per image (the reference is batch 1, one image, and finds
  the image by a hard-coded system-prompt length of 35 tokens).
* Works after any other stage-P/V policy (it reads only ``ImageTokens.features``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from vtprune.policy import Context, ImageTokens, TokenPolicy
from vtprune.registry import register

from ._common import first_argmax, score_dtype

__all__ = ["cosine_distances", "maxmin_order", "divprune_select"]


def cosine_distances(features: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """(n, D) features -> (n, n) cosine distances ``1 - x_i.x_j / (|x_i| |x_j|)``.

    Rows are divided by their norms (no epsilon, as the reference); a zero row has no direction and
    raises ``ValueError``.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (n, D), got {tuple(features.shape)}")
    x = features.to(score_dtype(features, dtype))
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a zero feature vector has no cosine distance to the others")
    xn = x / norms
    return 1.0 - xn @ xn.T


def maxmin_order(distances: Tensor, k: int, *, exclude_selected: bool = True) -> Tensor:
    """Greedy max-min selection order on an (n, n) distance matrix: (k,) LongTensor.

    First the token whose second-smallest column entry (its distance to the nearest other token) is
    largest; then, each step, the token whose smallest distance to the chosen set is largest.
    ``exclude_selected=False`` reproduces the reference, which may pick a chosen token again (its
    self-distance ~ 0 is the largest left once only duplicates remain); the default excludes them.
    Ties go to the lowest index.
    """
    if distances.dim() != 2 or distances.shape[0] != distances.shape[1]:
        raise ValueError(f"distances must be (n, n), got {tuple(distances.shape)}")
    n = distances.shape[0]
    if isinstance(k, bool) or int(k) != k or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
    order = torch.empty(int(k), dtype=torch.long, device=distances.device)
    if k == 0:
        return order
    if n == 1:
        order[0] = 0
        return order
    isolation = torch.topk(distances, 2, dim=0, largest=False).values[1]
    j = first_argmax(isolation)
    order[0] = j
    nearest = distances[j].clone()  # distance of every token to its nearest chosen token
    chosen = torch.zeros(n, dtype=torch.bool, device=distances.device)
    chosen[j] = True
    for i in range(1, int(k)):
        scores = nearest.masked_fill(chosen, float("-inf")) if exclude_selected else nearest
        j = first_argmax(scores)
        order[i] = j
        chosen[j] = True
        nearest = torch.minimum(nearest, distances[j])
    return order


def divprune_select(features: Tensor, k: int, *, dtype: torch.dtype | None = None) -> Tensor:
    """DivPrune of one image: (n, D) features -> the (k,) kept indices, ascending."""
    order = maxmin_order(cosine_distances(features, dtype=dtype), k)
    return torch.sort(order).values


@register
@dataclass
class DivPrune(TokenPolicy):
    """DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175), stage P: greedy max-min diversity.

    Fields:
        keep: tokens kept per image: a float fraction of the image's candidate tokens (default 0.098,
            the reference's ``SUBSET_RATIO``: 56 of 576 on LLaVA-1.5) or an int count.
        positions: ``"auto"`` (LLaVA renumbers, Qwen keeps the original M-RoPE positions, both as the
            references), ``"original"`` or ``"renumber"`` where the family allows.

    Per image, over the projected features of its candidate tokens (LLaVA-NeXT: base view and
    unpadded crop tokens; the newline tokens are always kept and not budgeted). The chosen tokens are
    distinct (the reference may repeat one; see the module docstring, item 1).
    """

    name: ClassVar[str] = "divprune"
    description: ClassVar[str] = "DivPrune: greedy max-min cosine diversity of the projected tokens, stage P"

    keep: int | float = 0.098
    positions: str = "auto"

    def select(self, image: ImageTokens, n_keep: int, ctx: Context) -> Tensor:
        cand = image.candidate_index()
        x = image.features[cand.to(image.features.device)]
        return cand[divprune_select(x, n_keep).cpu()]
