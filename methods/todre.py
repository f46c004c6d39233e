"""ToDRE: token diversity before the LLM (stage P), task relevance inside it (stage D).

Paper: Li, Yang, Zhang, Shao, Lu, "ToDRE: Effective Visual Token Pruning via Token Diversity and Task
Relevance", arXiv 2505.18757. v1 uses greedy **k-center** diversification; v2 greedy **max-sum**
(Algorithm 1). The project's design card names "ToDRE k-center", so the default diversity rule is
k-center (v1, farthest-first traversal, our reading of its abstract) and max-sum (v2) is
``diversity="maxsum"``. There is **no public reference code**: everything the text leaves open is
"our reading" and configurable. Spec: ``docs/methods/todre.md``.

Stage 1 (per image, after the projector): from the ℓ2-normalised candidate features, start at a pivot
(the token the vision encoder's CLS attends to most) and greedily add the token farthest (``1 - cos``)
from its nearest chosen token (k-center; max-sum: the smallest cumulative cosine similarity to the
chosen set), until ``k`` tokens are chosen.

Stage 2 (per sample, at prefill, decoder layer ``ℓ = round(7L/8) - 1``): with ``A`` the head-averaged
attention probabilities, ``α_t→v`` = share of the text rows' mass on visual keys and ``α_v→t`` = share
of the visual rows' mass on text keys. If both are ``< τ`` (strict, τ = 0.10), every visual token is
removed from the hidden states entering layer ℓ+1 and later (survivors keep their positions).
Causality caveat: with the text after the image, ``α_v→t ≡ 0``; the literal formula is implemented.

The module holds the pure tensor kernels and, at the end, the registered policies :class:`ToDRE`
(``"todre"``: stage 1 at P plus, by default, stage 2 at D) and :class:`ToDRERelevance`
(``"todre-relevance"``, stage 2 alone). Their docstrings list the wiring choices and deviations.

Choices (spec section 5), default first:

1. diversity rule: ``"kcenter"`` (v1, the design card; farthest-first traversal, our reading) |
   ``"maxsum"`` (v2 Alg. 1).
2. pivot layer: LLaVA layer 22 = ``vision_feature_layer`` (our reading of "last layer") | 23 (policy).
3. CLS head reduction: mean over heads of the full softmax row, CLS column dropped (our reading;
   :func:`cls_attention`); only the argmax is used.
4. pivot without CLS (Qwen): ``"farthest"`` = the token with the lowest cosine to the mean of the
   ℓ2-normalised candidates (our choice; "mean candidate feature" read on the normalised rows)
   | ``"random"`` (seeded) | ``"center"`` | ``"attention"`` (argmax of HiPrune-style received
   attention; use :func:`cls_pivot` on those scores).
5. NeXT pool: base view + valid crop tokens, newlines excluded (our reading); the pivot is the argmax
   over the **base view only** (``cls_pivot(..., n_base=576)``; the base view comes first in the pool).
6. budget: ``k = min(n, max(1, round(keep*n)))`` for a fraction, ``min(n, keep)`` for a count
   | ``nominal_tokens`` (e.g. 2880: ``round(keep*2880)``, capped at n; the paper's "up to").
7. kept order: ``"sorted"`` ascending (our reading) | ``"greedy"`` (selection order).
8. stage-2 layer: single layer ``round(7L/8)`` 1-based (our reading) | ``relevance_layer``,
   ``relevance_scan="from"`` (policy).
9. ``α_v→t``: literal formula | ``relevance="off"`` (policy).
10. positions after stage 2: original positions (our reading; wiring).

Scores and greedy accumulators are fp32 (fp64 inputs stay fp64); ties go to the lowest index.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.policy import FAMILIES, Context, DecoderPolicy, DecoderView, ImageTokens, Policy, TokenPolicy
from vtprune.registry import register

from ._common import (LLAVA_FAMILIES, PLAIN_VIT_FAMILIES, check_choice, first_argmax, llava_feature_layer,
                      resolve_layer, score_dtype)

__all__ = [
    "cls_attention",
    "cls_pivot",
    "farthest_pivot",
    "center_pivot",
    "random_pivot",
    "todre_budget",
    "maxsum_select",
    "kcenter_select",
    "diversity_select",
    "relevance_layer_index",
    "relevance_ratios",
    "should_drop_visual",
]

Order = Literal["sorted", "greedy"]



def _first_argmin(s: Tensor) -> int:
    return first_argmax(-s)


def _unit_rows(features: Tensor, dtype: torch.dtype | None) -> Tensor:
    if features.dim() != 2:
        raise ValueError(f"features must be (n, D), got {tuple(features.shape)}")
    return F.normalize(features.to(score_dtype(features, dtype)), dim=-1)


# --------------------------------------------------------------------------------------------------
# Pivots
# --------------------------------------------------------------------------------------------------
def cls_attention(probs_cls_row: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """CLS attention per patch: (..., H, T) softmax row of the CLS query over all T keys (CLS key
    included) -> (..., T-1): mean over heads, CLS column dropped (our reading)."""
    if probs_cls_row.dim() < 2:
        raise ValueError("probs_cls_row must be (..., H, T)")
    return probs_cls_row.to(score_dtype(probs_cls_row, dtype)).mean(dim=-2)[..., 1:]


def cls_pivot(cls_attn: Tensor, *, n_base: int | None = None) -> int:
    """Pivot = argmax of the CLS attention (lowest index on ties).

    ``cls_attn`` (n,): one score per candidate, in candidate-pool order (CLS column already dropped).
    ``n_base``: only the first ``n_base`` entries compete (LLaVA-NeXT: the base view's 576 tokens,
    which come first in the pool, so the index is already a pool index). Video: pass all frames
    (global argmax). Returns a Python int.
    """
    if cls_attn.dim() != 1:
        raise ValueError("cls_attn must be 1-D (n,)")
    s = cls_attn if n_base is None else cls_attn[:n_base]
    return first_argmax(s)


def farthest_pivot(features: Tensor, *, dtype: torch.dtype | None = None) -> int:
    """``pivot="farthest"`` (Qwen default, no CLS): (n, D) features -> the index whose cosine to the
    mean of the ℓ2-normalised rows is the lowest (lowest index on ties)."""
    x = _unit_rows(features, dtype)
    return _first_argmin(x @ x.mean(dim=0))


def center_pivot(features: Tensor, *, dtype: torch.dtype | None = None) -> int:
    """``pivot="center"``: (n, D) -> the index with the highest cosine to the mean normalised row."""
    x = _unit_rows(features, dtype)
    return first_argmax(x @ x.mean(dim=0))


def random_pivot(n: int, *, seed: int = 0) -> int:
    """``pivot="random"``: a uniform index in [0, n), reproducible from ``seed`` (CPU generator)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    g = torch.Generator().manual_seed(seed)
    return int(torch.randint(n, (1,), generator=g))


