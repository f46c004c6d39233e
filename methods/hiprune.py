"""HiPrune: hierarchical attention pruning with signals from the vision encoder (stage P).

Paper: Liu et al., "HiPrune", arXiv 2508.00553 (HiPrune++, the text-guided variant of the latest
version, is out of scope). Reference implementation: github.com/Danielement321/HiPrune at commit
``6e83a12``. Spec: ``docs/methods/hiprune.md``.

Method. Two vision-encoder layers rank the visual tokens by the attention they *receive* (head mean,
mean or sum over all query rows):

* a middle **object layer** (LLaVA: 1-based layer 9, i.e. 0-based 8; Qwen2.5-VL: block 15), whose top
  tokens are the **anchors** ``A`` (``N_a = round(N'*alpha/5)``, Python half-to-even);
* **buffers**: the 4-neighbours (a cross) of each anchor; ``AB`` = anchors plus buffers;
* a **deep layer** (LLaVA: layer 22 = ``vision_feature_layer``; Qwen: the last block) whose top
  tokens among the rest are the **registers** ``R`` that fill the budget, ``|R| = N' - |AB|``.

Kept = ``sort(AB | R)``: exactly ``N'`` projector outputs in raster order. The method is text-agnostic
and runs once per image at prefill.

The module holds the pure tensor kernels and, at the end, the registered policy :class:`HiPrune`
(``"hiprune"``) that wires them to the hook layer: the adapter recomputes the two attention maps
(signals ``vit_received@L``), the base class enforces the budget, the NeXT newlines and the positions.

Reference code vs paper, and what these kernels default to (spec section 5):

=====  =====================  ==========================================  ==========================
#      item                   default here (reference behaviour unless     option
                              marked "bug fix")
=====  =====================  ==========================================  ==========================
1      deep layer             LLaVA layer 22, Qwen last block (wiring)     ``deep_layer`` (policy)
2      score reduction        CLIP: mean over heads and all 577 query     ``score="cls"`` ->
                              rows (CLS row included), CLS column          :func:`cls_row_scores`
                              dropped, not renormalised. Qwen: head mean,
                              **sum** over queries, 4-patch unit mean,
                              un-permuted by ``argsort(window_index)``
3      anchor count           ``round(N'*alpha/5)`` half-to-even           --
4      buffer border          **bug fix**: ``"grid"`` = true 2-D           ``"clamp"`` (exact
                              neighbours (no out-of-grid, no row wrap)     reference: clamp to
                                                                           [0, N-1], adds 0 / N-1
                                                                           and wraps rows),
                                                                           ``"drop"`` (paper Eq. 5:
                                                                           intersect [0, N-1],
                                                                           wraps rows)
5      buffer shape           cross (4 neighbours)                         ``"square"`` (8)
6      register exclusion     **bug fix**: exact exclusion of ``AB``       ``"subtract_one"``
                                                                           (reference: deep scores
                                                                           of AB minus 1, then
                                                                           top-k; with Qwen column
                                                                           sums it can re-pick AB
                                                                           tokens -> duplicates,
                                                                           fewer than N' kept)
7      budget vs batch        **bug fix**: per image (reference divides    none
                              by the batch size)
8      NeXT layout            native (HF unpadding, newlines kept and      ``next_layout=
                              not budgeted); here: the ``valid`` mask      "reference"`` (policy)
9      NeXT budget            per view ``floor(keep/V)``, base included    ``"exact"``: first
                                                                           ``keep mod V`` views +1
10     precision              scores in fp32 (fp64 kept if given)         ``score_dtype="model"``
                                                                           (policy passes dtype)
11-13  Qwen recompute / multi-image / decode mask: wiring concerns (per segment, per image)
14     top-k ties             (score desc, index asc) everywhere           --
15     HiPrune++              not implemented                              --
=====  =====================  ==========================================  ==========================

Extensions (library, not reference): Qwen2-VL (``window_index`` = identity), native NeXT layout
(positions in the unpadding margin are never anchors/registers, buffer candidates there are dropped,
a crop keeps ``min(N', n_valid)`` and unused budget is not passed on), Qwen video per temporal slice
(call the kernels per slice), multi-image (per image).

Budgets: LLaVA-1.5 ``N' = keep``; LLaVA-NeXT :func:`budget_per_view`; Qwen :func:`qwen_budget`
(``round(n_img * keep)``, half-to-even). ``|AB| > N'`` raises ``ValueError`` (the reference crashes in
``topk``); it cannot happen for ``alpha <= 0.1`` and ``N' >= 5``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Sequence

import torch
from torch import Tensor

from vtprune.policy import FAMILIES, Context, ImageTokens, TokenPolicy, resolve_budget
from vtprune.registry import register

from ._common import (
    PLAIN_VIT_FAMILIES,
    QWEN_FAMILIES,
    check_choice,
    llava_feature_layer,
    resolve_layer,
    scaled_default_layer,
    score_dtype,
    split_proportional,
    stable_topk,
    view_grids,
)

__all__ = [
    "attention_received",
    "cls_row_scores",
    "merge_unit_scores",
    "anchor_count",
    "buffer_candidates",
    "HiPruneGroups",
    "hiprune_groups",
    "hiprune_select",
    "budget_per_view",
    "qwen_budget",
]

BufferBorder = Literal["grid", "drop", "clamp"]
RegisterExclusion = Literal["exclude", "subtract_one"]
BufferShape = Literal["cross", "square"]

# (row offset, column offset) of the buffer shapes; (0, 0) is the anchor itself.
_SHAPES: dict[str, tuple[tuple[int, int], ...]] = {
    "cross": ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0)),
    "square": tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)),
}




# --------------------------------------------------------------------------------------------------
# Score reductions
# --------------------------------------------------------------------------------------------------
def attention_received(
    probs: Tensor,
    *,
    family: Literal["clip", "qwen"] = "clip",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Attention received per key token, from softmax probabilities.

    * ``family="clip"``: ``probs`` (..., H, T, T) with the CLS token at index 0 (e.g. (V, 16, 577,
      577)); returns (..., T-1) = mean over heads and **all** T query rows (CLS row included), then
      the CLS column dropped, not renormalised.
    * ``family="qwen"``: ``probs`` (..., H, T, T) of one segment (one image / frame) of a
      full-attention block, in the packed (window) order; returns (..., T) = head mean, **sum** over
      query rows (per patch, before the merge-unit reduction of :func:`merge_unit_scores`).

    Computed in fp32 (fp64 inputs stay fp64) unless ``dtype`` is given.
    """
    if probs.dim() < 3 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"probs must be (..., H, T, T), got {tuple(probs.shape)}")
    p = probs.to(score_dtype(probs, dtype))
    if family == "clip":
        return p.mean(dim=-3).mean(dim=-2)[..., 1:]
    if family == "qwen":
        return p.mean(dim=-3).sum(dim=-2)
    raise ValueError(f"unknown family {family!r}")


