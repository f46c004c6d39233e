"""PiToMe: spectrum-preserving token merging inside the vision encoder (pure tensor kernels).

Paper: Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024,
arXiv 2405.16148. Reference implementation: github.com/hchautran/PiToMe at commit ``550b5de`` (built on
ToMe). Both are CC BY-NC 4.0: this module is a re-implementation from the design spec
(``docs/methods/pitome.md``); no reference code is copied.

Stage: **V** (inside the vision encoder, after every layer, at prefill). Text-agnostic; the only method
here that also saves ViT compute. The Qwen variant (:func:`post_merger_merge`) runs at stage **P**.

Method. Every encoder layer ``l = 0 .. l_f`` (``l_f = 22`` for LLaVA's CLIP-L/336, feature layer -2)
merges ``r = floor(T - T*rho)`` tokens:

* layers ``l <= 12``: ToMe bipartite soft matching (:func:`bsm_merge`; CLS protected, T counts CLS);
* layers ``l >= 13``: PiToMe (:func:`pitome_merge`; CLS removed first, T = non-CLS count). Each token's
  energy is the mean over all tokens of ``ELU(cos - m_l)`` with margin ``m_l = 0.9 - 0.9*l/24``; the
  ``2r`` highest-energy tokens are split alternately into A and B (energy order), every A token is
  averaged into its most similar B token, the rest is protected.

Output order (reference): after BSM ``[unmerged a (ascending), all b]``, after PiToMe
``[CLS, protected by descending energy, B by energy]``; not raster order. This is the policy's
default ``order="reference"``; ``order="source"`` (our extension) sorts by the smallest original index
a token contains (:func:`source_order`).

Final visual counts for 576 patches + CLS (23 merges, then CLS dropped):
rho 0.975/0.95/0.925/0.9/0.875/0.85 -> 330/183/101/54/30/17.

Reference vs paper vs library (spec section 5); the kernels below expose the switches, the policy
chooses:

1. Merge point: reference merges after the whole layer; paper between attention and MLP. Library
   default: after the layer (option ``merge_point="attn"``, policy/adapter level).
2. Metric: reference uses layer-output hidden states; paper attention keys (head mean). Library
   default: hidden states (option ``metric="keys"``, policy level; the kernels take any ``metric``).
3. Algorithm per layer: reference BSM for ``l <= 12`` and PiToMe after; paper PiToMe throughout (our
   reading). Library default: the reference split; ``bsm_layers`` in the schedule helpers.
4. Margin: reference ``0.9 - 0.9*l/24``; paper's exact Eq. 4 not retrieved. Library: reference
   (``margin`` callable or list in the schedule helpers).
5. Energy kernel: reference ``ELU(S - m)`` (linear branch ``S - m``); the paper's ``f_m(x) = x`` for
   ``x >= m`` is unverified and not rank-equivalent. Library: reference, no option.
6. Merge op: reference unweighted mean with ``include_self`` and no size tracking; paper size-weighted
   average (ToMe ``merge_wavg``) with optional proportional attention. Library default ``mode="mean"``;
   ``mode="wavg"`` carries sizes (``prop_attn`` is an adapter concern: ``log(size)`` as an SDPA bias).
7. ``output_attentions=True`` in every reference layer (forces eager, unused): bug, not reproduced; the
   kernels need no attention.
8. In-place edits of caller tensors in the reference (``unsqueeze_``/``transpose_``): bug; every
   function here is pure (inputs are never modified).
9. Sort stability: the reference ``argsort`` is unstable; here every sort is stable, ties go to the
   lowest index and ``argmax`` returns the first maximum. Differs only on exact ties.
10. LLaVA code status: present but flagged "under refactoring" upstream; we implement the present path.
11. FLOPs reporting: see ``vtprune/flops.py`` (not a kernel concern).

Library extensions and decisions (spec sections 4 and 6):

* Budget mode (:func:`budget_schedule`): bisection on rho (resolution 1e-4) for the smallest rho whose
  final count is ``>= N'``, then the surplus is removed at the last merge layer, spilling backwards;
  cached, a pure function of its arguments.
* Qwen2-VL / Qwen2.5-VL post-merger merging (:func:`post_merger_merge`, stage P; label results
  "PiToMe-post-merger"; not validated). Also usable for LLaVA ``at="P"``.
* Feasibility cap (library decision): the reference has no 50 % cap on r. The kernels raise when r is
  infeasible (BSM: more than the non-CLS a tokens; PiToMe: ``2r > T``), and the schedule helpers cap
  r at the feasible maximum. The cap is only reached for rho < ~0.5, outside the reference sweep.
* Scores (cosines, energies) are computed in at least fp32 (float64 stays float64); merging runs in
  the dtype of ``x``.

Policies (registered): ``"pitome"`` (:class:`PiToMe`, stage V inside the CLIP or DINOv2 tower of LLaVA-1.5 and
inside an open_clip ``VisionTransformer``; ``at="P"`` dispatches to the post-projector variant) and
``"pitome-p"`` (:class:`PiToMePost`, stage P after the projector / Qwen merger; label results
"PiToMe-post-merger"). Policy-level deviations from the reference:

* **Token order (LLaVA):** ``order="reference"`` (default) hands the LLM the tokens in the order the
  kernels produce them, layer after layer ([unmerged a, b] after BSM, [protected by energy, B by
  energy] after PiToMe), with the CLS token dropped: the reference behaviour. The policy then
  declares ``sorted_output = False`` (a property of the instance), so the hook layer emits the
  encoder's order instead of re-sorting by placeholder. ``order="source"`` (our extension) sorts the
  final tokens by the smallest original patch index they contain (the hook layer's sorted emission).
  In both orders each output token fills a distinct placeholder slot: the one of its representative,
  the smallest original patch index it contains (``placeholder_index`` = representative - CLS
  offset in the LLaVA adapter); the slots are contiguous in the shortened sequence, so the LLM
  positions are the same contiguous renumbering either way, only the features' order differs.
* **Token order (open_clip):** the open_clip adapter always sorts the final tokens by representative
  (``order="source"``) whatever the policy declares; the reference order is not reproduced there
  (``vtprune/adapters/clip_vit.py`` was outside this change; pooling with the CLS token or the mean
  does not depend on the order).
* **Tiny towers:** the reference schedule (BSM in layers 0..12 of 24, margin ``0.9 - 0.9*l/24``) is
  scaled by depth: BSM in the first ``round(13*L/24)`` layers, margin ``0.9 - 0.9*l/L`` (identical for
  L = 24). On open_clip the reference patch's defaults apply: PiToMe in every block, margin
  ``0.95 - 0.95*l/L``.
* Not implemented: ``merge_point="attn"`` (merge between attention and MLP), ``metric="keys"``.
  ``prop_attn=True`` (``log(size)`` attention bias, with size tracking) is available.
* LLaVA-NeXT (per-view merging without newlines) is not supported at stage V nor P (``ValueError``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.policy import Context, ImageTokens, MergePolicy, VisionPolicy, resolve_budget
from vtprune.registry import register
from vtprune.rows import take_rows

from ._common import PACKED_VIT_FAMILIES, QWEN_FAMILIES, check_choice, score_dtype

__all__ = [
    "MergeResult",
    "LayerMerge",
    "merge_count",
    "energy_scores",
    "bsm_merge",
    "pitome_merge",
    "init_sources",
    "source_order",
    "apply_order",
    "reference_margin",
    "reference_schedule",
    "budget_rho",
    "budget_schedule",
    "schedule_counts",
    "post_merger_plan",
    "post_merger_merge",
    "default_bsm_layers",
    "default_margins",
    "PiToMe",
    "PiToMePost",
]


class MergeResult(NamedTuple):
    """Output of one merge step.

    x: (B, N - r, C) merged tokens. sizes: (B, N - r) token sizes, or None when not tracked.
    sources: (B, N - r, N0) 0/1 membership of original tokens, or None when not tracked.
    """

    x: Tensor
    sizes: Tensor | None
    sources: Tensor | None


class LayerMerge(NamedTuple):
    """Merge plan of one encoder layer: ``algorithm`` in {"bsm", "pitome", "none"}, ``r`` tokens
    removed (output length = input length - r), ``margin`` (PiToMe energy margin; None for BSM/none)."""

    algorithm: str
    r: int
    margin: float | None


# ----------------------------------------------------------------------------------------- helpers
def merge_count(T: int, rho: float) -> int:
    """Tokens to merge at one layer: ``r = floor(T - T*rho)`` (Python float arithmetic, no cap).

    ``T`` counts the CLS token for BSM and excludes it for PiToMe. ``rho >= 1`` gives ``r <= 0``
    (callers treat ``r <= 0`` as a no-op).
    """
    return int(math.floor(T - T * rho))



def _check3(name: str, t: Tensor) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be (B, N, C); got shape {tuple(t.shape)}")


class _RowPlan(NamedTuple):
    """One layer's merge plan on the flattened (batch x token) row axis, applied alike to the features,
    sizes, sources and any per-token tracking (planned once per layer).

    rows: (B*M,) input rows copied to the output, in output order (M = N - r per sample); src: (B*r,)
    input rows merged away; dst: (B*r,) the output rows they are reduced into; batch B, length M, of
    which the first ``kept`` per sample receive nothing.
    """

    rows: Tensor
    src: Tensor
    dst: Tensor
    batch: int
    length: int
    kept: int


def _row_plan(plan: tuple[Tensor, Tensor, Tensor, Tensor], n: int) -> _RowPlan:
    """Flatten a plan ``(keep_idx (B, K), b_idx (B, nb), src_idx (B, r), dst (B, r))`` (dst indexes
    b_idx) over inputs of ``n`` tokens: the output is ``[keep ++ b]`` per sample."""
    keep_idx, b_idx, src_idx, dst = plan
    out = torch.cat([keep_idx, b_idx], dim=1)
    batch, m = out.shape
    kept = keep_idx.shape[1]
    dst = dst + kept
    if batch > 1:
        sample = torch.arange(batch, device=out.device)[:, None]
        out, src_idx, dst = out + sample * n, src_idx + sample * n, dst + sample * m
    return _RowPlan(out.reshape(-1), src_idx.reshape(-1), dst.reshape(-1), batch, m, kept)


def _apply_plan(t: Tensor, plan: _RowPlan, reduce: str) -> Tensor:
    """Output ``[t[keep]] ++ [t[b] with t[src] reduced into its destination]`` (include_self).

    t: (B, N, *rest). For feature rows (t 3-D or more), ``"sum"`` / ``"mean"`` add the sources into their
    destination rows in index order (``index_add_``) and divide the b rows by their count in t's dtype:
    the values of ``scatter_reduce(..., include_self=True)`` (tested equal in every float dtype),
    several times faster on CPU. Per-token scalars (t 2-D, e.g. sizes) and other
    reductions use ``scatter_reduce_`` itself (on half types its scalar sums round differently from
    ``index_add_``). Returns (B, M, *rest).
    """
    rest = t.shape[2:]
    flat = t.reshape((-1,) + rest)
    out = flat.index_select(0, plan.rows)
    if plan.src.numel():
        moved = flat.index_select(0, plan.src)
        if reduce in ("sum", "mean") and t.is_floating_point() and rest:
            out.index_add_(0, plan.dst, moved)
            if reduce == "mean":
                count = torch.bincount(plan.dst, minlength=out.shape[0]).add_(1).to(t.dtype)
                shape = (plan.batch, plan.length)
                out.view(shape + rest)[:, plan.kept :].div_(count.view(shape + (1,) * len(rest))[:, plan.kept :])
        else:
            idx = plan.dst.view((-1,) + (1,) * len(rest)).expand(moved.shape)
            out.scatter_reduce_(0, idx, moved, reduce=reduce, include_self=True)
    return out.view((plan.batch, plan.length) + rest)


def _merge_with_plan(
    x: Tensor,
    plan: _RowPlan,
    sizes: Tensor | None,
    mode: str,
    sources: Tensor | None,
) -> MergeResult:
    if mode == "mean":
        out = _apply_plan(x, plan, "mean")
        new_sizes = None if sizes is None else _apply_plan(sizes, plan, "sum")
    elif mode == "wavg":
        if sizes is None:
            sizes = x.new_ones(x.shape[:2])
        w = sizes.to(x.dtype).unsqueeze(-1)
        num = _apply_plan(x * w, plan, "sum")
        new_sizes = _apply_plan(sizes, plan, "sum")
        out = num / new_sizes.to(x.dtype).unsqueeze(-1)
    else:
        raise ValueError(f"mode must be 'mean' or 'wavg'; got {mode!r}")
    new_sources = None
    if sources is not None:
        new_sources = _apply_plan(sources, plan, "amax")
    return MergeResult(out, new_sizes, new_sources)


def _check_tracking(x: Tensor, sizes: Tensor | None, sources: Tensor | None) -> None:
    if sizes is not None and tuple(sizes.shape) != tuple(x.shape[:2]):
        raise ValueError(f"sizes must be (B, N) = {tuple(x.shape[:2])}; got {tuple(sizes.shape)}")
    if sources is not None and (sources.dim() != 3 or tuple(sources.shape[:2]) != tuple(x.shape[:2])):
        raise ValueError(f"sources must be (B, N, N0) with (B, N) = {tuple(x.shape[:2])}")


def _noop(x: Tensor, sizes: Tensor | None, mode: str, sources: Tensor | None) -> MergeResult:
    if mode == "wavg" and sizes is None:
        sizes = x.new_ones(x.shape[:2])
    return MergeResult(x, sizes, sources)


# ------------------------------------------------------------------------------------------- BSM
def _bsm_plan(metric: Tensor, r: int, class_token: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ToMe bipartite plan: ``(unmerged a, all b, merged a, dst)``, each (B, ·) token indices (dst
    indexes the b tokens); a = even tokens, b = odd tokens."""
    B, N, _ = metric.shape
    m = metric.to(score_dtype(metric), copy=True)  # this function's own buffer: normalised in place
    v = m.div_(m.norm(dim=-1, keepdim=True))  # plain division (reference)
    S = torch.bmm(v[:, 0::2], v[:, 1::2].transpose(1, 2))  # (B, Na, Nb)
    if class_token:
        S[:, 0].fill_(-math.inf)
    node_max, node_idx = S.max(dim=-1)  # index of the first maximum (as argmax)
    edge = torch.argsort(node_max, dim=-1, descending=True, stable=True)
    src = edge[:, :r]
    unm = edge[:, r:]
    if class_token:
        unm = unm.sort(dim=-1, stable=True).values
    dst = node_idx.gather(-1, src)
    b_idx = torch.arange(1, N, 2, device=metric.device).expand(B, -1)
    return (unm * 2, b_idx, src * 2, dst)


