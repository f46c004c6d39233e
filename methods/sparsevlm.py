"""SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", ICML 2025, arXiv 2410.04417).

Text-guided progressive sparsification of visual tokens inside the LLM, with token recycling.
Authors: Zhang, Fan, Ma, Zheng, Huang, Cheng, Gudovskiy, Okuno, Nakata, Keutzer, Zhang.
Reference implementation: github.com/Gumpest/SparseVLMs, branch ``main`` at commit ``26a5f48``
(``llava/model/language_model/modelling_sparse_llama.py`` (``LlamaDynamicvitModel.forward``),
``score.py``, ``utils.py`` (``cluster_and_merge``)), read together with branch ``v1.5`` at ``734d900``
and the initial release ``91fb6d9``. Three versions exist:

* **v1.5** (branch ``v1.5``; on ``main`` the default ``USE_VERSION=1_0`` runs the same algorithm): the
  code of the ICML 2025 paper's numbers. **Default** (``version="1.5"``).
* **v2.0** "SparseVLM+" (``main`` with ``USE_VERSION=2_0``, Dec. 2025): RoPE "gravity" correction of the
  attention, text-visual priority heads, no recycling, original positions, other schedules.
  ``version="2.0"``.
* v1.0 (``91fb6d9``, arXiv v1): the paper text's rank-based ratio: the count kept at a layer is
  ``min(int(rank * scale + bias), v - 1)`` for the rank of the (rater rows x visual) relation matrix
  (no pruning at that layer when the rank equals ``v``), four layers 2/6/15/19, the same recycling and
  positions as v1.5. ``version="1.0"`` (``rank_scale``, ``rank_bias``; the reference's default 13.5 / 0,
  its scripts use 13.5/0 (192), 9/6 (128), 0.8/0 (64)).

Stage: **D**, prefill only, at three layers (0-based ``layers`` = 2, 6, 15 of LLaVA-1.5-7B): the
attention of layer ``l`` ranks the visual tokens and the output of layer ``l`` (= the input of layer
``l + 1``) is pruned. Decode reuses the per-layer shortened caches.

Algorithm, per sample (v1.5; shapes for one image of N visual tokens, T text tokens after it):

1. Text raters (once, signal ``hidden_reduce`` at layer 0, :func:`select_raters`): on the LLM input
   embeddings, ``m = softmax_T(V T^T).mean_N`` ((N, D) x (D, T) -> (T,)); the raters are the text
   tokens after the image with ``m_t > mean(m)``.
2. Relation (signal ``policy_rows`` at each layer ``l``): the layer's attention probabilities
   (softmax over all current keys, causal) of the rater rows, mean over heads, mean over the rater
   rows -> one score per current visual token (:func:`relation_scores`).
3. Sparsify (:func:`stage_keep`): keep ``k = min(n_s, v - 1)`` visual tokens with the highest relation
   (``v`` = visual tokens present, recycled ones included; ``n_s`` from the schedule).
4. Recycle (v1.5): of the ``d`` dropped tokens, the ``int(0.3 d) + 1`` with the highest relation
   (:func:`recycle_pool`) are clustered by DPC-kNN into ``int(n / 10) + 1`` clusters
   (:func:`dpc_knn_merge`: distances ``||x_i - x_j|| / sqrt(C)``, density ``exp(-mean of the squared
   distances to the k nearest (self included))`` + ``U(0, 1e-6)`` noise, delta = distance to the nearest
   denser token (max distance for the densest), centres = top-k ``delta * density``, each token to its
   nearest centre, centre means ``sum / (count + 1e-6)``). The merged tokens are inserted right after the
   kept visual tokens, in centre order, and count as visual tokens at the later stages.
5. Positions (v1.5, LLaVA): every pruning renumbers the sequence contiguously; at decode each layer
   numbers a new token by its own cache length (reference: ``past_key_value.get_usable_length``).

v2.0 differs in step 2 (probabilities divided elementwise by ``rope_w(m, n) = q_1(m).k_1(n) / sqrt(hd)``,
the score RoPE alone gives all-ones q and k; then per sample the ``14`` heads (of 32) with the largest
sum over rater rows x visual columns are averaged instead of all heads), in step 4 (no recycling), in
step 5 (original positions kept, also at decode) and in the schedules.

Schedule (tokens kept after the three stages, for ``retain`` = the average budget of the 576-token
LLaVA-1.5 setting; the reference's ``RETAIN_TOKN``): v1.5 192: 300/200/110, 128: 303/110/36, 96:
238/48/26, 64: 66/30/17; v2.0 192: 300/200/118, 128: 238/108/60, 96: 246/54/28, 64: 66/34/20. For an
image of N != 576 tokens the counts are scaled, ``n_s * N // 576`` (our extension); ``schedule=(a, b,
c)`` gives absolute counts instead.

Reference code vs paper (default = the code):

1. Raters: the paper selects relevant text tokens from the text-visual relation; the code uses the raw
   embeddings' dot products (no scaling), softmax over text, mean over visual, threshold at the mean.
2. Number of dropped tokens per layer: the paper (also its ICML version) derives it adaptively from
   the rank of the relation matrix, as the v1.0 code did; the v1.5 code the README calls "V1.5 Code"
   next to the paper uses the fixed per-layer schedules above. ``version="1.0"`` gives the rank rule.
3. Recycling: the paper recycles the pruned tokens with the highest attention; the code takes
   ``int(0.3 d) + 1`` of them (``recycle_ratio``) into ``int(n / 10) + 1`` clusters (``cluster_divisor``).
4. The kept count never reaches all tokens: ``min(n_s, v - 1)`` always drops at least one.

vtprune deviations:

* Batches: per sample with padding removed (reference: batch size 1, ``mask[0]``); raters per sample.
* Several images in a sample: each image is a pool of its own (schedule scaled by its N, its own
  recycled tokens after its own span); the reference handles one image.
* Qwen2-VL / Qwen2.5-VL and LLaVA-NeXT (not in the reference): original positions on Qwen
  (``positions="auto"``); recycled tokens then sit at the slot of their cluster centre and take its
  M-RoPE position. On LLaVA-NeXT the image span's newline tokens are candidates.
* Recycled tokens take the identity (LLM-input index, image) of their cluster centre; with renumbered
  positions (v1.5 on LLaVA) they are emitted right after the image's last current visual token, as in
  the reference.
* Numerics: relations and the text-rater softmax in fp32 (float64 stays float64; reference: model
  dtype); the attention rows are recomputed from the layer's own norm/q/k (SDPA stays on; reference:
  full eager-style probabilities of every row). DPC-kNN noise comes from the patch's seeded generator
  (reference: the global RNG), so runs are deterministic.
* Ties in every top-k: lowest index (reference ``topk`` order unspecified). Priority heads for models
  with H != 32 heads: ``round(14 * H / 32)`` (at least 1; reference: 14, for 32 heads).
* Reference bugs not reproduced: ``.cuda()`` and CUDA events in the forward (CPU runs fail), FLOP
  counters and prints.
* Qwen3-VL: a recycled token takes its slot's DeepStack rows at the levels added after its pruning layer
  (the stage-P rule for merged tokens).
* Qwen3.5 (hybrid LLM): the relation of ranking layer ``l`` is read at the last full-attention layer at or
  before ``l`` (after that layer's own cut); a ranking layer with none is a ``ValueError``, and so is one
  read before the previous stage's pruning layer when that stage's recycled tokens (or v1.0's rank) need
  it (``recycle=False`` or other layers).

Policy: :class:`SparseVLM` (``"sparsevlm"``), stage D on all ten families (renumbered positions by default
on every family with 1-D positions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from vtprune.policy import Context, DecoderPolicy, DecoderSelection, DecoderView, Policy, RowAttention
from vtprune.registry import register

from ._common import (ONE_D_POSITION_FAMILIES, check_choice, check_decoder_positions, parse_tuple, score_dtype,
                      stable_topk, view_images)

VERSIONS = ("1.0", "1.5", "2.0")
DEFAULT_LAYERS = {"1.0": (2, 6, 15, 19), "1.5": (2, 6, 15), "2.0": (2, 6, 15)}
REFERENCE_TOKENS = 576
SCHEDULES = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
PRIORITY_HEADS = 14  # of 32 (v2.0)


# ------------------------------------------------------------------------------------ kernels
def _dt(x: Tensor) -> torch.dtype:
    return score_dtype(x)


def top_desc(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest ``scores``, best first, ties to the lowest index."""
    return stable_topk(scores.to(_dt(scores)), k)


