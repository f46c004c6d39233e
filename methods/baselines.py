"""Baselines every paper compares against: ``none`` (keep all), ``random`` (seeded) and ``pool``
(spatial average pooling to the budget).

``random`` can act at any stage (``at="P"`` after the projector, ``"V"`` inside a CLIP encoder
after layer ``layer``, ``"D"`` inside the LLM at layer ``layer``), which makes it the probe of every
seam of the hook layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.policy import (
    Context,
    DecoderPolicy,
    DecoderView,
    ImageTokens,
    MergePolicy,
    TokenPolicy,
    VisionPolicy,
    check_keep_for_model,
    check_keep_value,
    resolve_budget,
)
from vtprune.registry import register
from vtprune.rows import take_rows

from ._common import split_proportional


@register
@dataclass
class KeepAll(TokenPolicy):
    """Keep every visual token (the identity; exercises the full stage-P machinery)."""

    name: ClassVar[str] = "none"
    description: ClassVar[str] = "keep all visual tokens (vanilla model, through the patch machinery; stage P)"
    keep: int | float = 1.0

    def select(self, image: ImageTokens, n_keep: int, ctx: Context) -> Tensor:
        return image.candidate_index()


def random_subset(n: int, k: int, generator: torch.Generator | None) -> Tensor:
    """k distinct indices of range(n), drawn uniformly with ``generator``, sorted ascending."""
    perm = torch.randperm(n, generator=generator)
    return torch.sort(perm[:k]).values


@dataclass
class _RandomV(VisionPolicy):
    """Stage-V random drop inside a CLIP encoder (class token always kept); ``random:at=V``."""

    name: ClassVar[str] = "random"
    keep: int | float = 0.5
    layer: int = 0
    at: str = "V"  # so that spec() reads back as this policy

    def validate(self, family: str, adapter) -> None:
        super().validate(family, adapter)
        check_keep_value(self.keep)
        check_keep_for_model(self.keep, adapter)

    def layers(self, num_layers: int) -> list[int]:
        return [self.layer % num_layers]

    def after_layer(self, layer: int, x: Tensor, ctx: Context):
        v, n, _ = x.shape
        k = resolve_budget(self.keep, n - 1)
        keys = ctx.view_keys or list(range(v))
        idx = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + random_subset(n - 1, k, ctx.rng(keys[i]))])
                           for i in range(v)]).to(x.device)
        return take_rows(x, idx, 1), idx


@dataclass
class _RandomD(DecoderPolicy):
    """Stage-D random drop inside the LLM from ``layer`` on; ``random:at=D``."""

    name: ClassVar[str] = "random"
    at: str = "D"  # so that spec() reads back as this policy

    def select(self, layer: int, view: DecoderView, ctx: Context) -> Tensor:
        vis = torch.nonzero(view.visual).flatten()
        k = self.budget(vis.numel(), layer)
        return vis[random_subset(vis.numel(), k, ctx.rng(layer)).to(vis.device)]


@register
@dataclass
class Random(TokenPolicy):
    """Uniformly random visual tokens (seeded by ``patch(..., seed=)``), at stage P, V or D.

    Fields: ``keep`` (count or fraction), ``at`` ("P", "V" inside a CLIP encoder after ``layer``,
    "D" inside the LLM from ``layer`` on), ``layer``.
    """

    name: ClassVar[str] = "random"
    description: ClassVar[str] = "uniformly random visual tokens (seeded); stage P, V or D"
    keep: int | float = 0.5
    at: str = "P"
    layer: int = 2

    def __new__(cls, *args, **kwargs):
        stage = kwargs.get("at", "P")
        if stage == "V":
            return _RandomV(keep=kwargs.get("keep", 0.5), layer=kwargs.get("layer", 0))
        if stage == "D":
            return _RandomD(keep=kwargs.get("keep", 0.5), layer=kwargs.get("layer", 2))
        if stage != "P":
            raise ValueError(f"random: at={stage!r}; choose 'P', 'V' or 'D'")
        return super().__new__(cls)

    def select(self, image: ImageTokens, n_keep: int, ctx: Context) -> Tensor:
        cand = image.candidate_index()
        rng = ctx.rng(image.index_in_sample)
        return cand[random_subset(cand.numel(), n_keep, rng)]


def pooled_grid(rows: int, cols: int, k: int) -> tuple[int, int]:
    """(r, c) with r * c == k, r <= rows, c <= cols, aspect closest to rows/cols; ValueError if none."""
    best = None
    for r in range(1, k + 1):
        if k % r:
            continue
        c = k // r
        if r > rows or c > cols:
            continue
        err = abs(math.log((r / c) / (rows / cols)))
        if best is None or err < best[0]:
            best = (err, r, c)
    if best is None:
        raise ValueError(f"pool: cannot pool a {rows}x{cols} grid to exactly {k} tokens")
    return best[1], best[2]


def average_pool(feats: Tensor, rows: int, cols: int, out: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Adaptive average pooling of a (rows*cols, D) raster grid to ``out`` = (r, c).

    Returns ``(pooled (r*c, D), top_left (r*c,) raster index of each window's first token)``.
    """
    r, c = out
    x = feats.view(rows, cols, -1).permute(2, 0, 1)[None].float()
    pooled = F.adaptive_avg_pool2d(x, (r, c))[0].permute(1, 2, 0).reshape(r * c, -1).to(feats.dtype)
    starts_r = torch.tensor([(i * rows) // r for i in range(r)])
    starts_c = torch.tensor([(j * cols) // c for j in range(c)])
    top_left = (starts_r[:, None] * cols + starts_c[None, :]).flatten()
    return pooled, top_left


@register
@dataclass
class Pool(MergePolicy):
    """Spatial average pooling of each view's token grid to the budget (stage P).

    The budget of an image is split across its views in proportion to their candidate counts; each
    view's (complete, rectangular) grid is pooled with adaptive average pooling to an r x c grid with
    r * c equal to its share (aspect closest to the view's). A pooled token sits at, and takes the
    position of, the first token of its window. Views whose candidates are not a full rectangle
    (LLaVA-NeXT crops after unpadding are; merged tokens are not) raise ``ValueError``.
    """

    name: ClassVar[str] = "pool"
    description: ClassVar[str] = "spatial average pooling of each view's token grid to the budget (stage P)"
    keep: int | float = 0.25

    def merge(self, image: ImageTokens, n_keep: int, ctx: Context) -> tuple[Tensor, Tensor]:
        cand = image.candidate_index()
        views = image.view[cand]
        ids = sorted(set(views.tolist()))
        counts = [int((views == v).sum()) for v in ids]
        shares = split_proportional(n_keep, counts)
        feats, reps = [], []
        for v, share in zip(ids, shares):
            idx = cand[views == v]
            grid = image.grid[idx]
            r0, c0 = grid.min(0).values.tolist()
            rows, cols = (grid.max(0).values - grid.min(0).values + 1).tolist()
            if rows * cols != idx.numel():
                raise ValueError("pool needs full rectangular token grids per view")
            order = torch.argsort((grid[:, 0] - r0) * cols + (grid[:, 1] - c0))
            idx = idx[order]
            f, tl = average_pool(image.features[idx], rows, cols, pooled_grid(rows, cols, share))
            feats.append(f)
            reps.append(idx[tl])
        return torch.cat(feats), torch.cat(reps)