def bsm_merge(
    x: Tensor,
    metric: Tensor,
    r: int,
    class_token: bool = True,
    sizes: Tensor | None = None,
    mode: str = "mean",
    sources: Tensor | None = None,
) -> MergeResult:
    """ToMe bipartite soft matching as in the reference LLaVA ``clip_hf`` path.

    x: (B, N, C) tokens (CLS at index 0 when ``class_token``); metric: (B, N, Cm); r: tokens to
    remove (``merge_count(N, rho)``, N counting the CLS). sizes: optional (B, N); sources: optional
    (B, N, N0) 0/1. Returns :class:`MergeResult` with x (B, N - r, C) ordered
    ``[unmerged a (ascending index when class_token, else by descending similarity), all b]``.
    ``mode="mean"``: unweighted mean including the b token; ``"wavg"``: size-weighted (ToMe).
    """
    _check3("x", x)
    _check3("metric", metric)
    _check_tracking(x, sizes, sources)
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError("x and metric must share (B, N)")
    if r <= 0:
        return _noop(x, sizes, mode, sources)
    n_a = (x.shape[1] + 1) // 2
    max_r = n_a - (1 if class_token else 0)
    if x.shape[1] // 2 == 0 or r > max_r:
        raise ValueError(f"BSM: r={r} infeasible for N={x.shape[1]} (max {max_r})")
    plan = _row_plan(_bsm_plan(metric, r, class_token), x.shape[1])
    return _merge_with_plan(x, plan, sizes, mode, sources)