def select_raters(visual: Tensor, text: Tensor) -> Tensor:
    """(T,) bool: text raters. ``visual`` (N, D), ``text`` (T, D) LLM input embeddings of one sample;
    ``m = softmax over T of (visual @ text^T)``, mean over the N visual rows; rater where ``m > mean(m)``."""
    dt = _dt(visual)
    m = torch.softmax(visual.to(dt) @ text.to(dt).T, dim=-1).mean(0)
    return m > m.mean()


def relation_scores(probs: Tensor, row_ok: Tensor | None = None) -> Tensor:
    """(L,) mean over heads, then over the rater rows, of ``probs`` (H, R, L) (``row_ok`` (R,) masks rows)."""
    w = probs.mean(0)
    if row_ok is None:
        return w.mean(0)
    ok = row_ok.to(w.dtype)
    return (w * ok[:, None]).sum(0) / ok.sum().clamp(min=1)


def gravity_corrected(probs: Tensor, rope_scores: Tensor) -> Tensor:
    """v2.0: ``probs`` (H, R, L) divided elementwise by the RoPE-only scores (R, L) of all-ones q/k."""
    return probs / rope_scores[None]


def priority_heads(probs: Tensor, row_ok: Tensor, visual: Tensor, n_heads: int) -> Tensor:
    """v2.0: the ``n_heads`` heads of ``probs`` (H, R, L) with the largest sum over the rater rows
    (``row_ok`` (R,)) and the visual columns (``visual`` (L,) bool), best first."""
    sums = (probs * row_ok.to(probs.dtype)[None, :, None] * visual.to(probs.dtype)[None, None, :]).sum((1, 2))
    return top_desc(sums, min(n_heads, probs.shape[0]))