def cls_row_scores(probs: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """``score="cls"`` option (commented out in the reference): the CLS query row only.

    ``probs`` (..., H, T, T) with CLS at index 0 -> (..., T-1): head mean of row 0, CLS column dropped.
    """
    if probs.dim() < 3:
        raise ValueError(f"probs must be (..., H, T, T), got {tuple(probs.shape)}")
    p = probs[..., 0, :].to(score_dtype(probs, dtype))
    return p.mean(dim=-2)[..., 1:]


def merge_unit_scores(
    s_patch: Tensor,
    window_index: Tensor | Sequence[int] | None = None,
    *,
    unit: int = 4,
) -> Tensor:
    """Qwen merge-unit scores in raster order.

    ``s_patch`` (P_total,): per-patch scores of all segments concatenated in packed (window) order,
    where every ``unit`` (= spatial_merge_size**2 = 4) consecutive patches form one merge unit.
    ``window_index`` (P_total/unit,): the model's window permutation (window position -> raster unit
    index); ``None`` = identity (Qwen2-VL). Returns (P_total/unit,) = mean over each unit's patches,
    un-permuted by ``argsort(window_index)`` into the raster order of merged tokens (images
    concatenated in order; the caller splits per image).
    """
    if s_patch.dim() != 1 or s_patch.numel() % unit:
        raise ValueError(f"s_patch must be 1-D with a multiple of {unit} entries")
    s_unit = s_patch.reshape(-1, unit).mean(dim=-1)
    if window_index is None:
        return s_unit
    wi = torch.as_tensor(window_index, device=s_unit.device).long()
    if wi.shape != s_unit.shape:
        raise ValueError(f"window_index has {wi.numel()} entries, expected {s_unit.numel()}")
    return s_unit[torch.argsort(wi)]


# --------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------
def anchor_count(n_keep: int, alpha: float) -> int:
    """``N_a = round(N' * alpha / 5)`` with Python half-to-even rounding (125 -> 2, 175 -> 4 at 0.1)."""
    return int(round(n_keep * alpha / 5))


def budget_per_view(
    keep: int, n_views: int, split: Literal["floor", "exact"] = "floor"
) -> list[int]:
    """LLaVA-NeXT per-view budgets (V = base view + crops), base view first.

    ``"floor"`` (reference): ``floor(keep / V)`` for every view (640 -> 5 x 128; 640 -> 3 x 213 = 639).
    ``"exact"`` (our extension): the first ``keep mod V`` views get one more, summing to ``keep``.
    ``keep`` is a token count; fractions are resolved by the policy.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be a non-negative int, got {keep!r}")
    if n_views < 1:
        raise ValueError("n_views must be >= 1")
    base = keep // n_views
    if split == "floor":
        return [base] * n_views
    if split == "exact":
        extra = keep % n_views
        return [base + (1 if v < extra else 0) for v in range(n_views)]
    raise ValueError(f"unknown split {split!r}")


def qwen_budget(n_img: int, keep: float | int) -> int:
    """Qwen per-image budget: ``round(n_img * keep)`` (half-to-even) for a fraction ``keep``.

    ``n_img`` = merged tokens of the image (or temporal slice). An int ``keep`` is a token count and
    gives ``min(keep, n_img)``.
    """
    if isinstance(keep, bool):
        raise TypeError("keep must be an int or a float")
    if isinstance(keep, int):
        if keep < 0:
            raise ValueError("keep must be >= 0")
        return min(keep, n_img)
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"a fractional keep must be in [0, 1], got {keep}")
    return int(round(n_img * keep))


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------
def buffer_candidates(
    anchors: Tensor,
    n: int,
    grid_width: int,
    *,
    buffer_border: BufferBorder = "grid",
    buffer_shape: BufferShape = "cross",
    valid: Tensor | None = None,
) -> Tensor:
    """``AB``: anchors plus their buffer neighbours, unique and ascending.

    ``anchors`` (N_a,) LongTensor of raster indices in a grid of ``n`` tokens, ``grid_width`` columns.
    Border rule: ``"grid"`` true 2-D neighbours; ``"drop"`` intersect with [0, n-1] (row wrap kept);
    ``"clamp"`` clamp to [0, n-1] (reference). ``valid`` (n,) bool: candidates at invalid positions
    are dropped. Returns (|AB|,) LongTensor.
    """
    offs = _SHAPES.get(buffer_shape)
    if offs is None:
        raise ValueError(f"unknown buffer_shape {buffer_shape!r}")
    c = int(grid_width)
    a = anchors.long().reshape(-1, 1)
    dr = torch.tensor([o[0] for o in offs], dtype=torch.long, device=a.device)
    dc = torch.tensor([o[1] for o in offs], dtype=torch.long, device=a.device)
    j = a + dr * c + dc  # (N_a, m)
    if buffer_border == "grid":
        col = a % c + dc
        cand = j[(col >= 0) & (col < c) & (j >= 0) & (j < n)]
    elif buffer_border == "drop":
        cand = j[(j >= 0) & (j < n)]
    elif buffer_border == "clamp":
        cand = j.clamp(0, n - 1).reshape(-1)
    else:
        raise ValueError(f"unknown buffer_border {buffer_border!r}")
    if valid is not None:
        cand = cand[valid[cand]]
    return torch.unique(cand)


class HiPruneGroups(NamedTuple):
    """Result of :func:`hiprune_groups` (all LongTensors on the scores' device).

    anchors: (N_a,) in selection order (score desc, index asc).
    ab: (|AB|,) anchors + buffers, ascending.
    registers: (N_r,) in selection order; may intersect ``ab`` only with ``"subtract_one"``.
    kept: sorted unique ``ab | registers``.
    """

    anchors: Tensor
    ab: Tensor
    registers: Tensor
    kept: Tensor


def hiprune_groups(
    s_obj: Tensor,
    s_deep: Tensor,
    n_keep: int,
    alpha: float,
    grid_width: int,
    *,
    buffer_border: BufferBorder = "grid",
    register_exclusion: RegisterExclusion = "exclude",
    buffer_shape: BufferShape = "cross",
    valid: Tensor | None = None,
) -> HiPruneGroups:
    """HiPrune selection of one view, with its anchor / buffer / register groups.

    ``s_obj``, ``s_deep``: (N,) raster-order scores of the object and deep layers; the grid has
    ``grid_width`` columns (24 for CLIP-336, w/2 for Qwen). ``valid``: optional (N,) bool mask of
    candidate positions (native NeXT layout); invalid positions are never anchors or registers and
    buffer candidates there are dropped. The view keeps ``N' = min(n_keep, n_valid)`` tokens
    (``n_valid = N`` without a mask) with ``N_a = anchor_count(N', alpha)`` anchors.
    Raises ``ValueError`` if ``|AB| > N'``.
    """
    if s_obj.dim() != 1 or s_deep.shape != s_obj.shape:
        raise ValueError("s_obj and s_deep must be 1-D tensors of the same length")
    if isinstance(n_keep, bool) or int(n_keep) != n_keep or n_keep < 0:
        raise ValueError(f"n_keep must be a non-negative int, got {n_keep!r}")
    if grid_width < 1:
        raise ValueError("grid_width must be >= 1")
    if register_exclusion not in ("exclude", "subtract_one"):
        raise ValueError(f"unknown register_exclusion {register_exclusion!r}")
    n = s_obj.numel()
    device = s_obj.device
    if valid is None:
        valid_mask = torch.ones(n, dtype=torch.bool, device=device)
    else:
        valid_mask = torch.as_tensor(valid, device=device)
        if valid_mask.dtype != torch.bool or valid_mask.shape != s_obj.shape:
            raise ValueError("valid must be a bool tensor shaped like s_obj")
    cand = valid_mask.nonzero().reshape(-1)
    n_eff = min(int(n_keep), cand.numel())

    anchors = stable_topk(s_obj, anchor_count(n_eff, alpha), cand)
    ab = buffer_candidates(
        anchors, n, grid_width, buffer_border=buffer_border, buffer_shape=buffer_shape,
        valid=valid_mask,
    )
    if ab.numel() > n_eff:
        raise ValueError(
            f"anchors+buffers ({ab.numel()}) exceed the budget ({n_eff}); lower alpha or raise keep"
        )
    n_r = n_eff - ab.numel()
    if register_exclusion == "exclude":
        pool = valid_mask.clone()
        pool[ab] = False
        registers = stable_topk(s_deep, n_r, pool.nonzero().reshape(-1))
    else:  # "subtract_one": reference behaviour (bug-compatible)
        sd = s_deep if s_deep.is_floating_point() else s_deep.float()
        sd = sd.clone()
        sd[ab] -= 1
        registers = stable_topk(sd, n_r, cand)
    kept = torch.unique(torch.cat([ab, registers]))
    return HiPruneGroups(anchors, ab, registers, kept)


def hiprune_select(
    s_obj: Tensor,
    s_deep: Tensor,
    n_keep: int,
    alpha: float,
    grid_width: int,
    *,
    buffer_border: BufferBorder = "grid",
    register_exclusion: RegisterExclusion = "exclude",
    buffer_shape: BufferShape = "cross",
    valid: Tensor | None = None,
) -> Tensor:
    """Kept raster indices of one view: (N',) LongTensor, strictly increasing.

    See :func:`hiprune_groups` for the arguments. ``N' = min(n_keep, n_valid)``; with
    ``register_exclusion="subtract_one"`` fewer may come back (reference bug, spec section 5 item 6).
    """
    return hiprune_groups(
        s_obj, s_deep, n_keep, alpha, grid_width, buffer_border=buffer_border,
        register_exclusion=register_exclusion, buffer_shape=buffer_shape, valid=valid,
    ).kept


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------
#: paper budgets, the first of each family's evaluated list (spec section 4)
HIPRUNE_DEFAULT_KEEP = {"llava": 192, "llava_next": 640, **{f: 0.334 for f in QWEN_FAMILIES},
                        "llava_onevision": 0.334, "llava_onevision1_5": 0.334}  # OneVision, Qwen3: not paper settings


@register
@dataclass
class HiPrune(TokenPolicy):
    """HiPrune (Liu et al., arXiv 2508.00553), stage P: anchors + buffers + registers per view.

    Signals (recomputed by the adapter from the layers' inputs, fp32; the model keeps SDPA):
    ``vit_received@l_o`` and ``vit_received@l_d`` (LLaVA: head mean, mean over all query rows incl.
    CLS, CLS column dropped; Qwen: head mean, sum over queries, 2x2 merge-unit mean, raster order).

    Fields:
        keep: budget per image. ``None`` = the paper's first budget of the family: LLaVA-1.5 192,
            LLaVA-NeXT 640 (total, split per view), Qwen 0.334 (fraction). An int is a count, a float
            a fraction of the image's candidate tokens (Python rounding, at least 1).
        alpha: anchor share, ``N_a = round(alpha * N' / 5)``.
        object_layer: **1-based** object layer as in the paper (LLaVA 9, Qwen 16). ``None`` = that
            default on a tower of the reference depth (CLIP 24 layers, Qwen ViT 32 blocks); on a tower
            of another depth ``n`` the default keeps its relative depth, ``max(1, round(9*n/24))``
            (``round(16*n/32)`` for Qwen), e.g. layer 1 of a 3-layer tiny CLIP.
        deep_layer: **0-based** deep layer (negative counts from the end). ``None`` = LLaVA: the layer
            whose output LLaVA uses (``vision_feature_layer`` -2 -> 22 of 24); Qwen: the last block.
        buffer_border: ``"grid"`` (default, bug fix: true 2-D neighbours) | ``"drop"`` (paper Eq. 5)
            | ``"clamp"`` (exact reference).
        buffer_shape: ``"cross"`` | ``"square"``.
        register_exclusion: ``"exclude"`` (default, bug fix) | ``"subtract_one"`` (reference; if it
            re-picks an anchor/buffer token the budget cannot be met and a ``ValueError`` is raised).
        score: ``"received"`` (reference) | ``"cls"`` (CLS row only, LLaVA with a CLS tower).
        next_budget_split: LLaVA-NeXT budget, ``"floor"`` (reference: floor(keep/V) per view) |
            ``"exact"`` (per view, remainder spread) | ``"global"`` (per-view anchors/buffers, registers
            by one top-k over all views; our extension).
        next_layout: ``"native"`` only (``"reference"``, the forced 'spatial' merge, needs adapter
            support that does not exist yet: ``ValueError``).
        positions: ``"auto"`` = LLaVA renumbers, Qwen keeps the original M-RoPE positions (reference).

    Budgets: LLaVA-1.5 ``N' = keep``. LLaVA-NeXT: ``K`` = the image's budget (int, or fraction of
    its candidates), every view (base + crops) gets ``floor(K / V)`` (``"exact"``: the first
    ``K mod V`` views one more) and a crop keeps ``min(N'_v, n_valid)`` (unused budget is not passed
    on); newline tokens are kept and not counted; an int ``K`` above the image's candidates keeps every
    token (recorded in ``PatchStats.budget_clamped``). Qwen: per image (per temporal slice for video)
    ``N' = round(n * keep)``, at least 1 (deviation: the reference's ``round`` may give 0).

    Deviations from the reference (spec section 5): bugs 4, 6, 7, 11-14 fixed by default (grid
    buffers, exact register exclusion, per-image budget, per-segment recompute for the two needed
    blocks, ties by the lowest index); scores in fp32 (``score_dtype="model"`` not implemented);
    native NeXT layout only; a Qwen2.5-VL object/deep block that is not a full-attention block is
    scored within its attention windows (warning). Extensions: Qwen2-VL, multi-image, native NeXT.
    """

    name: ClassVar[str] = "hiprune"
    description: ClassVar[str] = (
        "HiPrune: anchors (object-layer attention) + buffers + registers (deep-layer attention), stage P"
    )
    families: ClassVar[tuple[str, ...]] = FAMILIES

    keep: int | float | None = None
    alpha: float = 0.1
    object_layer: int | None = None
    deep_layer: int | None = None
    buffer_border: str = "grid"
    buffer_shape: str = "cross"
    register_exclusion: str = "exclude"
    score: str = "received"
    next_budget_split: str = "floor"
    next_layout: str = "native"
    positions: str = "auto"

    default_keep: ClassVar[dict[str, int | float]] = HIPRUNE_DEFAULT_KEEP

    def __post_init__(self):
        self._family: str | None = None
        self._signal_names: tuple[str, str] | None = None

    # ------------------------------------------------------------ validation and signals
    def validate(self, family: str, adapter: Any) -> None:
        super().validate(family, adapter)
        check_choice(self.name, "buffer_border", self.buffer_border, ("grid", "drop", "clamp"))
        check_choice(self.name, "buffer_shape", self.buffer_shape, ("cross", "square"))
        check_choice(self.name, "register_exclusion", self.register_exclusion, ("exclude", "subtract_one"))
        check_choice(self.name, "score", self.score, ("received", "cls"))
        check_choice(self.name, "next_budget_split", self.next_budget_split, ("floor", "exact", "global"))
        check_choice(self.name, "next_layout", self.next_layout, ("native", "reference"))
        if self.next_layout == "reference":
            raise ValueError(
                "hiprune: next_layout='reference' (the reference's forced 'spatial' merge) needs adapter "
                "support that vtprune does not have yet; use next_layout='native'"
            )
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 5.0):
            raise ValueError(f"hiprune: alpha={self.alpha!r} must be a number in [0, 5] (paper: 0.1)")
        self._family = family
        self._signal_names = self._signals_for(family, adapter)

    def _signals_for(self, family: str, adapter: Any) -> tuple[str, str]:
        if family in PLAIN_VIT_FAMILIES:
            depth = len(adapter.vit_layers())
            if self.object_layer is None:
                lo = scaled_default_layer(9, 24, depth)
            else:
                lo = resolve_layer(self.object_layer, depth, method=self.name, knob="object_layer", one_based=True)
            if self.deep_layer is None:
                ld = llava_feature_layer(adapter, self.name, "deep_layer")
            else:
                ld = resolve_layer(self.deep_layer, depth, method=self.name, knob="deep_layer")
            if self.score == "cls" and not adapter.vit_has_cls():
                raise ValueError("hiprune: score='cls' needs a vision tower with a CLS token; use score='received'")
            kind = "vit_received" if self.score == "received" else "vit_cls"
            return f"{kind}@{lo}", f"{kind}@{ld}"
        if self.score != "received":
            raise ValueError("hiprune: score='cls' needs a CLS token; Qwen vision towers have none, nor does the "
                             "packed tower of LLaVA-OneVision-1.5 offer one (use 'received')")
        depth = len(adapter.vit_blocks())
        if self.object_layer is None:
            lo = scaled_default_layer(16, 32, depth)
        else:
            lo = resolve_layer(self.object_layer, depth, method=self.name, knob="object_layer", one_based=True)
        ld = depth - 1 if self.deep_layer is None else resolve_layer(
            self.deep_layer, depth, method=self.name, knob="deep_layer")
        full = set(adapter.full_attention_blocks())
        for what, b in (("object", lo), ("deep", ld)):
            if b not in full:
                warnings.warn(
                    f"hiprune: the {what} block {b} is a windowed-attention block; its scores are computed "
                    "within each window and are comparable only inside a window", stacklevel=3)
        return f"vit_received@{lo}", f"vit_received@{ld}"

    def required_signals(self, adapter: Any) -> dict[str, Any]:
        if self._signal_names is None:
            self.validate(adapter.family, adapter)
        return {name: None for name in self._signal_names}

    # ------------------------------------------------------------ budgets
    def _view_budgets(self, image: ImageTokens) -> tuple[list, list[int]]:
        family = self._family
        grids = view_grids(image, family, method=self.name)
        keep = self.keep_for(family)
        # an int above an image's tokens keeps them all (dynamic resolution; fixed ones are validated)
        if family == "llava":
            budgets = [resolve_budget(keep, image.num_candidates, clamp=True)]
        elif self.budget_clamped(image, family):  # NeXT: an int above the image's tokens keeps them all
            budgets = [g.index.numel() for g in grids]
        elif family == "llava_next":
            total = resolve_budget(keep, image.num_candidates)
            if self.next_budget_split == "global":
                return grids, [total]
            budgets = budget_per_view(total, len(grids), self.next_budget_split)
        elif family == "llava_onevision":
            total = resolve_budget(keep, image.num_candidates)
            if self._joint(image):
                return grids, [total]
            budgets = split_proportional(total, [g.index.numel() for g in grids])
        else:  # Qwen: per image, per temporal slice for video
            budgets = [resolve_budget(keep, g.index.numel(), clamp=True) for g in grids]
        budgets = [min(b, g.index.numel()) for b, g in zip(budgets, grids)]
        return grids, budgets

    def budget(self, image: ImageTokens) -> int:
        return sum(self._view_budgets(image)[1])

    def _joint(self, image: ImageTokens) -> bool:
        """Registers ranked over all views at once: NeXT ``next_budget_split="global"``, and a whole
        LLaVA-OneVision video (``quota="video"``: anchors and buffers per frame, registers jointly)."""
        if self._family == "llava_next":
            return self.next_budget_split == "global"
        return self._family == "llava_onevision" and image.modality == "video"

    # ------------------------------------------------------------ selection
    def _select_global(self, image: ImageTokens, grids, total: int, s_o_tok: Tensor, s_d_tok: Tensor) -> Tensor:
        """``next_budget_split="global"`` (our extension): anchors and buffers per view as the reference
        (anchor count from the view's floor share), then the registers by one top-k of the deep-layer
        scores over all views' remaining candidates, so the budget flows to the views that matter."""
        shares = budget_per_view(total, len(grids), "floor")
        ab = []
        for g, nv in zip(grids, shares):
            nv = min(nv, g.index.numel())
            valid = g.valid()
            groups = hiprune_groups(
                g.scatter(s_o_tok[g.index]), g.scatter(s_d_tok[g.index]), nv, float(self.alpha), g.cols,
                buffer_border=self.buffer_border, register_exclusion="exclude", buffer_shape=self.buffer_shape,
                valid=None if bool(valid.all()) else valid,
            )
            ab.append(g.tokens_of(groups.ab))
        ab = torch.cat(ab) if ab else torch.zeros(0, dtype=torch.long)
        rest = image.candidate.cpu().clone()
        rest[ab] = False
        cand = torch.nonzero(rest).flatten()
        n_reg = total - ab.numel()
        regs = stable_topk(s_d_tok, n_reg, cand)
        return torch.sort(torch.cat([ab, regs])).values

    def select(self, image: ImageTokens, n_keep: int, ctx: Context) -> Tensor:
        name_o, name_d = self._signal_names
        s_o_tok = image.signals[name_o].float().cpu()
        s_d_tok = image.signals[name_d].float().cpu()
        grids, budgets = self._view_budgets(image)
        if self._joint(image):
            return self._select_global(image, grids, budgets[0], s_o_tok, s_d_tok)
        kept = []
        for g, nv in zip(grids, budgets):
            valid = g.valid()
            local = hiprune_select(
                g.scatter(s_o_tok[g.index]), g.scatter(s_d_tok[g.index]), nv, float(self.alpha), g.cols,
                buffer_border=self.buffer_border, register_exclusion=self.register_exclusion,
                buffer_shape=self.buffer_shape, valid=None if bool(valid.all()) else valid,
            )
            if local.numel() != nv:
                raise ValueError(
                    f"hiprune: register_exclusion='subtract_one' re-picked an anchor/buffer token (the "
                    f"reference bug with unnormalised scores) and kept {local.numel()} instead of {nv} "
                    "tokens; use register_exclusion='exclude'"
                )
            kept.append(g.tokens_of(local))
        return torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long)
