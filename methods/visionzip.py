"""VisionZip: dominant plus contextual tokens from the vision encoder (stage P).

Paper: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025, arXiv 2412.04467. Reference implementation: github.com/dvlab-research/VisionZip (now
JIA-Lab-research/VisionZip) at commit ``3151f6d``, Apache-2.0; also PyPI ``visionzip==0.1.3``.
Spec: ``docs/methods/visionzip.md``.

Method (per view, LLaVA / CLIP ViT-L/14-336, feature layer 22 with its CLS token):

* **dominant** tokens: the CLS token plus the ``d - 1`` patches the CLS token attends to most in the
  feature layer (CLS-row softmax probabilities **summed over heads**); ``d`` counts the CLS token.
  Emitted in ascending index order (CLS first, then patches in raster order).
* **contextual** tokens: the remaining tokens (ascending) are split into ``c`` targets, evenly
  strided **in the remaining list** (``step = max(1, N_rem // c)``, positions ``0, step, ...``), and
  sources; each source joins the target of highest cosine similarity of the head-mean keys (ties to the
  first target). ``ctx_i = h[target_i] + mean(h[sources of i])`` (``h[target_i]`` alone if none).
* The LLM receives ``[dominant (d)] ++ [ctx_1 .. ctx_c]`` after the projector. Text-agnostic, once
  per image at prefill; positions contiguous on LLaVA.

The module holds the pure tensor kernels and, at the end, the registered policy :class:`VisionZip`
(``"visionzip"``, a stage-P merge policy); its docstring lists the wiring choices and deviations.

Reference code vs paper, and the defaults here (spec section 5):

1. CLS head reduction: **sum** over heads (reference; ranking = mean).
2. the CLS token is fed to the LLM (dominant includes index 0; vanilla LLaVA drops it).
3. dominant order: ascending index (the reference's NeXT ``all_indices`` are in score order; the
   wiring reorders if it needs that).
4. contextual: ``target + mean(group)`` (reference; magnitude inflation kept), targets strided in the
   remaining list | ``contextual_mode="mean"`` = group average including the target (our extension).
5. NeXT layout: native (library default; unpadding-margin patches excluded from dominant candidates
   and the contextual pool -> ``patch_valid`` here) | ``next_layout="reference"`` (policy/wiring).
6-7. per-model hooks and one recomputed CLS row instead of global monkey patches and 24 eager maps
   (wiring).
8. ``d + c`` beyond the tokens raises ``ValueError`` (the reference crashes, issue #30); ``d >= 1``.
9. ties: lowest index for top-k, first target for the assignment.

Budgets: LLaVA-1.5 64 = 54+10, 128 = 108+20, 192 = 162+30 (``d`` includes the CLS token). The library
must not use the reference function default 191+30. NeXT: totals 640/320/160 per request; per-view split
unpublished, our reading 108+20 / 54+10 / 27+5 per view (policy).

Qwen2-VL / Qwen2.5-VL extension (no CLS; after the 2x2 merger; :func:`visionzip_qwen`): dominant =
top ``d`` merged tokens by the attention they receive in the last full-attention block (HiPrune's
reduction, ``hiprune.attention_received(family="qwen")`` + ``merge_unit_scores``); contextual metric
= the ℓ2-normalised merger outputs ``y``; ``ctx = y_target + mean(y_group)``; split
:func:`qwen_split` (``d = round(0.84 N')``, the 54:10 ratio); all output tokens ordered by the original
index of their representative (the target for a contextual token), which also gives their M-RoPE
positions. Not validated against published Qwen numbers.

Assignment similarities are computed in fp32 (fp64 inputs stay fp64); merged tokens are accumulated in
that dtype and returned in the dtype of ``hidden``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from vtprune.policy import FAMILIES, Context, ImageTokens, MergePolicy, check_keep_value, resolve_budget
from vtprune.registry import register

from ._common import (
    LLAVA_FAMILIES,
    PLAIN_VIT_FAMILIES,
    QWEN_FAMILIES,
    check_choice,
    llava_feature_layer,
    resolve_layer,
    score_dtype,
    stable_topk,
    view_grids,
)

__all__ = [
    "dominant_select",
    "ContextualAssignment",
    "contextual_assign",
    "contextual_merge",
    "visionzip_tokens",
    "qwen_split",
    "visionzip_qwen",
]

ContextualMode = Literal["reference", "mean"]




def _check_patch_valid(patch_valid: Tensor | None, n_patches: int, device) -> Tensor:
    if patch_valid is None:
        return torch.ones(n_patches, dtype=torch.bool, device=device)
    pv = torch.as_tensor(patch_valid, device=device)
    if pv.dtype != torch.bool or pv.shape != (n_patches,):
        raise ValueError(f"patch_valid must be a bool tensor of shape ({n_patches},)")
    return pv


# --------------------------------------------------------------------------------------------------
# LLaVA / CLIP
# --------------------------------------------------------------------------------------------------
def dominant_select(
    cls_attn: Tensor,
    d: int,
    *,
    includes_cls: bool = False,
    patch_valid: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Dominant token indices of one view: (d,) LongTensor, ascending, starting with 0 (CLS).

    ``cls_attn``: the CLS query's softmax row over the **patch** columns, per head (H, N) or already
    summed over heads (N,); heads are summed here. With ``includes_cls=True`` the last axis has N+1
    columns and column 0 (the CLS key) is dropped first. Patch column ``j`` is token ``j + 1``.
    ``d`` counts the CLS token: the top ``d - 1`` patches (ties by the lowest index) are chosen.
    ``patch_valid`` (N,) bool: only valid patches compete (native NeXT layout).
    """
    if cls_attn.dim() not in (1, 2):
        raise ValueError("cls_attn must be (N,) or (H, N)")
    s = cls_attn.to(score_dtype(cls_attn, dtype))
    if s.dim() == 2:
        s = s.sum(dim=0)
    if includes_cls:
        s = s[1:]
    n = s.numel()
    pv = _check_patch_valid(patch_valid, n, s.device)
    cand = pv.nonzero().reshape(-1)
    if isinstance(d, bool) or int(d) != d or not 1 <= d <= cand.numel() + 1:
        raise ValueError(f"d must be in [1, {cand.numel() + 1}] (CLS included), got {d!r}")
    top = stable_topk(s, int(d) - 1, cand) + 1
    zero = torch.zeros(1, dtype=torch.long, device=s.device)
    return torch.cat([zero, torch.sort(top).values])