# --------------------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------------------
def todre_budget(n: int, keep: int | float, *, nominal_tokens: int | None = None) -> int:
    """Stage-1 budget ``k`` for a pool of ``n`` candidates.

    Fraction: ``min(n, max(1, round(keep * n)))`` (Python half-to-even); with ``nominal_tokens``
    (e.g. 2880 for NeXT) ``min(n, max(1, round(keep * nominal_tokens)))``. Count: ``min(n, keep)``.
    """
    if isinstance(keep, bool):
        raise TypeError("keep must be an int or a float")
    if isinstance(keep, int):
        if keep < 0:
            raise ValueError("keep must be >= 0")
        return min(n, keep)
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"a fractional keep must be in [0, 1], got {keep}")
    base = n if nominal_tokens is None else nominal_tokens
    return min(n, max(1, int(round(keep * base))))


def _check_k_pivot(n: int, k: int, pivot: int) -> None:
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if not 0 <= pivot < n:
        raise ValueError(f"pivot must be in [0, {n}), got {pivot}")


def _finish(chosen: list[int], order: Order, device: torch.device) -> Tensor:
    out = torch.tensor(chosen, dtype=torch.long, device=device)
    if order == "sorted":
        return torch.sort(out).values
    if order == "greedy":
        return out
    raise ValueError(f"unknown order {order!r}")


