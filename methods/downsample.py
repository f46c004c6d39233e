"""Baseline ``downsample``: run the vision tower on a smaller image so that it emits about the budget.

VTC-Bench (and many papers' own tables) find that plain image downsampling beats many token-reduction
methods; this is that row. Nothing is selected or merged: the preprocessed image of each view is
resized to a smaller patch grid, the tower runs on it with its position table interpolated to that grid
(CLIP / SigLIP: ``interpolate_pos_encoding=True``; DINOv2 always interpolates), and every token it emits
goes to the LLM. The tower's FLOPs drop with the grid (the encoder schedule records the smaller
sequence, so ``count_flops`` reports them); the resize itself is not counted (like selection overhead).

Token-count rule (:func:`downsample_grid`): a view with a native ``rows x cols`` patch grid and budget
``k`` patch tokens (``keep``: an int count, or a fraction of ``rows * cols``, as every baseline) runs at

    rows' = clamp(round(rows * sqrt(k / (rows * cols))), 1, rows), cols' likewise,

i.e. a square grid of side ``round(sqrt(k))`` on the square LLaVA-1.5 views (``round`` = Python's,
half to even). So the tower emits ``rows' * cols'`` patch tokens, about ``k``, not always exactly:
keep=0.25 of 8x8 -> 4x4 = 16 tokens (56 px at patch 14); keep=0.5 of 8x8 -> round(5.66) = 6 -> 36
tokens. ``PatchStats.visual_tokens_per_image`` records what ran. The CLS token, when the feature
strategy keeps it, is added on top as in the unpatched model.

Placement: each emitted token takes the placeholder of the native patch at its cell's top-left corner
(``downsample_slots``, as ``pool`` places a window at its first token); the other placeholders are
removed. Positions follow the family's stage-P convention (LLaVA: renumbered).

Families: LLaVA-1.5 with a CLIP, SigLIP or DINOv2 tower. Not supported (``ValueError`` naming
``pool``): LLaVA-NeXT (its packing of base view and crops assumes the native grid per view), LLaVA-
OneVision, and the dynamic-resolution Qwen families (there, a smaller image is the processor's
``max_pixels``, not a patch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.policy import Context, VisionPolicy, check_keep_for_model, check_keep_value, resolve_budget
from vtprune.registry import register

from ._common import check_choice

MODES = ("bilinear", "bicubic", "area", "nearest")


def downsample_grid(rows: int, cols: int, k: int) -> tuple[int, int]:
    """The patch grid ``(rows', cols')`` a ``rows x cols`` view runs at for a budget of ``k`` patch tokens
    (module docstring: both sides scaled by ``sqrt(k / (rows*cols))``, rounded, clamped to ``[1, side]``)."""
    if k < 1:
        raise ValueError(f"downsample: budget {k} must be >= 1 token")
    f = math.sqrt(k / (rows * cols))
    return min(rows, max(1, round(rows * f))), min(cols, max(1, round(cols * f)))


def resize_pixels(pixel_values: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """(V, 3, H, W) preprocessed pixels -> (V, 3, h, w), computed in fp32 (at least), in the input dtype.

    ``bilinear`` / ``bicubic`` use antialiasing when shrinking (as image libraries do); ``area`` is the
    mean over each output cell; ``nearest`` picks one pixel. Resizing commutes with the processor's
    per-channel normalisation (an affine map), so resizing the normalised tensor equals normalising
    the resized image (up to the processor's rounding to 8-bit, which never happens here).
    """
    check_choice("downsample", "mode", mode, MODES)
    dt = torch.promote_types(pixel_values.dtype, torch.float32)
    x = pixel_values.to(dt)
    if mode in ("bilinear", "bicubic"):
        out = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    else:
        out = F.interpolate(x, size=size, mode=mode)
    return out.to(pixel_values.dtype)


def downsample_slots(rows: int, cols: int, out: tuple[int, int]) -> Tensor:
    """(r*c,) raster index in the native ``rows x cols`` grid of the top-left patch of each cell of the
    ``out = (r, c)`` grid (cell ``(i, j)`` starts at native row ``floor(i*rows/r)``, col ``floor(j*cols/c)``)."""
    r, c = out
    starts_r = torch.arange(r) * rows // r
    starts_c = torch.arange(c) * cols // c
    return (starts_r[:, None] * cols + starts_c[None, :]).flatten()


@register
@dataclass
class Downsample(VisionPolicy):
    """Baseline: the vision tower runs on a smaller image (stage V, before the first encoder layer).

    Fields:
        keep: patch tokens per view: an int count or a float fraction of the native grid; the grid
            side is ``round(sqrt(keep))`` on square views (:func:`downsample_grid`), so the emitted
            count is about the budget (0.25 of 8x8 -> 4x4 = 16; 0.5 of 8x8 -> 6x6 = 36).
        mode: resampling filter of the pixels, ``"bilinear"`` (default, antialiased), ``"bicubic"``
            (antialiased), ``"area"`` or ``"nearest"``.
    """

    name: ClassVar[str] = "downsample"
    description: ClassVar[str] = "baseline: run the vision tower on a smaller image (about the budget in tokens; stage V)"
    input_only: ClassVar[bool] = True
    keep: int | float = 0.25
    mode: str = "bilinear"

    def validate(self, family: str, adapter: Any) -> None:
        if family != "llava":
            alt = {"llava_next": "its AnyRes packing assumes each view's native grid",
                   "llava_onevision": "its AnyRes packing assumes each view's native grid"}.get(
                family, "a dynamic-resolution model takes a smaller image through its processor (max_pixels)")
            raise ValueError(f"downsample is defined for LLaVA-1.5 (CLIP, SigLIP or DINOv2 towers), not {family!r} "
                             f"({alt}); use 'pool' (average pooling of each view's token grid) instead")
        super().validate(family, adapter)
        check_keep_value(self.keep)
        check_keep_for_model(self.keep, adapter)
        check_choice("downsample", "mode", self.mode, MODES)

    def layers(self, num_layers: int) -> list[int]:
        return []  # acts on the input only

    def after_layer(self, layer: int, x: Tensor, ctx: Context):  # pragma: no cover - never called (no layers)
        return None

    def input_grid(self, rows: int, cols: int, ctx: Context) -> tuple[int, int]:
        return downsample_grid(rows, cols, resolve_budget(self.keep, rows * cols, clamp=True))

    def resize(self, pixel_values: Tensor, size: tuple[int, int]) -> Tensor:
        return resize_pixels(pixel_values, size, self.mode)

    def input_slots(self, rows: int, cols: int, out: tuple[int, int]) -> Tensor:
        return downsample_slots(rows, cols, out)
