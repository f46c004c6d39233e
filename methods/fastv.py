"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv 2403.06764).

Stage D. After decoder layer K-1 the attention that the **last prompt token** pays to each image
token (head mean, recomputed from layer K-1's own q/k projections with RoPE and GQA, fp32) ranks
the image tokens; the top ``keep`` survive for all layers >= K with their **original** positions.
Decode is static: the selection made at prefill is kept (fork (b) of the reference).

Generation with and without the KV cache differ, as in the reference fork: ``generate()`` with the
cache (default) selects once, at prefill, and every decode step attends to the shortened per-layer
cache. ``generate(use_cache=False)`` re-runs the whole sequence at every step, so every step is a
prefill and the selection is made again from that step's last token (the reference's behaviour
without cache); the two paths can then generate different tokens.

Deviations from the reference code (spec: ``docs/methods/fastv.md`` §5): the image span is read from
``input_ids`` (reference: hard-coded 35/36, bug); per-sample selection with padding-aware masks
(reference: batch index 0 only, bug); ties broken by the lowest index; the attention row is
recomputed so SDPA stays on (reference: eager). ``keep`` is a count or a fraction of the image
tokens (``N' = round(keep * M)``); ``r`` (fraction pruned, fork (b)) is accepted as an alias.
LLaVA-NeXT newline tokens are candidates like the other image-span tokens (spec §6 reading).
Not implemented yet: ``score="all_queries"``, ``decode="dynamic"``, ``mode="mask"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from vtprune.policy import Context, DecoderPolicy, DecoderView
from vtprune.registry import register

from ._common import stable_topk


def topk_lowest_index(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, ties broken by the lowest index, returned ascending."""
    return torch.sort(stable_topk(scores, k)).values


@register
@dataclass
class FastV(DecoderPolicy):
    """FastV: at layer ``layer`` (K) keep the ``keep`` image tokens most attended by the last token.

    Fields: ``layer`` K (0-based index of the first pruned layer = number of unpruned layers; paper
    K=2), ``keep`` (int count or fraction of the image tokens; paper 0.5), ``r`` (optional: fraction
    pruned, overrides ``keep`` as ``1 - r``).
    """

    name: ClassVar[str] = "fastv"
    description: ClassVar[str] = "FastV: drop image tokens least attended by the last token after layer K (stage D)"
    layer: int = 2
    keep: int | float = 0.5
    r: float | None = None

    def __post_init__(self):
        if self.r is not None:
            if not 0.0 <= self.r < 1.0:
                raise ValueError(f"fastv: r={self.r} (fraction pruned) must be in [0, 1)")
            self.keep = 1.0 - float(self.r)

    def signal_layers(self, num_layers: int) -> dict[int, str]:
        return {self.layer - 1: "last_row"}

    def select(self, layer: int, view: DecoderView, ctx: Context) -> Tensor:
        scores = view.signals[f"last_row@{self.layer - 1}"]
        vis = torch.nonzero(view.visual).flatten()
        k = self.budget(vis.numel(), layer)
        top = topk_lowest_index(scores[vis].float().cpu(), k)
        return vis[top.to(vis.device)]