class ContextualAssignment(NamedTuple):
    """Targets and sources of the contextual merge (original token indices, LongTensors).

    target_idx: (c,) in target order (= ascending). source_idx: (n_src,) ascending.
    assignment: (n_src,) target number in [0, c) of each source.
    """

    target_idx: Tensor
    source_idx: Tensor
    assignment: Tensor


def _head_mean_keys(keys: Tensor) -> Tensor:
    if keys.dim() == 3:  # (H, T, dh)
        return keys.mean(dim=0)
    if keys.dim() == 2:  # (T, dk)
        return keys
    raise ValueError("keys must be (T, dk) or (H, T, dh)")


def contextual_assign(
    keys: Tensor,
    dominant_idx: Tensor,
    c: int,
    *,
    patch_valid: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> ContextualAssignment:
    """Strided targets in the remaining list and the cosine assignment of the other tokens.

    ``keys`` (T, dk) head-mean keys (or (H, T, dh), averaged here) of all T tokens of the view.
    ``dominant_idx`` (d,) token indices. Remaining = ascending indices not in ``dominant_idx`` (and, with
    ``patch_valid`` (T-1,) over tokens 1..T-1, valid); ``step = max(1, N_rem // c)``; targets are list
    positions ``[0, step, 2*step, ...][:c]``; each source goes to ``argmax_i κ_s·κ_{t_i}`` with
    ``κ = k / ‖k‖`` (plain division), ties to the first target.
    """
    k = _head_mean_keys(keys)
    t_all = k.shape[0]
    device = k.device
    pool = torch.ones(t_all, dtype=torch.bool, device=device)
    if patch_valid is not None:
        pool[1:] = _check_patch_valid(patch_valid, t_all - 1, device)
    pool[torch.as_tensor(dominant_idx, device=device).long()] = False
    rem = pool.nonzero().reshape(-1)
    n_rem = rem.numel()
    if isinstance(c, bool) or int(c) != c or not 0 <= c <= n_rem:
        raise ValueError(f"c must be in [0, {n_rem}] (tokens left after the dominant ones), got {c!r}")
    c = int(c)
    empty = torch.empty(0, dtype=torch.long, device=device)
    if c == 0:
        return ContextualAssignment(empty, empty, empty)
    step = max(1, n_rem // c)
    tpos = torch.arange(0, n_rem, step, device=device)[:c]
    is_t = torch.zeros(n_rem, dtype=torch.bool, device=device)
    is_t[tpos] = True
    kappa = k[rem].to(score_dtype(k, dtype))
    kappa = kappa / kappa.norm(dim=-1, keepdim=True)
    sim = kappa[~is_t] @ kappa[is_t].T  # (n_src, c)
    if sim.numel():
        best = sim.max(dim=1, keepdim=True).values
        # first (lowest) target among the maxima
        ar = torch.arange(c, device=device).expand_as(sim)
        assignment = torch.where(sim == best, ar, torch.full_like(ar, c)).min(dim=1).values
        if (assignment == c).any():
            raise ValueError("NaN similarity (a zero-norm key?)")
    else:
        assignment = empty
    return ContextualAssignment(rem[tpos], rem[~is_t], assignment)


def contextual_merge(
    hidden: Tensor,
    keys: Tensor,
    dominant_idx: Tensor,
    c: int,
    mode: ContextualMode = "reference",
    *,
    patch_valid: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Contextual tokens of one view.

    ``hidden`` (T, D) feature-layer output incl. CLS; ``keys`` as in :func:`contextual_assign`.
    ``mode="reference"``: ``ctx_i = h[t_i] + mean(h[sources of i])`` (counts clamped at 1, so
    ``h[t_i]`` if none); ``mode="mean"``: ``(h[t_i] + sum(h[sources of i])) / (1 + count_i)``.
    Returns ``(ctx (c, D) in hidden's dtype, target_idx (c,) LongTensor)``.
    """
    if hidden.dim() != 2 or _head_mean_keys(keys).shape[0] != hidden.shape[0]:
        raise ValueError("hidden must be (T, D) with keys over the same T tokens")
    asg = contextual_assign(keys, dominant_idx, c, patch_valid=patch_valid, dtype=dtype)
    c = asg.target_idx.numel()
    acc_dtype = score_dtype(hidden, dtype)
    h = hidden.to(acc_dtype)
    sums = torch.zeros(c, h.shape[1], dtype=acc_dtype, device=h.device)
    sums.index_add_(0, asg.assignment, h[asg.source_idx])
    counts = torch.zeros(c, dtype=acc_dtype, device=h.device)
    counts.index_add_(0, asg.assignment, torch.ones_like(asg.assignment, dtype=acc_dtype))
    target = h[asg.target_idx]
    if mode == "reference":
        ctx = target + sums / counts.clamp(min=1).unsqueeze(-1)
    elif mode == "mean":
        ctx = (target + sums) / (1 + counts).unsqueeze(-1)
    else:
        raise ValueError(f"unknown contextual_mode {mode!r}")
    return ctx.to(hidden.dtype), asg.target_idx


def visionzip_tokens(
    hidden: Tensor,
    cls_attn: Tensor,
    keys: Tensor,
    d: int,
    c: int,
    mode: ContextualMode = "reference",
    *,
    patch_valid: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """VisionZip output of one view: ``(tokens (d + c, D), dominant_idx (d,))``.

    ``hidden`` (T, D) feature-layer output incl. CLS at 0; ``cls_attn`` (H, T-1) / (T-1,) over the patch
    columns, or (H, T) / (T,) with the CLS column (dropped); ``keys`` (T, dk) head-mean keys or
    (H, T, dh). Tokens = dominant tokens in ascending index order (CLS first), then the ``c``
    contextual tokens in target order. Raises ``ValueError`` if ``d < 1`` or ``d + c`` exceeds the
    tokens (the reference crashes).
    """
    t_all = hidden.shape[0]
    n_cols = cls_attn.shape[-1]
    if n_cols not in (t_all - 1, t_all):
        raise ValueError(f"cls_attn has {n_cols} columns; expected {t_all - 1} (patches) or {t_all}")
    dom = dominant_select(
        cls_attn, d, includes_cls=(n_cols == t_all), patch_valid=patch_valid, dtype=dtype
    )
    ctx, _ = contextual_merge(hidden, keys, dom, c, mode, patch_valid=patch_valid, dtype=dtype)
    return torch.cat([hidden[dom], ctx], dim=0), dom


# --------------------------------------------------------------------------------------------------
# Qwen extension
# --------------------------------------------------------------------------------------------------
def qwen_split(n_keep: int) -> tuple[int, int]:
    """Qwen dominant/contextual split of a budget ``N'``: ``d = round(0.84 N')`` (half-to-even),
    ``c = N' - d`` (64 -> 54 + 10)."""
    if n_keep < 0:
        raise ValueError("n_keep must be >= 0")
    d = int(round(0.84 * n_keep))
    return d, int(n_keep) - d


def visionzip_qwen(
    features: Tensor,
    scores: Tensor,
    d: int,
    c: int,
    mode: ContextualMode = "reference",
    *,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Qwen VisionZip of one image (our extension): ``(tokens (d + c, D), rep_idx (d + c,))``.

    ``features`` (n, D) merger outputs in raster order; ``scores`` (n,) attention received per merged
    token. Dominant = top ``d`` by score (no CLS; lowest index on ties). Contextual: as
    :func:`contextual_merge` with the ℓ2-normalised ``features`` as the metric. Every output token has
    a representative (itself, or its target); tokens are returned sorted by ``rep_idx`` (ascending,
    unique), whose entries index the original merged tokens (for M-RoPE positions).
    """
    if features.dim() != 2 or scores.shape != (features.shape[0],):
        raise ValueError("features must be (n, D) and scores (n,)")
    n = features.shape[0]
    if isinstance(d, bool) or int(d) != d or not 0 <= d <= n or c < 0 or d + c > n:
        raise ValueError(f"need 0 <= d, 0 <= c, d + c <= {n}; got d={d!r}, c={c!r}")
    s = scores.to(score_dtype(scores, dtype))
    dom = torch.sort(stable_topk(s, int(d), torch.arange(n, device=s.device))).values
    ctx, tgt = contextual_merge(features, features, dom, c, mode, dtype=dtype)
    reps = torch.cat([dom, tgt])
    tokens = torch.cat([features[dom], ctx], dim=0)
    order = torch.argsort(reps)
    return tokens[order], reps[order]


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------
#: default budgets: LLaVA tokens per view (54 + 10, the README example), Qwen fraction (about 64/576)
VISIONZIP_DEFAULT_KEEP = {"llava": 64, "llava_next": 64, **{f: 0.112 for f in QWEN_FAMILIES},
                          "llava_onevision": 0.112, "llava_onevision1_5": 0.112}


def llava_split(n_keep: int) -> tuple[int, int]:
    """LLaVA dominant/contextual split of ``N'`` tokens per view: ``d = round(27/32 N')`` (CLS counted
    in ``d``), ``c = N' - d``. Reproduces every published split: 64 -> 54+10, 128 -> 108+20,
    192 -> 162+30, and the NeXT per-view reading 32 -> 27+5."""
    d = int(round(n_keep * 27 / 32))
    return d, int(n_keep) - d


@register
@dataclass
class VisionZip(MergePolicy):
    """VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467), stage P: dominant + contextual tokens.

    Budget **per view** (as the reference applies the same (d, c) to every view):
        dominant, contextual: ``d`` (LLaVA: CLS counted in ``d``) and ``c``; give both, or neither.
        keep: tokens per view ``N' = d + c`` when dominant/contextual are not given; an int count or a
            float fraction of the view's tokens. Split: LLaVA ``d = round(27/32 N')`` (54+10, 108+20,
            162+30 as published), Qwen ``d = round(0.84 N')``. ``None`` = LLaVA 64 per view (54+10),
            Qwen 0.112.
        contextual_mode: ``"reference"`` (``target + mean(group)``) | ``"mean"``.
        layer: 0-based vision layer of the signals. ``None`` = LLaVA: the layer whose output LLaVA
            uses (22 of 24); Qwen: the last full-attention block.
        next_layout: ``"native"`` only (``"reference"``: ``ValueError``, needs adapter support).
        positions: ``"auto"`` only on LLaVA (contiguous, the reference); Qwen: original M-RoPE
            positions of each token's representative.

    LLaVA wiring: the dominant tokens are chosen from the CLS row of layer ``l`` (signal
    ``vit_cls@l``, head **mean** instead of the reference's sum: same ranking), the contextual groups
    from its head-mean keys (``vit_keys@l``); both blocks are formed from the layer output **with the
    CLS token** (``vit_hidden@l``) and projected with the model's own projector (signal
    ``projector``, a function the adapter provides). So the CLS token reaches the LLM, as in the
    reference, although HF LLaVA drops it: the merged tokens are a new sequence that is written into
    the image's first ``d + c`` placeholder slots in the reference order ``[CLS, dominant patches
    (raster), contextual (target order)]``, and positions are renumbered. Consequences: at most 576
    tokens per view on HF LLaVA (one less than the reference's 577, since HF has one placeholder per
    patch); ``positions="original"`` is refused on LLaVA (the tokens have no source positions).

    LLaVA-NeXT (native layout; our extension): every view (base + crops) gets the same ``(d, c)``;
    crop patches in the unpadding margin are neither dominant candidates nor contextual sources. Order:
    base block (CLS, dominant, contextual), then the crops' CLS tokens (crop order) and the crops'
    contextual tokens (crop order, target order) -- both in free base-view slots --, then the crop
    grid with the crops' dominant patches in unpadded raster order and all row newlines. Deviation
    from the spec's native order (crop CLS and contextual tokens after the crop grid): the base class
    keeps newline tokens at their native slots and the crop grid ends with a newline, so nothing can
    be placed after it. ``ValueError`` if the base view lacks the slots
    (``d + c + crops * (c + 1) > 576``).

    Qwen2-VL / Qwen2.5-VL (our extension, spec section 6): dominant = top ``d`` merged tokens by the
    attention received in the scoring block (``vit_received@B``); contextual metric = normalised merger
    outputs; tokens at their representatives (contextual: the target), original M-RoPE positions.

    A view with fewer tokens than ``d + c`` (a NeXT crop mostly in the unpadding margin, a small Qwen
    image) keeps all of them: ``d`` and then ``c`` are capped at its tokens (library decision, as
    HiPrune's ``min(N', n_valid)``); an int ``keep`` above a view's tokens is capped the same way.

    Deviations / bug fixes (spec section 5): per-model hooks and one recomputed CLS row (items 6-7);
    on LLaVA-1.5 a ``d + c`` beyond the placeholders raises ``ValueError`` at ``patch()`` (item 8; the
    reference crashes), other views are capped as above; ties by the lowest index / first target.
    """

    name: ClassVar[str] = "visionzip"
    description: ClassVar[str] = "VisionZip: CLS-attended dominant tokens + merged contextual tokens, stage P"
    families: ClassVar[tuple[str, ...]] = FAMILIES

    keep: int | float | None = None
    dominant: int | None = None
    contextual: int | None = None
    contextual_mode: str = "reference"
    layer: int | None = None
    next_layout: str = "native"
    positions: str = "auto"

    default_keep: ClassVar[dict[str, int | float]] = VISIONZIP_DEFAULT_KEEP

    def __post_init__(self):
        self._family: str | None = None
        self._signal_names: dict[str, str] = {}

    # ------------------------------------------------------------ validation and signals
    def validate(self, family: str, adapter: Any) -> None:
        super().validate(family, adapter)
        check_choice(self.name, "contextual_mode", self.contextual_mode, ("reference", "mean"))
        check_choice(self.name, "next_layout", self.next_layout, ("native", "reference"))
        if self.next_layout == "reference":
            raise ValueError(
                "visionzip: next_layout='reference' (no unpadding, no newlines) needs adapter support that "
                "vtprune does not have yet; use next_layout='native'"
            )
        if family in LLAVA_FAMILIES:
            if not adapter.vit_has_cls() or adapter.feature_offset() != 1:
                raise ValueError(
                    "visionzip needs a vision tower with a CLS token and vision_feature_select_strategy="
                    "'default' (CLIP); this model has neither a CLS token nor one dropped by the strategy"
                )
            if self.positions == "original":
                raise ValueError(
                    "visionzip: positions='original' is not defined on LLaVA (the CLS, dominant and contextual "
                    "tokens form a new sequence); use positions='auto' (contiguous, the reference)"
                )
            n = adapter.nominal_visual_tokens()
            if self.dominant is not None:
                want, what = self.dominant + self.contextual, "dominant + contextual"
            else:
                keep = self.keep_for(family)
                want, what = (keep, "keep") if isinstance(keep, int) else (0, "")
            if n is not None and want > n:
                raise ValueError(
                    f"visionzip: {what} = {want} tokens per view do not fit the {n} image placeholders of "
                    f"this model (CLS included in the dominant tokens); use at most {n}"
                )
            depth = len(adapter.vit_layers())
            if self.layer is None:
                layer = llava_feature_layer(adapter, self.name, "layer")
            else:
                layer = resolve_layer(self.layer, depth, method=self.name, knob="layer")
            self._signal_names = {
                "cls": f"vit_cls@{layer}", "keys": f"vit_keys@{layer}", "hidden": f"vit_hidden@{layer}",
                "projector": "projector",
            }
        elif family in PLAIN_VIT_FAMILIES:  # LLaVA-OneVision: SigLIP, no CLS token -> the Qwen (no-CLS) rule
            depth = len(adapter.vit_layers())
            if self.layer is None:
                layer = llava_feature_layer(adapter, self.name, "layer")
            else:
                layer = resolve_layer(self.layer, depth, method=self.name, knob="layer")
            self._signal_names = {"score": f"vit_received@{layer}"}
        else:
            depth = len(adapter.vit_blocks())
            if self.layer is None:
                layer = adapter.full_attention_blocks()[-1]
            else:
                layer = resolve_layer(self.layer, depth, method=self.name, knob="layer")
            self._signal_names = {"score": f"vit_received@{layer}"}
        self._family = family

    def validate_keep(self, family: str, adapter: Any) -> None:
        """The budget is per view: ``dominant`` + ``contextual``, or ``keep`` (the fit into the model's
        placeholders is checked per family in :meth:`validate`)."""
        if (self.dominant is None) != (self.contextual is None):
            raise ValueError("visionzip: give both dominant= and contextual= (per view), or neither and keep=")
        if self.dominant is not None:
            for knob, v, lo in (("dominant", self.dominant, 1), ("contextual", self.contextual, 0)):
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    raise ValueError(f"visionzip: {knob}={v!r} must be an int >= {lo}")
            if self.keep is not None and self.keep != self.dominant + self.contextual:
                raise ValueError(
                    f"visionzip: keep={self.keep} disagrees with dominant + contextual = "
                    f"{self.dominant + self.contextual}; give either keep or dominant/contextual"
                )
        else:
            check_keep_value(self.keep_for(family))

    def required_signals(self, adapter: Any) -> dict[str, Any]:
        if not self._signal_names:
            self.validate(adapter.family, adapter)
        return {name: None for name in self._signal_names.values()}

    def _requested_per_view(self, family: str) -> int | None:
        """Tokens asked for per view as a count (dominant + contextual, or an int keep); None for a fraction."""
        if self.dominant is not None:
            return int(self.dominant) + int(self.contextual)
        keep = self.keep_for(family)
        return keep if isinstance(keep, int) and not isinstance(keep, bool) else None

    def budget_clamped(self, image: ImageTokens, family: str) -> bool:
        """True when a view of ``image`` has fewer tokens than the per-view count asked for."""
        want = self._requested_per_view(family)
        if want is None:
            return False
        extra = 1 if family in LLAVA_FAMILIES else 0  # the CLS token of each LLaVA view
        return any(g.index.numel() + extra < want for g in view_grids(image, family, method=self.name))

    def _split_for(self, family: str, n_view: int) -> tuple[int, int]:
        """(d, c) of a view with ``n_view`` candidate patches (LLaVA, + its CLS token) / merged tokens
        (Qwen), capped so that a view never emits more than its tokens."""
        llava = family in LLAVA_FAMILIES
        n_tok = n_view + 1 if llava else n_view
        if self.dominant is not None:
            d, c = int(self.dominant), int(self.contextual)
        else:
            keep = self.keep_for(family)
            n_keep = min(int(keep), n_tok) if isinstance(keep, int) else resolve_budget(keep, n_view)
            d, c = llava_split(n_keep) if llava else qwen_split(n_keep)
        d = min(d, n_tok)
        return d, min(c, n_tok - d)

    # ------------------------------------------------------------ budget and merge
    def budget(self, image: ImageTokens) -> int:
        return sum(sum(self._split_for(self._family, g.index.numel()))
                   for g in view_grids(image, self._family, method=self.name))

    def merge(self, image: ImageTokens, n_keep: int, ctx: Context) -> tuple[Tensor, Tensor]:
        if self._family in LLAVA_FAMILIES:
            return self._merge_llava(image)
        return self._merge_qwen(image)

    def _merge_qwen(self, image: ImageTokens) -> tuple[Tensor, Tensor]:
        scores = image.signals[self._signal_names["score"]]
        feats, reps = [], []
        for g in view_grids(image, self._family, method=self.name):
            d, c = self._split_for(self._family, g.index.numel())
            tokens, rep = visionzip_qwen(
                image.features[g.index.to(image.features.device)], scores[g.index.to(scores.device)].float(),
                d, c, self.contextual_mode)
            feats.append(tokens)
            reps.append(g.index[rep.cpu()])
        return torch.cat(feats), torch.cat(reps)

    def _merge_llava(self, image: ImageTokens) -> tuple[Tensor, Tensor]:
        names = self._signal_names
        project = image.signals[names["projector"]]
        hidden = image.signals[names["hidden"]]
        keys = image.signals[names["keys"]]
        if hidden.dim() == 2:  # LLaVA-1.5: one view
            hidden, keys = hidden[None], keys[None]
        cls_tok = image.signals[names["cls"]].float()
        grids = view_grids(image, self._family, method=self.name)
        if len(grids) != hidden.shape[0] or any(g.size + 1 != hidden.shape[1] for g in grids):
            raise ValueError(
                "visionzip needs every view's full patch grid plus its CLS token from the encoder; it cannot "
                "follow a stage-V policy that changes the encoder tokens"
            )
        head_feats = []  # the base block, written into the base view's first slots
        crop_dom_rep, crop_dom_feat = [], []
        crop_cls, crop_ctx = [], []
        for g in grids:
            d, c = self._split_for(self._family, g.index.numel())
            valid = g.valid()
            s = g.scatter(cls_tok[g.index.to(cls_tok.device)].cpu()).to(hidden.device)
            tokens, dom = visionzip_tokens(
                hidden[g.view], s, keys[g.view], d, c, self.contextual_mode,
                patch_valid=None if bool(valid.all()) else valid.to(hidden.device))
            if g.view == 0:
                head_feats.append(tokens)
            else:
                crop_cls.append(tokens[:1])
                crop_ctx.append(tokens[d:])
                crop_dom_feat.append(tokens[1:d])
                crop_dom_rep.append(g.tokens_of(dom[1:].cpu() - 1))
        block = torch.cat(head_feats + crop_cls + crop_ctx)
        base = grids[0]
        if block.shape[0] > base.index.numel():
            raise ValueError(
                f"visionzip: the base view has {base.index.numel()} slots but the base block, the crop CLS "
                f"tokens and the crop contextual tokens need {block.shape[0]}; lower dominant/contextual"
            )
        head_rep = base.index[: block.shape[0]]
        reps = torch.cat([head_rep] + crop_dom_rep)
        feats = project(torch.cat([block] + crop_dom_feat))
        return feats, reps