# ---------------------------------------------------------------------------------------- PiToMe
def energy_scores(sim: Tensor, margin: float) -> Tensor:
    """PiToMe energy: ``E_i = mean_j ELU(S_ij - margin; alpha=1)``.

    sim: (..., T, T) cosine similarities (self-similarity included). Returns (..., T) in the dtype of
    ``sim`` promoted to at least fp32.
    """
    s = sim.to(score_dtype(sim))
    return F.elu(s - margin, alpha=1.0, inplace=True).mean(dim=-1)  # in place on the fresh s - margin


def _pitome_plan(metric: Tensor, r: int, margin: float, class_token: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PiToMe plan: ``([CLS] ++ protected, B set, A set, dst)``, each (B, ·) token indices (dst indexes
    the B set)."""
    B = metric.shape[0]
    off = 1 if class_token else 0
    m = metric[:, off:].to(score_dtype(metric), copy=True)  # own buffer: normalised in place
    v = m.div_(m.norm(2, dim=-1, keepdim=True).clamp_min_(1e-12))  # F.normalize's arithmetic
    S = torch.bmm(v, v.transpose(1, 2))  # (B, T, T)
    E = energy_scores(S, margin)
    order = torch.argsort(E, dim=-1, descending=True, stable=True)
    A, Bset = order[:, 0 : 2 * r : 2], order[:, 1 : 2 * r : 2]
    protected = order[:, 2 * r :]
    S_ab = take_rows(S, A).gather(2, Bset.unsqueeze(1).expand(-1, r, -1))  # (B, r, r)
    dst = S_ab.argmax(dim=-1)  # first maximum, index into B
    keep = protected + off
    if class_token:
        keep = torch.cat([keep.new_zeros(B, 1), keep], dim=1)
    return (keep, Bset + off, A + off, dst)


def pitome_merge(
    x: Tensor,
    metric: Tensor,
    r: int,
    margin: float,
    class_token: bool = True,
    sizes: Tensor | None = None,
    mode: str = "mean",
    sources: Tensor | None = None,
) -> MergeResult:
    """PiToMe energy-based merge (reference ``pitome`` step).

    x: (B, N, C) (CLS at index 0 when ``class_token``; it is removed before scoring and never
    merged); metric: (B, N, Cm); r: tokens to remove (``merge_count(N - 1, rho)`` with a CLS);
    margin: energy margin. The 2r highest-energy tokens form A = merge[0::2], B = merge[1::2]
    (energy order) and every A token is merged into its most similar B token.
    Returns :class:`MergeResult` with x (B, N - r, C) = ``[CLS] ++ protected (descending energy) ++
    merged B (energy order)``. sizes (B, N) / sources (B, N, N0) optional as in :func:`bsm_merge`.
    """
    _check3("x", x)
    _check3("metric", metric)
    _check_tracking(x, sizes, sources)
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError("x and metric must share (B, N)")
    if r <= 0:
        return _noop(x, sizes, mode, sources)
    T = x.shape[1] - (1 if class_token else 0)
    if 2 * r > T:
        raise ValueError(f"PiToMe: 2r={2 * r} exceeds T={T}")
    plan = _row_plan(_pitome_plan(metric, r, margin, class_token), x.shape[1])
    return _merge_with_plan(x, plan, sizes, mode, sources)


# -------------------------------------------------------------------------------- source tracking
def init_sources(batch: int, n: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Identity membership (B, n, n): token i contains original token i."""
    return torch.eye(n, dtype=dtype, device=device).unsqueeze(0).expand(batch, n, n).clone()


def source_order(sources: Tensor) -> Tensor:
    """Permutation (B, N) sorting tokens by the smallest original index they contain.

    sources: (B, N, N0) 0/1 membership. Used for ``order="source"`` (our extension).
    """
    first = (sources > 0).to(torch.uint8).argmax(dim=-1)  # first original index present
    return torch.argsort(first, dim=-1, stable=True)


def apply_order(t: Tensor, perm: Tensor) -> Tensor:
    """Reorder tokens: t (B, N, *rest), perm (B, N) -> (B, N, *rest)."""
    return take_rows(t, perm)


# ------------------------------------------------------------------------------------- schedules
def reference_margin(layer: int, n_layers: int = 24) -> float:
    """Reference margin ``0.9 - 0.9*l/24`` (``n_layers`` = 24 for CLIP-L)."""
    return 0.9 - 0.9 * layer / n_layers


def _bsm_cap(T: int) -> int:
    # non-CLS a tokens: ceil(T/2) - 1
    return max((T + 1) // 2 - 1, 0)


def _pitome_cap(T_total: int) -> int:
    return max((T_total - 1) // 2, 0)


def _norm_options(n_layers, bsm_layers, margin):
    if bsm_layers is None:
        bsm_layers = frozenset(range(13))
    else:
        bsm_layers = frozenset(int(b) for b in bsm_layers)
    if margin is None:
        margins = None
    elif callable(margin):
        margins = margin
    else:
        margins = tuple(float(m) for m in margin)
    return bsm_layers, margins


def _margin_at(l: int, n_layers: int, margins) -> float:
    if margins is None:
        return reference_margin(l, n_layers)
    if callable(margins):
        return float(margins(l))
    return margins[l]


def _rho_plan(rho, n_tokens, n_layers, feature_layer, bsm_layers, margins) -> tuple[LayerMerge, ...]:
    out = []
    N = n_tokens
    for l in range(feature_layer + 1):
        if rho >= 1:
            out.append(LayerMerge("none", 0, None))
            continue
        if l in bsm_layers:
            r = min(max(merge_count(N, rho), 0), _bsm_cap(N))
            out.append(LayerMerge("bsm", r, None))
        else:
            r = min(max(merge_count(N - 1, rho), 0), _pitome_cap(N))
            out.append(LayerMerge("pitome", r, _margin_at(l, n_layers, margins)))
        N -= r
    return tuple(out)


def schedule_counts(schedule: Sequence[LayerMerge], n_tokens: int = 577) -> list[int]:
    """Token counts (CLS included) ``[n_tokens, after layer 0, ..., after the last layer]``."""
    counts = [n_tokens]
    for step in schedule:
        counts.append(counts[-1] - step.r)
    return counts


def reference_schedule(
    rho: float,
    n_tokens: int = 577,
    n_layers: int = 24,
    feature_layer: int = 22,
    *,
    bsm_layers: Sequence[int] | None = None,
    margin: Callable[[int], float] | Sequence[float] | None = None,
) -> tuple[LayerMerge, ...]:
    """Per-layer plan for layers ``0 .. feature_layer`` at a fixed keep ratio ``rho``.

    BSM with ``r = floor(T - T*rho)`` (T with CLS) in ``bsm_layers`` (default ``l <= 12``), PiToMe with
    ``r = floor(T - T*rho)`` (T without CLS) and margin ``0.9 - 0.9*l/n_layers`` elsewhere. ``rho >= 1``
    gives "none" everywhere. r is capped at the feasible maximum (library decision).
    Returns a tuple of :class:`LayerMerge`, one per layer.
    """
    bl, mg = _norm_options(n_layers, bsm_layers, margin)
    return _cached_rho_plan(float(rho), int(n_tokens), int(n_layers), int(feature_layer), bl, mg)


@lru_cache(maxsize=256)
def _cached_rho_plan(rho, n_tokens, n_layers, feature_layer, bsm_layers, margins):
    return _rho_plan(rho, n_tokens, n_layers, feature_layer, bsm_layers, margins)


def _feasible(plan: Sequence[LayerMerge], n_tokens: int) -> bool:
    N = n_tokens
    for step in plan:
        if step.algorithm == "bsm" and step.r > _bsm_cap(N):
            return False
        if step.algorithm == "pitome" and step.r > _pitome_cap(N):
            return False
        N -= step.r
    return True


@lru_cache(maxsize=256)
def _cached_budget(n_keep, n_tokens, n_layers, feature_layer, bsm_layers, margins):
    def final(rho):
        plan = _cached_rho_plan(rho, n_tokens, n_layers, feature_layer, bsm_layers, margins)
        return schedule_counts(plan, n_tokens)[-1] - 1

    if n_keep >= n_tokens - 1:
        return 1.0, _cached_rho_plan(1.0, n_tokens, n_layers, feature_layer, bsm_layers, margins)
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        if final(mid) >= n_keep:
            hi = mid
        else:
            lo = mid
    rho = hi
    plan = list(_cached_rho_plan(rho, n_tokens, n_layers, feature_layer, bsm_layers, margins))
    surplus = final(rho) - n_keep
    for l in range(len(plan) - 1, -1, -1):
        if surplus <= 0:
            break
        step = plan[l]
        if step.algorithm == "none":
            continue
        for extra in range(surplus, 0, -1):
            trial = list(plan)
            trial[l] = step._replace(r=step.r + extra)
            if _feasible(trial, n_tokens):
                plan = trial
                surplus -= extra
                break
    if surplus != 0:
        raise ValueError(f"budget {n_keep} not reachable from {n_tokens} tokens")
    return rho, tuple(plan)


def _budget(n_keep, n_tokens, n_layers, feature_layer, bsm_layers, margin):
    if n_keep < 1:
        raise ValueError("n_keep must be >= 1")
    bl, mg = _norm_options(n_layers, bsm_layers, margin)
    return _cached_budget(int(n_keep), int(n_tokens), int(n_layers), int(feature_layer), bl, mg)


def budget_rho(
    n_keep: int,
    n_tokens: int = 577,
    n_layers: int = 24,
    feature_layer: int = 22,
    *,
    bsm_layers: Sequence[int] | None = None,
    margin: Callable[[int], float] | Sequence[float] | None = None,
) -> float:
    """The rho found by the budget bisection of :func:`budget_schedule` (1.0 when nothing is cut)."""
    return _budget(n_keep, n_tokens, n_layers, feature_layer, bsm_layers, margin)[0]


def budget_schedule(
    n_keep: int,
    n_tokens: int = 577,
    n_layers: int = 24,
    feature_layer: int = 22,
    *,
    bsm_layers: Sequence[int] | None = None,
    margin: Callable[[int], float] | Sequence[float] | None = None,
) -> tuple[LayerMerge, ...]:
    """Exact-budget plan (library extension): final visual count (CLS dropped) == ``n_keep``.

    Bisects rho on [0, 1] to resolution 1e-4 for the smallest rho whose final count is ``>= n_keep``,
    then removes the surplus at the last merge layer (respecting ``2r <= T`` and the feasibility of
    every later layer), spilling any remainder to the layers before it. Cached (pure function of its
    arguments). Returns a tuple of :class:`LayerMerge` for layers ``0 .. feature_layer``.
    """
    return _budget(n_keep, n_tokens, n_layers, feature_layer, bsm_layers, margin)[1]


# ------------------------------------------------------------------------ post-merger (stage P)
def post_merger_plan(n_tokens: int, n_keep: int, margin: float = 0.9) -> list[tuple[int, float]]:
    """Steps ``(r_j, m_j)`` taking ``n_tokens`` to ``n_keep``: ``r_j = min(floor(T_j/2), T_j - N')``,
    ``m_j = margin - margin*j/J`` with J = the number of planned steps (our choice; margin 0.9)."""
    if n_keep < 1:
        raise ValueError("n_keep must be >= 1")
    rs = []
    T = n_tokens
    while T > n_keep:
        r = min(T // 2, T - n_keep)
        rs.append(r)
        T -= r
    J = len(rs)
    return [(r, margin - margin * j / J) for j, r in enumerate(rs)]


def post_merger_merge(y: Tensor, n_keep: int, mode: str = "mean", margin: float = 0.9) -> tuple[Tensor, Tensor]:
    """PiToMe after the Qwen merger / LLaVA projector (stage P, library extension; no CLS).

    y: (n, D) merged tokens of one image in raster order, or (B, n, D). Applies PiToMe steps
    (class_token=False, metric = current tokens, unweighted mean by default) following
    :func:`post_merger_plan`. Each output token is represented by its B destination token (or itself
    if protected). Returns ``(tokens, rep)``: tokens (N', D) [or (B, N', D)] sorted by the
    representative's original index, and rep (N',) [or (B, N')] those sorted original indices (long).
    """
    squeeze = y.dim() == 2
    z = y.unsqueeze(0) if squeeze else y
    _check3("y", z)
    B, n, _ = z.shape
    rep = torch.arange(n, device=z.device).expand(B, n)
    for r, m in post_merger_plan(n, n_keep, margin):
        plan = _row_plan(_pitome_plan(z, r, m, class_token=False), z.shape[1])
        z = _merge_with_plan(z, plan, None, mode, None).x
        rep = rep.reshape(-1).index_select(0, plan.rows).view(B, -1)  # an output token's B token or itself
    perm = torch.argsort(rep, dim=-1, stable=True)
    z = take_rows(z, perm)
    rep = rep.gather(1, perm)
    if squeeze:
        return z[0], rep[0]
    return z, rep


# ---------------------------------------------------------------------------------------- policies
_REF_DEPTH = 24  # CLIP-L/336 of LLaVA-1.5
_REF_BSM = 13  # BSM in layers 0..12 of 24


def default_bsm_layers(family: str, depth: int) -> tuple[int, ...]:
    """Reference split scaled by depth: the first ``round(13*L/24)`` layers (0..12 of 24) use BSM;
    none on open_clip (``family="clip_vit"``: the reference open_clip patch uses PiToMe throughout)."""
    if family == "clip_vit":
        return ()
    return tuple(range(round(_REF_BSM * depth / _REF_DEPTH)))


def default_margins(family: str, depth: int, scale: float | None = None) -> tuple[float, ...]:
    """Per-layer margins ``m - m*l/L``: m = 0.9 (LLaVA reference), 0.95 (open_clip reference)."""
    m = (0.95 if family == "clip_vit" else 0.9) if scale is None else float(scale)
    return tuple(m - m * l / depth for l in range(depth))


@dataclass
class _PiToMeRequest:
    """Per-request state of a stage-V PiToMe policy (``Context.policy_state``).

    plan: one :class:`LayerMerge` per encoder layer. minsrc: (V, N) smallest original token index each
    current token contains. sizes: (V, N) token sizes, tracked for ``mode="wavg"`` / ``prop_attn``.
    """

    plan: tuple[LayerMerge, ...]
    minsrc: Tensor
    sizes: Tensor | None


@register
@dataclass
class PiToMe(VisionPolicy):
    """PiToMe (Tran et al., NeurIPS 2024, arXiv 2405.16148): stage V, energy-based token merging after
    every encoder layer (CLIP or DINOv2 tower of LLaVA-1.5; open_clip ``VisionTransformer``).

    Fields:
        ratio: per-layer keep ratio rho (``r = floor(T - T*rho)`` per layer; reference LLaVA sweep
            0.85..0.975; >= 1 is a no-op). Ignored when ``keep`` is set.
        keep: budget mode (library extension): exact visual-token count per image at the output
            (int), or a fraction of the visual tokens in (float); uses :func:`budget_schedule`.
        bsm_layers: layers using ToMe bipartite matching: an int k (the first k layers), a tuple of
            layer indices, or None (reference split scaled by depth, see :func:`default_bsm_layers`).
        margin: energy margin scale m (``m_l = m - m*l/L``) or a tuple of per-layer margins; None =
            0.9 (LLaVA) / 0.95 (open_clip).
        mode: ``"mean"`` (reference, unweighted) or ``"wavg"`` (size-weighted, sizes tracked).
        prop_attn: add ``log(size)`` to the attention logits of the following layers (ToMe's
            proportional attention; tracks sizes in either mode).
        order: ``"reference"`` (default: the tokens reach the LLM in the order the merge kernels
            produce, CLS dropped; declared to the hook layer with ``sorted_output = False``) or
            ``"source"`` (our extension: sorted by the smallest original patch index they contain).
        at: ``"V"`` (this policy) or ``"P"``, which returns a :class:`PiToMePost` (``keep``,
            ``mode`` only; ``keep`` defaults to 0.25).

    Deviations (module docstring): on open_clip the tokens are always in source order (adapter);
    depth-scaled schedule on towers that are not 24 deep; stable sorts (ties by the lowest index); merging
    after the whole layer with hidden-state metric only (``merge_point="attn"``, ``metric="keys"`` not
    implemented); no ``output_attentions`` (SDPA stays on).
    """

    name: ClassVar[str] = "pitome"
    description: ClassVar[str] = "PiToMe: energy-based token merging inside the CLIP / DINOv2 vision encoder (stage V; at=P: pitome-p)"
    families: ClassVar[tuple[str, ...]] = ("llava", "clip_vit")
    ratio: float = 0.9
    keep: int | float | None = None
    bsm_layers: int | tuple[int, ...] | None = None
    margin: float | tuple[float, ...] | None = None
    mode: str = "mean"
    prop_attn: bool = False
    order: str = "reference"
    at: str = "V"

    #: the stage knob was called ``stage=`` before it took the name every multi-stage method uses
    renamed: ClassVar[dict[str, str]] = {"stage": "at"}

    def __new__(cls, *args, **kwargs):
        if "stage" in kwargs:
            raise ValueError("pitome: the stage knob is called at= (as for random): use at='V' or at='P'")
        at = kwargs.get("at", "V")
        if at == "P":
            extra = sorted(k for k in kwargs if k not in ("at", "keep", "mode", "positions"))
            if extra or args:
                raise ValueError(f"pitome: at='P' (post-merger) takes keep and mode only, not {', '.join(extra)}")
            keep = kwargs.get("keep")
            return PiToMePost(keep=0.25 if keep is None else keep, mode=kwargs.get("mode", "mean"),
                              positions=kwargs.get("positions", "auto"))
        if at != "V":
            raise ValueError(f"pitome: at={at!r}; choose 'V' (inside the vision encoder) or 'P' (post-merger)")
        return super().__new__(cls)

    def validate(self, family: str, adapter: Any) -> None:
        if family in PACKED_VIT_FAMILIES or family in ("llava_next", "llava_onevision"):
            raise ValueError(
                f"pitome: stage-V merging is not supported on {family!r} "
                + ("(packed, windowed ViT); use at='P' (or 'pitome-p'), the post-merger variant"
                   if family in PACKED_VIT_FAMILIES else
                   "(SigLIP tower without a CLS token; stage V needs a CLIP or DINOv2 tower); use at='P' "
                   "(or 'pitome-p'), the post-merger variant" if family == "llava_onevision" else
                   "(per-view merging without newlines is not implemented); supported: llava, open_clip ViT")
            )
        super().validate(family, adapter)  # the tower runs stage V (LLaVA: CLIP or DINOv2, else ValueError)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not self.ratio > 0:
            raise ValueError(f"pitome: ratio={self.ratio!r} must be a float > 0 (per-layer keep ratio; >= 1: no-op)")
        if self.keep is not None:
            resolve_budget(self.keep, 10**9)  # type/range check
        check_choice("pitome", "mode", self.mode, ("mean", "wavg"))
        check_choice("pitome", "order", self.order, ("reference", "source"))
        if isinstance(self.bsm_layers, bool) or (isinstance(self.bsm_layers, int) and self.bsm_layers < 0):
            raise ValueError(f"pitome: bsm_layers={self.bsm_layers!r}; use an int k >= 0 (first k layers) or a tuple")

    @property
    def sorted_output(self) -> bool:
        """False for ``order="reference"``: the hook layer keeps the encoder's token order."""
        return self.order != "reference"

    def layers(self, num_layers: int) -> list[int]:
        return list(range(num_layers))

    # ---------------------------------------------------------------- per request
    def _plan(self, family: str, depth: int, last: int, n_tokens: int, drop_cls: bool) -> tuple[LayerMerge, ...]:
        if self.bsm_layers is None:
            bsm = default_bsm_layers(family, depth)
        elif isinstance(self.bsm_layers, int):
            bsm = tuple(range(self.bsm_layers))
        else:
            bsm = tuple(int(b) % depth for b in self.bsm_layers)
        if self.margin is None or isinstance(self.margin, (int, float)):
            margins = default_margins(family, depth, self.margin)
        else:
            margins = tuple(float(m) for m in self.margin)
            if len(margins) < last + 1:
                raise ValueError(f"pitome: margin has {len(margins)} entries; this tower merges in {last + 1} layers")
        if self.keep is None:
            return reference_schedule(self.ratio, n_tokens, depth, last, bsm_layers=bsm, margin=margins)
        n_vis = n_tokens - 1 if drop_cls else n_tokens
        k = resolve_budget(self.keep, n_vis)
        n_keep = k if drop_cls else k - 1  # the schedule counts tokens without the CLS token
        if n_keep < 1:
            raise ValueError(f"pitome: keep={self.keep} leaves no patch token besides the CLS token")
        return budget_schedule(n_keep, n_tokens, depth, last, bsm_layers=bsm, margin=margins)

    def _state(self, x: Tensor, ctx: Context) -> "_PiToMeRequest":
        """This request's plan and token tracking (created at the first merge layer)."""
        def start() -> _PiToMeRequest:
            v, n, _ = x.shape
            vit = ctx.vit
            if vit is None:
                raise RuntimeError("pitome: the adapter did not describe the vision tower (Context.vit)")
            return _PiToMeRequest(
                plan=self._plan(ctx.family, vit.layers, vit.last_layer, vit.tokens, vit.drop_cls),
                minsrc=torch.arange(n, device=x.device).expand(v, n),
                sizes=x.new_ones((v, n)) if (self.mode == "wavg" or self.prop_attn) else None,
            )
        return ctx.policy_state(self, start)

    def after_layer(self, layer: int, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor] | None:
        st = self._state(x, ctx)
        plan = st.plan
        if layer >= len(plan) or plan[layer].r <= 0:
            return None
        step = plan[layer]
        n = x.shape[1]
        if step.algorithm == "bsm":
            merge = _row_plan(_bsm_plan(x, step.r, class_token=True), n)
        else:
            merge = _row_plan(_pitome_plan(x, step.r, step.margin, class_token=True), n)
        res = _merge_with_plan(x, merge, st.sizes, self.mode, None)
        # representative = the input token holding the smallest original index of each output token;
        # original indices are distinct, so one min over (index * n + position) gives both. The output
        # stays in the kernel's order (order="reference"; "source" is sorted by the hook layer)
        key = _apply_plan(st.minsrc * n + torch.arange(n, device=x.device), merge, "amin")
        st.minsrc, reps = key.div(n, rounding_mode="floor"), key.remainder(n)
        st.sizes = res.sizes
        if self.prop_attn:
            ctx.attn_log_size = torch.log(res.sizes.float())
        return res.x, reps


@register
@dataclass
class PiToMePost(MergePolicy):
    """PiToMe after the projector / Qwen merger (stage P; library extension, label results
    "PiToMe-post-merger"; not validated): repeated PiToMe steps without a CLS token on the image's
    projected tokens (:func:`post_merger_merge`) down to ``keep`` tokens; each output token takes the
    slot (and, on Qwen, the original M-RoPE position) of its representative (its B destination, or
    itself if protected). Families: LLaVA-1.5 (``pitome:at=P``), Qwen2-VL, Qwen2.5-VL,
    LLaVA-OneVision (the candidate tokens of all views of an image, base view and AnyRes canvas, are
    merged as one set; newlines kept; a video with ``quota="video"`` is merged across its frames).

    Fields: ``keep`` (tokens per image or a fraction, default 0.25), ``mode`` (``"mean"`` / ``"wavg"``),
    ``positions`` (stage-P convention; ``"auto"``).
    """

    name: ClassVar[str] = "pitome-p"
    description: ClassVar[str] = "PiToMe post-merger: energy-based merging of the projected tokens (stage P)"
    families: ClassVar[tuple[str, ...]] = ("llava",) + QWEN_FAMILIES + ("llava_onevision", "llava_onevision1_5")
    keep: int | float = 0.25
    mode: str = "mean"
    margin: float = 0.9

    def validate(self, family: str, adapter: Any) -> None:
        if family == "llava_next":
            raise ValueError("pitome-p: LLaVA-NeXT is not supported (per-view merging is not implemented)")
        super().validate(family, adapter)
        check_choice("pitome-p", "mode", self.mode, ("mean", "wavg"))

    def merge(self, image: ImageTokens, n_keep: int, ctx: Context) -> tuple[Tensor, Tensor]:
        cand = image.candidate_index()
        tokens, rep = post_merger_merge(image.features[cand.to(image.features.device)], n_keep, self.mode,
                                        float(self.margin))
        return tokens, cand[rep.cpu()]