def maxsum_select(
    features: Tensor,
    k: int,
    pivot: int,
    order: Order = "sorted",
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Greedy max-sum diversification (v2 Algorithm 1; ``diversity="maxsum"``).

    ``features`` (n, D) candidate features (normalised here); ``pivot`` the first pick. Each step adds
    the unselected token with the smallest cumulative cosine similarity to the selected set (lowest
    index on ties). Returns (k,) LongTensor, ascending (``"sorted"``) or in selection order
    (``"greedy"``).
    """
    x = _unit_rows(features, dtype)
    n = x.shape[0]
    _check_k_pivot(n, k, pivot)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    chosen = [int(pivot)]
    s = x @ x[pivot]
    s[pivot] = float("inf")
    for _ in range(k - 1):
        c = _first_argmin(s)
        chosen.append(c)
        s = s + x @ x[c]
        s[c] = float("inf")
    return _finish(chosen, order, features.device)


def kcenter_select(
    features: Tensor,
    k: int,
    pivot: int,
    order: Order = "sorted",
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Greedy k-center / farthest-first traversal (v1, the default ``diversity="kcenter"``; our reading).

    ``features`` (n, D); distance ``1 - cos``. Each step adds the token whose distance to its nearest
    selected token is the largest (lowest index on ties). Returns (k,) LongTensor as
    :func:`maxsum_select`.
    """
    x = _unit_rows(features, dtype)
    n = x.shape[0]
    _check_k_pivot(n, k, pivot)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=features.device)
    chosen = [int(pivot)]
    dmin = 1 - x @ x[pivot]
    dmin[pivot] = float("-inf")
    for _ in range(k - 1):
        c = first_argmax(dmin)
        chosen.append(c)
        dmin = torch.minimum(dmin, 1 - x @ x[c])
        dmin[c] = float("-inf")
    return _finish(chosen, order, features.device)