def stage_keep(relation: Tensor, count: int) -> Tensor:
    """Local indices (ascending) of the ``min(count, v - 1)`` most related of ``v`` visual tokens."""
    v = relation.numel()
    return torch.sort(top_desc(relation, min(count, v - 1))).values


def recycle_pool(relation_dropped: Tensor, ratio: float = 0.3) -> Tensor:
    """Indices (into the dropped tokens, best first) of the ``int(d * ratio) + 1`` most related."""
    d = relation_dropped.numel()
    return top_desc(relation_dropped, min(d, int(d * ratio) + 1))


def n_clusters(n: int, divisor: int = 10) -> int:
    """``int(n / divisor) + 1`` clusters for ``n`` recycled tokens (never more than ``n``)."""
    return min(n, int(n / divisor) + 1)


def dpc_knn_merge(x: Tensor, k: int, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DPC-kNN clustering of ``x`` (n, C) into ``k`` clusters and their means.

    Returns ``(merged (k, C), centres (k,) indices into x, best first, assign (n,) cluster of each
    token)``. ``noise`` (n,) is added to the densities (the reference draws ``U(0, 1) * 1e-6``).
    """
    n, c = x.shape
    dt = _dt(x)
    xf = x.to(dt)
    dist = (xf[:, None, :] - xf[None, :, :]).norm(dim=-1, p=2) / (c ** 0.5)  # (n, n)
    nearest = torch.sort(dist, dim=-1).values[:, :k]  # k smallest (self included)
    density = (-(nearest ** 2).mean(-1)).exp()
    if noise is not None:
        density = density + noise.to(dt)
    denser = density[None, :] > density[:, None]  # [i, j]: j denser than i
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centres = top_desc(delta * density, k)
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(k, device=x.device)
    sums = torch.zeros((k, c), dtype=dt, device=x.device).index_add_(0, assign, xf)
    counts = torch.bincount(assign, minlength=k).to(dt)
    return sums / (counts[:, None] + 1e-6), centres, assign


def rank_budget(relation_rows: Tensor, scale: float = 13.5, bias: float = 0.0) -> tuple[int, int]:
    """v1.0's rank-adaptive count: ``(rank, k)`` for the head-mean relation matrix (R rater rows, v visual
    columns): ``rank = matrix_rank`` (fp32), ``k = v`` (no pruning) if ``rank == v``, else
    ``min(int(rank * scale + bias), v - 1)``."""
    v = relation_rows.shape[-1]
    rank = int(torch.linalg.matrix_rank(relation_rows.float())) if relation_rows.numel() else 0
    return rank, (v if v - rank == 0 else min(int(rank * scale + bias), v - 1))


def schedule_counts(n0: int, *, retain: int = 192, version: str = "1.5",
                    schedule: Sequence[int] | None = None) -> tuple[int, ...]:
    """Visual tokens kept after each stage for an image of ``n0`` tokens at the LLM input."""
    if schedule is not None:
        return tuple(int(c) for c in schedule)
    base = SCHEDULES[version][retain]
    return tuple(int(c) * int(n0) // REFERENCE_TOKENS for c in base)


def default_priority_heads(num_heads: int) -> int:
    return PRIORITY_HEADS if num_heads == 32 else max(1, round(PRIORITY_HEADS * num_heads / 32))


# ------------------------------------------------------------------------------------ policy
@register
@dataclass
class SparseVLM(DecoderPolicy):
    """SparseVLM (Zhang et al., ICML 2025): text-rater-guided pruning at three decoder layers, with recycling.

    Fields: ``version`` (``"1.5"`` the paper's code, default; ``"2.0"`` SparseVLM+; ``"1.0"`` the paper's
    rank-based ratio), ``retain`` (192 / 128 / 96 / 64: the reference's schedule presets, scaled to the
    image's token count), ``schedule`` (optional absolute counts per stage), ``layers`` (0-based layers whose
    attention ranks; their output is pruned; default 2/6/15 (1.0: 2/6/15/19), tiny LLMs need e.g.
    ``(0, 1, 2)``), ``rank_scale`` / ``rank_bias`` (v1.0: 13.5 / 0), ``recycle`` (None: the version's
    default, on for 1.0/1.5, off for 2.0), ``recycle_ratio`` (0.3), ``cluster_divisor`` (10), ``priority_heads``
    (v2.0; None: 14 of 32, scaled for other head counts), ``positions`` (``"auto"``: renumbered on
    LLaVA in v1.5, original otherwise). The inherited ``layer``/``keep`` are unused and must stay None.
    """

    name: ClassVar[str] = "sparsevlm"
    description: ClassVar[str] = (
        "SparseVLM: text-rater-guided progressive pruning inside the LLM with token recycling (stage D)"
    )
    layer: int | None = None
    keep: int | float | None = None
    version: str | float = "1.5"  # a spec string gives 1.5 / 2.0 as numbers: normalised to "1.5" / "2.0"
    retain: int = 192
    schedule: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    recycle: bool | None = None
    rank_scale: float = 13.5
    rank_bias: float = 0.0
    recycle_ratio: float = 0.3
    cluster_divisor: int = 10
    priority_heads: int | None = None
    positions: str = "auto"
    recycle_placement: str = "auto"

    def __post_init__(self):
        self.version = f"{self.version:.1f}" if isinstance(self.version, (int, float)) else str(self.version)
        if self.layers is not None:
            self.layers = parse_tuple(self.layers, method="sparsevlm", knob="layers")
        if self.schedule is not None:
            self.schedule = parse_tuple(self.schedule, method="sparsevlm", knob="schedule")

    # ---------------------------------------------------------------- configuration
    def validate(self, family: str, adapter: Any) -> None:
        Policy.validate(self, family, adapter)
        if self.layer is not None or self.keep is not None:
            raise ValueError("sparsevlm: use layers (0-based) and retain / schedule instead of layer/keep")
        check_choice("sparsevlm", "version", self.version, VERSIONS)
        if self.version != "1.0" and self.schedule is None and self.retain not in SCHEDULES[self.version]:
            raise ValueError(
                f"sparsevlm: retain={self.retain} has no schedule in version {self.version}; choose one of "
                f"{sorted(SCHEDULES[self.version])} or pass schedule=(a, b, c)"
            )
        n = adapter.num_llm_layers()
        ls = self._layers()
        if not ls or list(ls) != sorted(set(ls)) or ls[0] < 0 or ls[-1] > n - 2:
            raise ValueError(
                f"sparsevlm: layers={ls} must be strictly increasing 0-based layers in 0..{n - 2} for this "
                f"{n}-layer LLM (the layer after each is pruned); the default {DEFAULT_LAYERS[self.version]} needs "
                f">= {DEFAULT_LAYERS[self.version][-1] + 2} layers"
            )
        if self.version == "1.0":
            if self.schedule is not None:
                raise ValueError("sparsevlm: version='1.0' sets its counts from the relation's rank (rank_scale, "
                                 "rank_bias); schedule= is for versions 1.5 and 2.0")
        elif self.schedule is not None and (len(self.schedule) != len(ls) or min(self.schedule) < 0):
            raise ValueError(f"sparsevlm: schedule={self.schedule} needs one count >= 0 per layer of {ls}")
        elif self.schedule is None and len(ls) != 3:
            raise ValueError(f"sparsevlm: the retain presets have 3 stages; layers={ls} needs schedule=(...)")
        if not 0.0 <= self.recycle_ratio <= 1.0:
            raise ValueError(f"sparsevlm: recycle_ratio={self.recycle_ratio} must lie in [0, 1]")
        if self.cluster_divisor < 1:
            raise ValueError(f"sparsevlm: cluster_divisor={self.cluster_divisor} must be >= 1")
        if self.priority_heads is not None and self.priority_heads < 1:
            raise ValueError(f"sparsevlm: priority_heads={self.priority_heads} must be >= 1")
        check_decoder_positions("sparsevlm", self.positions, family)
        check_choice("sparsevlm", "recycle_placement", self.recycle_placement, ("auto", "after_visual", "slot"))
        self._check_attention_sources(adapter, ls)

    def _check_attention_sources(self, adapter: Any, ls: tuple[int, ...]) -> None:
        """On a hybrid LLM (Qwen3.5) a ranking layer's attention is read at the last full-attention layer at
        or before it (``Adapter.attention_layer_for``). There must be one; and when the relation must cover
        the previous stage's recycled tokens (or v1.0 takes the rank over the visual tokens present), it
        must lie at or after the previous stage's pruning layer, where they join the sequence."""
        n = adapter.num_llm_layers()

        def source(layer: int) -> int | None:
            try:
                return adapter.attention_layer_for(layer)
            except ValueError:
                return None

        own = [l for l in range(n - 1) if source(l) == l]  # ranking layers whose attention is their own
        for s, l in enumerate(ls):
            src = source(l)
            if src is None:
                raise ValueError(
                    f"sparsevlm: ranking layer {l} has no attention rows in this LLM (Gated DeltaNet layers have "
                    f"none, and no full-attention layer comes at or before it); choose layers among the "
                    f"full-attention layers {own}, e.g. layers={'/'.join(map(str, own[:3]))}"
                )
            prev = ls[s - 1] + 1 if s else None
            if prev is not None and src < prev and (self.recycles() or self.version == "1.0"):
                what = "its recycled tokens join" if self.recycles() else "its visual tokens leave"
                raise ValueError(
                    f"sparsevlm: the attention of ranking layer {l} would be read at full-attention layer {src}, "
                    f"before the previous stage prunes at layer {prev}, where {what}: that relation does not "
                    f"exist there. Choose ranking layers with a full-attention layer at or after each earlier "
                    f"stage's pruning layer (full-attention layers: {own})"
                    + (", or recycle=False" if self.recycles() and self.version != "1.0" else "")
                )

    def _layers(self) -> tuple[int, ...]:
        return self.layers if self.layers is not None else DEFAULT_LAYERS.get(self.version, DEFAULT_LAYERS["1.5"])

    def recycles(self) -> bool:
        return (self.version != "2.0") if self.recycle is None else bool(self.recycle)

    def resolved_positions(self, family: str) -> str:
        if self.positions != "auto":
            return self.positions
        return "renumber" if (self.version != "2.0" and family in ONE_D_POSITION_FAMILIES) else "original"

    def resolved_placement(self, family: str) -> str:
        """Where recycled tokens sit: ``"after_visual"`` (reference, with renumbered positions) or at their
        cluster centre's ``"slot"`` (with original positions)."""
        if self.recycle_placement != "auto":
            return self.recycle_placement
        return "after_visual" if self.resolved_positions(family) == "renumber" else "slot"

    def pruning_layers(self, num_layers: int) -> list[int]:
        """The output of layer ``l`` is pruned: the input of 0-based layer ``l + 1``."""
        return [l + 1 for l in self._layers()]

    def position_handling(self, num_layers: int, family: str) -> dict[int, str]:
        mode = self.resolved_positions(family)
        return {l: mode for l in self.pruning_layers(num_layers)}

    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        out: dict[int, tuple[str, ...]] = {0: ("image_tokens_in", "hidden_reduce")}
        for l in self._layers():
            out[l] = out.get(l, ()) + ("policy_rows",)
        return out

    # ---------------------------------------------------------------- signals
    def reduce_hidden(self, layer: int, hidden: Tensor, key_mask: Tensor, visual: Tensor) -> Tensor:
        """(B, L) 1.0 at each sample's text raters (from the LLM input embeddings), 0 elsewhere."""
        out = torch.zeros(key_mask.shape, dtype=torch.float32, device=hidden.device)
        ar = torch.arange(key_mask.shape[1], device=hidden.device)
        for b in range(hidden.shape[0]):
            vis = torch.nonzero(visual[b] & key_mask[b]).flatten()
            if vis.numel() == 0:
                continue
            text = torch.nonzero(key_mask[b] & ~visual[b] & (ar > vis.max())).flatten()
            if text.numel() == 0:
                continue
            out[b, text] = select_raters(hidden[b, vis], hidden[b, text]).float()
        return out

    def query_rows(self, layer: int, aligned: dict[str, Tensor], key_mask: Tensor, visual: Tensor) -> Tensor:
        return aligned["hidden_reduce@0"] > 0.5

    def reduce_rows(self, layer: int, attention: RowAttention) -> Tensor:
        """(B, L) relation of every current key to the rater rows (v1.5 / v2.0)."""
        probs = attention.probs
        if self.version in ("1.0", "1.5"):
            ok = attention.row_ok.to(probs.dtype)
            w = probs.mean(1)
            out = (w * ok[..., None]).sum(1) / ok.sum(-1).clamp(min=1)[:, None]
            if self.version == "1.0":  # the relation's rank travels at the non-visual positions (no relation there)
                for b in range(probs.shape[0]):
                    rows = w[b][attention.row_ok[b]][:, attention.visual[b]]
                    rank, _ = rank_budget(rows)
                    out[b] = torch.where(attention.visual[b], out[b], torch.full_like(out[b], float(rank)))
            return out
        rope = attention.rope_scores().to(probs.dtype)
        n_heads = self.priority_heads or default_priority_heads(probs.shape[1])
        out = []
        for b in range(probs.shape[0]):
            corrected = gravity_corrected(probs[b], rope[b])
            heads = priority_heads(corrected, attention.row_ok[b], attention.visual[b], n_heads)
            out.append(relation_scores(corrected[heads], attention.row_ok[b]))
        return torch.stack(out)

    # ---------------------------------------------------------------- selection
    def _stage(self, layer: int) -> int:
        return self.pruning_layers(0).index(layer)

    def _images(self, view: DecoderView, layer: int) -> tuple[Tensor, list[tuple[Tensor, int]]]:
        stage = self._stage(layer)
        vis, images = view_images(view)
        out = []
        rank = None
        if self.version == "1.0":
            rel = view.signals[f"policy_rows@{layer - 1}"]
            rank = int(rel[~view.visual][0]) if bool((~view.visual).any()) else 0
        for members, n0 in images:
            v = members.numel()
            if rank is not None:  # v1.0: rank-adaptive (the rank of the sample's rater x visual relation)
                out.append((members, v if v - rank == 0 else min(int(rank * self.rank_scale + self.rank_bias), v - 1)))
                continue
            count = schedule_counts(n0, retain=self.retain, version=self.version, schedule=self.schedule)[stage]
            out.append((members, min(count, v - 1)))
        return vis, out

    def budget_view(self, view: DecoderView, layer: int) -> int:
        return sum(k for _, k in self._images(view, layer)[1])

    def select(self, layer: int, view: DecoderView, ctx: Context) -> Tensor | DecoderSelection:
        vis, images = self._images(view, layer)
        relation = view.signals[f"policy_rows@{layer - 1}"][vis]
        kept, feats, slots, after = [], [], [], []
        for members, count in images:
            if count >= members.numel():  # v1.0 when the rank equals the count: no pruning, no recycling
                kept.append(members)
                continue
            local = stage_keep(relation[members], count)
            kept.append(members[local])
            if not self.recycles():
                continue
            dropped = torch.ones(members.numel(), dtype=torch.bool, device=members.device)
            dropped[local] = False
            dropped = members[dropped]
            if dropped.numel() == 0:
                continue
            pool = dropped[recycle_pool(relation[dropped], self.recycle_ratio)]
            k = n_clusters(pool.numel(), self.cluster_divisor)
            key = 1000 * layer + int(view.image_id[vis[members[0]]])
            noise = torch.rand(pool.numel(), generator=ctx.rng(key)) * 1e-6
            merged, centres, _ = dpc_knn_merge(view.hidden[vis[pool]], k, noise.to(view.hidden.device))
            feats.append(merged)
            slots.append(vis[pool[centres]])
            after.append(torch.full((k,), int(vis[members].max()), dtype=torch.long, device=vis.device))
        keep = torch.sort(vis[torch.cat(kept)]).values
        if not feats:
            return keep
        at_slot = self.resolved_placement(ctx.family) == "slot"
        return DecoderSelection(keep=keep, recycled=torch.cat(feats), slots=torch.cat(slots),
                                after=None if at_slot else torch.cat(after))