def diversity_select(
    features: Tensor,
    k: int,
    pivot: int,
    diversity: Literal["maxsum", "kcenter"] = "kcenter",
    order: Order = "sorted",
    *,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Dispatch to :func:`kcenter_select` (default, v1) or :func:`maxsum_select` (v2)."""
    if diversity == "maxsum":
        return maxsum_select(features, k, pivot, order, dtype=dtype)
    if diversity == "kcenter":
        return kcenter_select(features, k, pivot, order, dtype=dtype)
    raise ValueError(f"unknown diversity {diversity!r}")


# --------------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------------
def relevance_layer_index(num_layers: int) -> int:
    """0-based stage-2 layer ``round(7L/8) - 1`` (1-based ``round(7L/8)``, Python rounding; our
    reading): 32 -> 27, 40 -> 34, 28 -> 23, 36 -> 31."""
    return int(round(7 * num_layers / 8)) - 1


def _as_index(idx: Tensor | Sequence[int], device: torch.device) -> Tensor:
    t = torch.as_tensor(idx, device=device)
    if t.dtype == torch.bool:
        return t.nonzero().reshape(-1)
    return t.long().reshape(-1)


def relevance_ratios(
    attn_probs: Tensor,
    sys_idx: Tensor | Sequence[int],
    vis_idx: Tensor | Sequence[int],
    txt_idx: Tensor | Sequence[int],
    *,
    query_positions: Tensor | Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-modal attention shares ``(α_t→v, α_v→t)`` of one sample at one decoder layer.

    ``attn_probs``: softmax probabilities (Lq, L) already averaged over heads, or (H, Lq, L) (averaged
    here). Rows are queries, columns keys, in current-sequence coordinates. Without
    ``query_positions`` the rows are positions 0..Lq-1; with it, row r is the query at position
    ``query_positions[r]`` (it must cover ``vis_idx`` and ``txt_idx``).
    ``sys_idx`` (S), ``vis_idx`` (V), ``txt_idx`` (T): index tensors / lists / bool masks of the three
    sets (padding in none); S only enters the denominators (via "all keys") and is checked disjoint.

    ``α_t→v = Σ_{i∈T} Σ_{j∈V} A_ij / Σ_{i∈T} Σ_j A_ij``,
    ``α_v→t = Σ_{i∈V} Σ_{j∈T} A_ij / Σ_{i∈V} Σ_j A_ij``. Returns two 0-dim fp32 (or fp64) tensors;
    an empty row set gives NaN (never "drop").
    """
    a = attn_probs
    if a.dim() == 3:
        a = a.to(score_dtype(a)).mean(dim=0)
    elif a.dim() == 2:
        a = a.to(score_dtype(a))
    else:
        raise ValueError("attn_probs must be (Lq, L) or (H, Lq, L)")
    dev = a.device
    s, v, t = (_as_index(i, dev) for i in (sys_idx, vis_idx, txt_idx))
    allidx = torch.cat([s, v, t])
    if torch.unique(allidx).numel() != allidx.numel():
        raise ValueError("sys_idx, vis_idx and txt_idx must be disjoint and without duplicates")
    if query_positions is None:
        row_of = torch.arange(a.shape[0], device=dev)
        if allidx.numel() and int(allidx.max()) >= a.shape[0]:
            raise ValueError("attn_probs lacks query rows for some positions; pass query_positions")
    else:
        qp = _as_index(query_positions, dev)
        if qp.numel() != a.shape[0]:
            raise ValueError("query_positions must have one entry per row of attn_probs")
        row_of = torch.full((a.shape[1],), -1, dtype=torch.long, device=dev)
        row_of[qp] = torch.arange(qp.numel(), device=dev)
        if (row_of[v] < 0).any() or (row_of[t] < 0).any():
            raise ValueError("query_positions must cover vis_idx and txt_idx")
    rows_t = a[row_of[t]]
    rows_v = a[row_of[v]]
    alpha_t2v = rows_t[:, v].sum() / rows_t.sum()
    alpha_v2t = rows_v[:, t].sum() / rows_v.sum()
    return alpha_t2v, alpha_v2t


def should_drop_visual(alpha_t2v: Tensor | float, alpha_v2t: Tensor | float, tau: float = 0.10) -> bool:
    """Stage-2 rule: drop all visual tokens iff ``α_t→v < τ`` **and** ``α_v→t < τ`` (strict)."""
    return bool(alpha_t2v < tau) and bool(alpha_v2t < tau)


# --------------------------------------------------------------------------------------------------
# The policies
# --------------------------------------------------------------------------------------------------
PIVOTS = ("auto", "cls", "farthest", "center", "random", "attention")


@register
@dataclass
class ToDRE(TokenPolicy):
    """ToDRE (Li et al., arXiv 2505.18757): stage 1 at P (greedy diversity from a pivot) and, by default,
    stage 2 at D (``relevance="on"``: :meth:`parts` adds :class:`ToDRERelevance`).

    Per image, over the post-projector features of its candidate tokens (LLaVA-NeXT: base view + valid
    crop tokens; newlines are not candidates and are always kept), start at the pivot and add the
    token farthest from its nearest chosen token (``"kcenter"``, v1, the default: the design card's
    "ToDRE k-center") or the one with the smallest cumulative cosine similarity to the chosen set
    (``"maxsum"``, v2 Algorithm 1); kept tokens in ascending order, positions as the family's
    reference (LLaVA contiguous, Qwen original M-RoPE).

    Fields:
        keep: ``k = min(n, max(1, round(keep * n)))`` for a fraction (default 0.25), ``min(n, keep)``
            for a count.
        nominal_tokens: e.g. 2880: a fraction is taken of this count instead (the paper's "up to").
        diversity: ``"kcenter"`` (default, v1) | ``"maxsum"`` (v2).
        pivot: ``"auto"`` = ``"cls"`` on LLaVA (argmax of the CLS attention of ``pivot_layer``, signal
            ``vit_cls@l``: head mean, CLS column dropped; LLaVA-NeXT: over the base view only) and
            ``"farthest"`` on Qwen (lowest cosine to the mean normalised candidate); also ``"center"``,
            ``"random"`` (``seed``; per image, so a batch equals each sample alone) and
            ``"attention"`` (argmax of the attention received in ``pivot_layer``, our extension).
        pivot_layer: 0-based vision layer (negative from the end). ``None`` = LLaVA: the layer whose
            output LLaVA uses (22 of 24; the paper's "last layer", our reading); Qwen
            (``pivot="attention"``): the last full-attention block.
        order: ``"sorted"`` only; ``"greedy"`` (selection order) raises ``ValueError`` because the
            hook layer keeps stage-P selections in ascending order (``TokenPolicy.sorted_output``).
        relevance, tau, relevance_layer, relevance_scan: stage 2. ``relevance="on"`` (default, as the
            paper runs both stages): :meth:`parts` expands ``"todre"`` into this stage-1 policy and a
            ``"todre-relevance"`` policy carrying the stage-2 fields (so ``vtprune.patch(model,
            "todre")`` runs both stages); ``"off"``: stage 1 only (e.g. an LLM too shallow to leave a
            layer after ``round(7L/8)``, where stage 2 raises a ``ValueError`` at ``patch()``).
    """

    name: ClassVar[str] = "todre"
    description: ClassVar[str] = (
        "ToDRE: greedy k-center diversity from a CLS pivot (stage P), then all visual tokens dropped after "
        "layer round(7L/8) if the text ignores them (stage D; relevance=off: P only)"
    )
    families: ClassVar[tuple[str, ...]] = FAMILIES

    keep: int | float = 0.25
    diversity: str = "kcenter"
    pivot: str = "auto"
    pivot_layer: int | None = None
    order: str = "sorted"
    nominal_tokens: int | None = None
    seed: int = 0
    relevance: str = "on"
    tau: float = 0.10
    relevance_layer: int | None = None
    relevance_scan: str = "single"
    positions: str = "auto"

    def __post_init__(self):
        self._family: str | None = None
        self._pivot: str | None = None
        self._signal: str | None = None

    def parts(self) -> list:
        """The policies this spec stands for: stage 1, plus ``todre-relevance`` if ``relevance="on"``."""
        s1 = ToDRE(**{**self.params(), "relevance": "off"})
        if self.relevance != "on":
            return [s1]
        return [s1, ToDRERelevance(tau=self.tau, relevance_layer=self.relevance_layer,
                                   relevance_scan=self.relevance_scan)]

    def validate(self, family: str, adapter: Any) -> None:
        super().validate(family, adapter)
        check_choice(self.name, "diversity", self.diversity, ("kcenter", "maxsum"))
        check_choice(self.name, "pivot", self.pivot, PIVOTS)
        check_choice(self.name, "order", self.order, ("sorted", "greedy"))
        check_choice(self.name, "relevance", self.relevance, ("on", "off"))
        if self.order == "greedy":
            raise ValueError(
                "todre: order='greedy' needs unsorted stage-P selections, which the hook layer does not "
                "support yet (TokenPolicy.sorted_output); use order='sorted'"
            )
        if self.nominal_tokens is not None and (
                isinstance(self.nominal_tokens, bool) or not isinstance(self.nominal_tokens, int)
                or self.nominal_tokens < 1):
            raise ValueError(f"todre: nominal_tokens={self.nominal_tokens!r} must be a positive int")
        pivot = self.pivot
        if pivot == "auto":
            pivot = "cls" if family in LLAVA_FAMILIES else "farthest"
        signal = None
        if family in PLAIN_VIT_FAMILIES:
            depth = len(adapter.vit_layers())
            if pivot in ("cls", "attention"):
                if pivot == "cls" and not adapter.vit_has_cls():
                    raise ValueError("todre: pivot='cls' needs a vision tower with a CLS token; use pivot='farthest'")
                layer = (llava_feature_layer(adapter, self.name, "pivot_layer") if self.pivot_layer is None
                         else resolve_layer(self.pivot_layer, depth, method=self.name, knob="pivot_layer"))
                signal = f"{'vit_cls' if pivot == 'cls' else 'vit_received'}@{layer}"
        else:
            if pivot == "cls":
                raise ValueError(
                    "todre: pivot='cls' needs a CLS token; Qwen vision towers have none, nor does LLaVA-OneVision-1.5 "
                    "offer one "
                    "(use 'farthest' (default), 'center', 'random' or 'attention')"
                )
            if pivot == "attention":
                depth = len(adapter.vit_blocks())
                layer = (adapter.full_attention_blocks()[-1] if self.pivot_layer is None
                         else resolve_layer(self.pivot_layer, depth, method=self.name, knob="pivot_layer"))
                signal = f"vit_received@{layer}"
        self._family, self._pivot, self._signal = family, pivot, signal

    def required_signals(self, adapter: Any) -> dict[str, Any]:
        if self._pivot is None:
            self.validate(adapter.family, adapter)
        return {self._signal: None} if self._signal else {}

    def budget(self, image: ImageTokens) -> int:
        return todre_budget(image.num_candidates, self.keep, nominal_tokens=self.nominal_tokens)

    def _pivot_index(self, image: ImageTokens, cand: Tensor, x: Tensor) -> int:
        if self._pivot in ("cls", "attention"):
            s = image.signals[self._signal].float().cpu()[cand]
            multi_view = self._family in ("llava_next", "llava_onevision")  # base view first
            n_base = int((image.view.cpu()[cand] == 0).sum()) if multi_view else None
            return cls_pivot(s, n_base=n_base or None)
        if self._pivot == "farthest":
            return farthest_pivot(x)
        if self._pivot == "center":
            return center_pivot(x)
        key = image.index_in_sample
        return random_pivot(cand.numel(), seed=(int(self.seed) * 1_000_003 + int(key)) % (2**63 - 1))

    def select(self, image: ImageTokens, n_keep: int, ctx: Context) -> Tensor:
        cand = image.candidate_index()
        x = image.features[cand.to(image.features.device)]
        pivot = self._pivot_index(image, cand, x)
        chosen = diversity_select(x, n_keep, pivot, self.diversity, "sorted")
        return cand[chosen.cpu()]


@register
@dataclass
class ToDRERelevance(DecoderPolicy):
    """ToDRE stage 2 (Li et al., arXiv 2505.18757 v2), stage D: drop **all** visual tokens after
    decoder layer ``ℓ`` when the text no longer attends to them.

    At prefill, per sample, with ``A`` the head-mean attention probabilities of layer ``ℓ`` (recomputed
    in the layer's pre-hook from its own norm/q/k with RoPE and GQA, fp32, causal + padding mask):
    ``α_t→v = Σ_{i∈T} Σ_{j∈V} A_ij / |T|`` over the rows ``T`` after the sample's last visual token
    (the question and the template tail) and the visual keys ``V`` (NeXT newlines included). If
    ``α_t→v < tau`` and ``α_v→t < tau`` (strict), every visual token is removed from the hidden states
    entering layer ``ℓ + 1`` and all later layers (their KV cache never holds them); survivors keep
    their original positions (our reading). Otherwise nothing changes.

    Fields:
        tau: threshold (paper 0.10).
        relevance_layer: 0-based ``ℓ``; ``None`` = ``round(7L/8) - 1`` (Vicuna-7B 27, Qwen2.5-7B 23).
            It must leave a layer to prune (``ℓ <= L - 2``), else ``ValueError``.
        relevance_scan: ``"single"`` (only ``ℓ``) | ``"from"`` (re-check every later layer until the
            rule holds; our reading of "starting from 7L/8").
        layer, keep: inherited from :class:`DecoderPolicy`; derived (``layer = ℓ + 1``) / unused.

    Wiring: the decoder signal ``"post_visual_rows"`` is the head-mean attention row averaged over
    ``T``, so ``α_t→v`` is its sum over the visual keys; the budget is data dependent
    (``budget_view``: all visual tokens or none). ``α_v→t`` is exactly 0 and is not recomputed: ``T``
    lies after every visual token, so under causal masking no visual query sees a key of ``T`` (the
    spec's causality caveat; its unit test is on the kernel :func:`relevance_ratios`). A sample with no
    token after its last visual token is never pruned (``α`` undefined). Batches: decided per sample.
    :attr:`last_ratios` holds ``{layer: (α_t→v, α_v→t) of the most recent 64 samples}``.
    """

    name: ClassVar[str] = "todre-relevance"
    description: ClassVar[str] = (
        "ToDRE stage 2: drop all visual tokens after layer round(7L/8) when the text ignores them, stage D"
    )
    families: ClassVar[tuple[str, ...]] = FAMILIES
    signal_kind: ClassVar[str] = "post_visual_rows"

    tau: float = 0.10
    relevance_layer: int | None = None
    relevance_scan: str = "single"
    layer: int = 0
    keep: int | float = 1.0

    def __post_init__(self):
        self.last_ratios: dict[int, deque] = {}

    def _relevance_layer(self, num_layers: int) -> int:
        if self.relevance_layer is None:
            return relevance_layer_index(num_layers)
        return resolve_layer(self.relevance_layer, num_layers, method=self.name, knob="relevance_layer")

    def validate(self, family: str, adapter: Any) -> None:
        Policy.validate(self, family, adapter)  # the family; keep/layer are derived here, not given
        check_choice(self.name, "relevance_scan", self.relevance_scan, ("single", "from"))
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"todre-relevance: tau={self.tau!r} must be a number in [0, 1] (paper: 0.10)")
        n = adapter.num_llm_layers()
        ell = self._relevance_layer(n)
        if ell > n - 2:
            raise ValueError(
                f"todre-relevance: relevance layer {ell} (0-based) leaves no later layer to prune in this "
                f"{n}-layer LLM; pass relevance_layer in 0..{n - 2}"
            )
        self.layer = ell + 1
        self.last_ratios = {}

    def pruning_layers(self, num_layers: int) -> list[int]:
        ell = self._relevance_layer(num_layers)
        return list(range(ell + 1, num_layers)) if self.relevance_scan == "from" else [ell + 1]

    def signal_layers(self, num_layers: int) -> dict[int, str]:
        return {l - 1: self.signal_kind for l in self.pruning_layers(num_layers)}

    def ratios(self, view: DecoderView, signal_layer: int) -> tuple[float, float]:
        """``(α_t→v, α_v→t)`` of one sample; NaN when the sample has no visual or no later token."""
        vis = torch.nonzero(view.visual).flatten()
        if vis.numel() == 0 or int(vis.max()) == view.visual.numel() - 1:
            return float("nan"), float("nan")
        row = view.signals[f"{self.signal_kind}@{signal_layer}"].double()
        return float(row[vis.to(row.device)].sum()), 0.0

    def decide(self, view: DecoderView, layer: int) -> bool:
        """True iff the sample's visual tokens are dropped at ``layer`` (rule of the signal layer)."""
        t2v, v2t = self.ratios(view, layer - 1)
        return should_drop_visual(t2v, v2t, self.tau)  # NaN compares False: never drop

    def budget_view(self, view: DecoderView, layer: int) -> int:
        self.last_ratios.setdefault(layer, deque(maxlen=64)).append(self.ratios(view, layer - 1))
        return 0 if self.decide(view, layer) else int(view.visual.sum())

    def select(self, layer: int, view: DecoderView, ctx: Context) -> Tensor:
        vis = torch.nonzero(view.visual).flatten()
        return vis[:0] if self.decide(view, layer) else vis
