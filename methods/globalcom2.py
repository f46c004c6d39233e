"""GlobalCom²: thumbnail-guided compression of LLaVA-NeXT AnyRes crops (pure tensor kernels).

Paper: Liu et al., "Global Compression Commander" (earlier "Compression with Global Guidance"),
arXiv 2501.05179, AAAI 2026. Reference implementation: github.com/xuyang-liu16/GlobalCom2 at commit
``96b2d00`` (``llava/model/llava_arch.py`` last changed in ``4e544e5``), an original-LLaVA fork,
Apache-2.0. Spec: ``docs/methods/globalcom2.md``.

Stage: **P** (after the projector, before the LLM), prefill only, text-agnostic. Acts on multi-view
AnyRes images; a single-view image passes through untouched (policy level).

Method (one image; view 0 = thumbnail, crops 1..k row-major, k = nph*npw; ``r`` = retention ratio,
default 0.25; ``tau`` = 10; scores = head-mean pre-softmax scaled CLS **logits** of CLIP layer 23):

1. Thumbnail keeps ``int(576*r)`` tokens with the largest logits, in descending-score order
   (:func:`select_thumbnail`).
2. Per-crop ratios from the thumbnail's region **sums** ``S_c``: ``sigma = softmax((S - max S)/tau)``
   (with ``+1e-8`` in the denominator), ``s_c = r*(1 + sigma_c - mean(sigma))`` clipped above at 1,
   float64 as the reference (:func:`crop_scales`).
3. Valid (unpadded) region of the crop grid (:func:`valid_region`); ``keep_c = int(N_c*s_c)``.
4. Guidance: the thumbnail map bilinearly upsampled (align_corners=False) to the unpadded grid, split
   into per-crop blocks (:func:`guidance_blocks`).
5. Holistic score = l2-normalised local logits + l2-normalised guidance; top ``keep_c`` per crop
   (:func:`select_crop`).
6. Assembly: :func:`assemble_native` (library default) or :func:`assemble_reference` (bug-compatible).

Reference vs paper vs library (spec section 5):

* P1 score: reference uses pre-softmax logits (head mean of the CLS row); paper says "[CLS]
  attention". Library: logits (:func:`cls_logit_scores`); ``crop_score="probs"`` is a policy option
  (our reading; with probabilities the ratios collapse to r).
* P2 thumbnail order: reference descending score; paper silent. Library: score order
  (``thumbnail_order="score"``, emitted through the hook layer's declared order); ``"raster"`` option.
* P3 crop placement (**bug**): the reference puts each kept crop token at its index inside the valid
  list, not its true position (wrong 2-D layout for column padding). Library: true positions;
  reproduced by :func:`assemble_reference` (``next_layout="reference"``).
* P4 newlines (**bug**): reference emits one newline per *padded* row (nph*24), e.g. 48 instead of 36;
  library: one per unpadded row (vanilla). Reproduced by :func:`assemble_reference`.
* P5 batch (**bug**): the reference works for one image per batch only; library: per image (these
  kernels are per image).
* P6 rounding / dtype: ``int()`` floors and only an upper clip are kept; the reference casts to float16,
  the library keeps the model dtype (policy level). Scales are computed in float64 here.
* P7 unpad rounding: original LLaVA ``int(x)``; HF 5.x ``int(round(x, 7))``. ``valid_region`` takes
  ``rounding="hf"`` (native mode, must match the installed HF geometry) or ``"original"`` (reference
  mode).
* P8 single-view images: untouched (policy). P9 the reference's 'spatial' branch crashes: unsupported.
* P10 history: no rescaling of the scales to mean r; region score is the sum (not the mean).

Library extensions (spec section 6, policy level): LLaVA-1.5 thumbnail-only compression
(:func:`select_thumbnail` on the single view); Qwen "region-adaptive" experimental variant
(:func:`region_sums`/:func:`crop_scales` accept any 2-D grid).

Scores are computed in at least fp32 (float64 stays float64); ties go to the lowest index.

Policy (:class:`GlobalCom2`, registered ``"globalcom2"``): stage P on LLaVA-NeXT (native layout: view 0 =
thumbnail, views >= 1 = crops on the unpadded global crop grid, all newlines kept outside the budget),
LLaVA-1.5 (thumbnail-only extension) and, with ``allow_experimental=True``, Qwen2/2.5-VL
(region-adaptive variant, :func:`region_adaptive_select`). Signals: ``vit_cls_logits@-1`` (the
head-mean pre-softmax CLS logits of the last CLIP layer, one row per view, recomputed from that
layer's input so SDPA stays on); ``vit_cls@-1`` for ``crop_score="probs"``; Qwen: ``vit_received@b``
of the last full-attention block. Policy-level deviations:

* thumbnail order: ``thumbnail_order="score"`` (default, reference P2): the thumbnail's kept tokens
  reach the LLM in descending-score order, followed by the crop tokens in raster order with every
  newline at its native slot. The policy declares ``sorted_output = False`` for this order (a
  property of the instance), so the hook layer emits its selection in the returned order: the kept
  tokens fill the sorted placeholder slots of the image (the first ``int(576*r)`` slots are the
  thumbnail's) and positions follow the slots (contiguous renumbering, reference). ``"raster"``
  (option) keeps the ascending native order. The LLaVA-1.5 thumbnail-only extension follows the same
  switch (score order by default); a single-view LLaVA-NeXT image is untouched (native order) and the
  Qwen variant is always raster (spec section 6).
* ``next_layout="reference"`` (bug-compatible P3/P4 layout with one newline per padded row) changes
  the number of newline tokens, which the native placeholders cannot express: only
  :func:`assemble_reference` (kernel level) reproduces it; the policy raises.
* the valid (unpadded) region is read from the native token layout (HF's own unpadding), which is the
  installed HF geometry the spec asks for in native mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.policy import Context, ImageTokens, TokenPolicy
from vtprune.registry import register

from ._common import (
    PACKED_VIT_FAMILIES,
    ViewGrid,
    check_choice,
    llava_feature_layer,
    score_dtype,
    stable_topk,
    view_grids,
)

#: families without a CLS token: only the experimental region-adaptive variant (received attention)
_NO_CLS_FAMILIES = PACKED_VIT_FAMILIES + ("llava_onevision",)

__all__ = [
    "NEWLINE",
    "ValidRegion",
    "cls_logit_scores",
    "region_sums",
    "region_softmax",
    "crop_scales",
    "crop_budgets",
    "valid_region",
    "crop_valid_indices",
    "guidance_blocks",
    "select_thumbnail",
    "select_crop",
    "Globalcom2Selection",
    "globalcom2_select",
    "assemble_native",
    "assemble_reference",
    "region_index",
    "region_adaptive_select",
    "GlobalCom2",
]

#: Marker for an ``image_newline`` token in the assembled sequences.
NEWLINE: tuple[int, int] = (-1, -1)



def _as_grid(g: Tensor) -> Tensor:
    if g.dim() == 2:
        return g
    if g.dim() == 1:
        side = math.isqrt(g.numel())
        if side * side != g.numel():
            raise ValueError(f"1-D map of length {g.numel()} is not square; pass a 2-D grid")
        return g.view(side, side)
    raise ValueError(f"expected a 1-D or 2-D map; got shape {tuple(g.shape)}")



# ------------------------------------------------------------------------------------ signals
def cls_logit_scores(q0: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Head mean of the pre-softmax scaled CLS logits.

    q0: (V, H, hd) CLS query per view and head; k: (V, H, N, hd) patch keys. scale defaults to
    ``hd ** -0.5``. Returns (V, N) ``mean_h (q0_h * scale) . k_{j,h}`` in at least fp32.
    """
    if q0.dim() != 3 or k.dim() != 4:
        raise ValueError("q0 must be (V, H, hd) and k (V, H, N, hd)")
    dt = score_dtype(q0)
    if scale is None:
        scale = q0.shape[-1] ** -0.5
    logits = torch.einsum("vhd,vhnd->vhn", q0.to(dt) * scale, k.to(dt))
    return logits.mean(dim=1)


# ------------------------------------------------------------------------------------ scales
def region_sums(g_grid: Tensor, nph: int, npw: int) -> Tensor:
    """Sum of the thumbnail map over each crop's region, float64, (nph*npw,) row-major.

    g_grid: (Hg, Wg) map, or (Hg*Wg,) for a square grid. ``ph = max(Hg // nph, 1)``, ``pw = max(Wg //
    npw, 1)``; token (i, j) belongs to crop ``(min(i // ph, nph-1), min(j // pw, npw-1))``. Padding is
    ignored (as the reference).
    """
    g = _as_grid(g_grid).to(torch.float64)
    Hg, Wg = g.shape
    ph, pw = max(Hg // nph, 1), max(Wg // npw, 1)
    ri = torch.clamp(torch.arange(Hg) // ph, max=nph - 1)
    cj = torch.clamp(torch.arange(Wg) // pw, max=npw - 1)
    cid = (ri[:, None] * npw + cj[None, :]).flatten().to(g.device)
    return torch.zeros(nph * npw, dtype=torch.float64, device=g.device).index_add_(0, cid, g.flatten())


def region_softmax(S: Tensor, tau: float = 10.0) -> Tensor:
    """``sigma = exp((S - max S)/tau) / (sum exp((S - max S)/tau) + 1e-8)`` in float64."""
    S = S.to(torch.float64)
    e = torch.exp((S - S.max()) / tau)
    return e / (e.sum() + 1e-8)


def crop_scales(g_grid: Tensor, nph: int, npw: int, r: float = 0.25, tau: float = 10.0) -> Tensor:
    """Per-crop retention ratios ``s_c = min(r*(1 + sigma_c - mean(sigma)), 1)``, float64 (k,).

    g_grid: thumbnail logits (24, 24) or (576,) (any 2-D grid for the Qwen variant). Crops in
    row-major order, k = nph*npw. No lower clip (reference).
    """
    sigma = region_softmax(region_sums(g_grid, nph, npw), tau)
    s = r * (1.0 + sigma - sigma.mean())
    return torch.clamp(s, max=1.0)


def crop_budgets(n_valid: Sequence[int], scales: Tensor) -> list[int]:
    """``keep_c = int(N_c * s_c)`` (floor, Python float arithmetic)."""
    return [int(n * float(s)) for n, s in zip(n_valid, scales.tolist())]


# ----------------------------------------------------------------------------------- geometry
class ValidRegion(NamedTuple):
    """Unpadded region of the padded crop grid (H = nph*pps rows, W = npw*pps columns).

    Valid rows ``[top, bottom)`` and columns ``[left, right)`` of the padded global token grid.
    """

    top: int
    bottom: int
    left: int
    right: int
    nph: int
    npw: int
    pps: int

    @property
    def H(self) -> int:
        return self.nph * self.pps

    @property
    def W(self) -> int:
        return self.npw * self.pps

    @property
    def H_u(self) -> int:
        return self.bottom - self.top

    @property
    def W_u(self) -> int:
        return self.right - self.left

    def crop_rows(self, i: int) -> tuple[int, int]:
        """Valid padded-grid rows ``[a, b)`` of crop row i."""
        a, b = i * self.pps, (i + 1) * self.pps
        return max(a, self.top), min(b, self.bottom)

    def crop_cols(self, j: int) -> tuple[int, int]:
        """Valid padded-grid columns ``[a, b)`` of crop column j."""
        a, b = j * self.pps, (j + 1) * self.pps
        return max(a, self.left), min(b, self.right)

    def crop_shape(self, c: int) -> tuple[int, int]:
        """``(h_c, w_c)`` valid height and width of crop c (row-major), zeros if fully padded."""
        i, j = divmod(c, self.npw)
        r0, r1 = self.crop_rows(i)
        c0, c1 = self.crop_cols(j)
        return max(r1 - r0, 0), max(c1 - c0, 0)

    def crop_shapes(self) -> list[tuple[int, int]]:
        return [self.crop_shape(c) for c in range(self.nph * self.npw)]

    def n_valid(self) -> list[int]:
        """``N_c`` per crop, row-major."""
        return [h * w for h, w in self.crop_shapes()]


def valid_region(
    h0: int, w0: int, nph: int, npw: int, patches_per_side: int = 24, rounding: str = "hf"
) -> ValidRegion:
    """Valid (unpadded) rows/columns of the ``nph*pps x npw*pps`` crop grid for an image (h0, w0).

    h0, w0: original image height and width (HF ``image_sizes`` order). Follows ``unpad_image``:
    if ``w0/h0 > W/H``: ``new_h = h0 * (W / w0)``, rows ``[pad, H - pad)`` with ``pad = (H - new_h)//2``;
    else the same on columns. ``rounding="hf"`` (HF 5.x): ``int(round(x, 7))``; ``"original"``
    (original LLaVA / reference): ``int(x)``.
    """
    if rounding not in ("hf", "original"):
        raise ValueError(f"rounding must be 'hf' or 'original'; got {rounding!r}")
    H, W = nph * patches_per_side, npw * patches_per_side

    def rnd(v: float) -> int:
        return int(round(v, 7)) if rounding == "hf" else int(v)

    if w0 / h0 > W / H:
        new_h = rnd(h0 * (W / w0))
        pad = (H - new_h) // 2
        return ValidRegion(pad, H - pad, 0, W, nph, npw, patches_per_side)
    new_w = rnd(w0 * (H / h0))
    pad = (W - new_w) // 2
    return ValidRegion(0, H, pad, W - pad, nph, npw, patches_per_side)


def crop_valid_indices(valid: ValidRegion, c: int) -> Tensor:
    """Patch indices (``0 .. pps*pps - 1``, row-major inside crop c) of crop c's valid tokens, in
    valid raster order. Length ``N_c``."""
    i, j = divmod(c, valid.npw)
    r0, r1 = valid.crop_rows(i)
    c0, c1 = valid.crop_cols(j)
    p = valid.pps
    rows = torch.arange(max(r0, 0), max(r1, r0)) - i * p
    cols = torch.arange(max(c0, 0), max(c1, c0)) - j * p
    return (rows[:, None] * p + cols[None, :]).flatten()


def guidance_blocks(g_grid: Tensor, valid: ValidRegion) -> list[Tensor]:
    """Thumbnail map upsampled onto the unpadded grid and split into per-crop blocks.

    g_grid: (24, 24) or (576,). Upsampled with ``F.interpolate(bilinear, align_corners=False)`` to
    ``(H_u, W_u)`` in at least fp32, then split row-major: block (i, j) = rows ``[sum_{i'<i} h_{i',0},
    + h_{i,0})`` x columns ``[sum_{j'<j} w_{i,j'}, + w_{i,j})``. Returns k tensors of shape
    (h_c, w_c) (flatten row-major for gamma_c).
    """
    g = _as_grid(g_grid)
    g = g.to(score_dtype(g))
    up = F.interpolate(g[None, None], size=(valid.H_u, valid.W_u), mode="bilinear", align_corners=False)
    up = up[0, 0]
    shapes = valid.crop_shapes()
    blocks = []
    row0 = 0
    for i in range(valid.nph):
        h_i = shapes[i * valid.npw][0]
        col0 = 0
        for j in range(valid.npw):
            h, w = shapes[i * valid.npw + j]
            blocks.append(up[row0 : row0 + h, col0 : col0 + w])
            col0 += w
        row0 += h_i
    return blocks


# ---------------------------------------------------------------------------------- selection
def select_thumbnail(g: Tensor, r: float, order: str = "score") -> Tensor:
    """Thumbnail selection: ``int(n*r)`` indices (n = g.numel(), 576) with the largest logits.

    g: (n,) or (24, 24). ``order="score"`` (reference): descending score, ties by lowest index;
    ``"raster"``: ascending index. Returns (k_g,) long.
    """
    g = g.flatten().to(score_dtype(g))
    k = int(g.numel() * r)
    idx = stable_topk(g, k)
    if order == "raster":
        idx = idx.sort().values
    elif order != "score":
        raise ValueError(f"order must be 'score' or 'raster'; got {order!r}")
    return idx


def select_crop(local_logits_valid: Tensor, guidance_block: Tensor, keep_c: int) -> Tensor:
    """Holistic crop selection: ``normalize(local) + normalize(guidance)`` (l2 over the crop, eps
    1e-12), top ``keep_c``, ties by lowest index.

    local_logits_valid: (N_c,) crop logits at its valid tokens in valid raster order;
    guidance_block: (h_c, w_c) or (N_c,). Returns (keep_c,) indices **into the valid list**, ascending.
    """
    dt = torch.promote_types(score_dtype(local_logits_valid), score_dtype(guidance_block))
    loc = local_logits_valid.flatten().to(dt)
    gam = guidance_block.flatten().to(dt)
    if loc.numel() != gam.numel():
        raise ValueError(f"local ({loc.numel()}) and guidance ({gam.numel()}) lengths differ")
    score = F.normalize(loc, dim=0, eps=1e-12) + F.normalize(gam, dim=0, eps=1e-12)
    return stable_topk(score, keep_c).sort().values


class Globalcom2Selection(NamedTuple):
    """Selection for one image: thumbnail indices (thumbnail order), per-crop kept indices into the
    valid lists (ascending), the scales (float64), the crop budgets and the valid region."""

    thumbnail: Tensor
    crops: list[Tensor]
    scales: Tensor
    budgets: list[int]
    valid: ValidRegion


def globalcom2_select(
    g: Tensor,
    crop_logits: Tensor,
    valid: ValidRegion,
    r: float = 0.25,
    tau: float = 10.0,
    thumbnail_order: str = "score",
    guidance: bool = True,
) -> Globalcom2Selection:
    """Whole GlobalCom² selection for one AnyRes image.

    g: (576,) thumbnail logits; crop_logits: (k, 576) logits of the crops (row-major); valid: the
    image's :class:`ValidRegion`. ``guidance=False`` is the ablation without global guidance: every
    crop keeps ``int(N_c * r)`` tokens (no thumbnail-derived ratios) ranked by its own logits only
    (no upsampled thumbnail map). Returns :class:`Globalcom2Selection`.
    """
    k = valid.nph * valid.npw
    if crop_logits.shape[0] != k:
        raise ValueError(f"expected {k} crops; got {crop_logits.shape[0]}")
    thumb = select_thumbnail(g, r, thumbnail_order)
    if guidance:
        scales = crop_scales(g, valid.nph, valid.npw, r, tau)
    else:
        scales = torch.full((k,), float(r), dtype=torch.float64)
    budgets = crop_budgets(valid.n_valid(), scales)
    blocks = guidance_blocks(g, valid)
    crops = []
    for c in range(k):
        vi = crop_valid_indices(valid, c).to(crop_logits.device)
        local = crop_logits[c].flatten()[vi]
        if guidance:
            crops.append(select_crop(local, blocks[c], budgets[c]))
        else:
            crops.append(stable_topk(local.to(score_dtype(local)), budgets[c]).sort().values)
    return Globalcom2Selection(thumb, crops, scales, budgets, valid)


# ----------------------------------------------------------------------------------- assembly
def _kept_patch_sets(crop_keep: Sequence[Tensor], valid: ValidRegion) -> list[Tensor]:
    return [crop_valid_indices(valid, c)[torch.as_tensor(kp, dtype=torch.long).cpu()]
            for c, kp in enumerate(crop_keep)]


def assemble_native(
    thumb_idx: Tensor, crop_keep: Sequence[Tensor], valid: ValidRegion
) -> list[tuple[int, int]]:
    """Native layout (library default) for one image.

    thumb_idx: (k_g,) thumbnail patch indices in emission order; crop_keep: per crop, kept indices
    into its valid list; valid: the HF-rounded :class:`ValidRegion`. Returns the ordered list of
    ``(view, patch)`` (view 0 = thumbnail, c+1 = crop c; patch in ``0 .. pps*pps-1``) and
    :data:`NEWLINE` markers: thumbnail tokens, then for every unpadded row its kept crop tokens at
    their true positions in column order followed by one newline (H_u newlines).
    """
    p = valid.pps
    out: list[tuple[int, int]] = [(0, int(i)) for i in torch.as_tensor(thumb_idx).flatten().tolist()]
    kept = [set(s.tolist()) for s in _kept_patch_sets(crop_keep, valid)]
    for y in range(valid.top, valid.bottom):
        ci, py = divmod(y, p)
        for x in range(valid.left, valid.right):
            cj, px = divmod(x, p)
            c = ci * valid.npw + cj
            patch = py * p + px
            if patch in kept[c]:
                out.append((c + 1, patch))
        out.append(NEWLINE)
    return out


def assemble_reference(
    thumb_idx: Tensor, crop_keep: Sequence[Tensor], valid: ValidRegion
) -> list[tuple[int, int]]:
    """Reference layout (``next_layout="reference"``, bug-compatible P3/P4) for one image.

    Same inputs as :func:`assemble_native`; ``valid`` should use ``rounding="original"``. Each kept
    crop token (valid-list index v) is written to slot v of its crop's ``pps*pps`` buffer (P3), the
    buffers are laid out on the padded grid (nph*pps rows x npw*pps columns), a newline follows every
    padded row (P4), and only the occupied slots and the newlines are kept.
    """
    p = valid.pps
    out: list[tuple[int, int]] = [(0, int(i)) for i in torch.as_tensor(thumb_idx).flatten().tolist()]
    slots: dict[tuple[int, int], tuple[int, int]] = {}
    for c, kp in enumerate(crop_keep):
        ci, cj = divmod(c, valid.npw)
        vidx = crop_valid_indices(valid, c)
        for v in torch.as_tensor(kp).flatten().tolist():
            sy, sx = divmod(int(v), p)
            slots[(ci * p + sy, cj * p + sx)] = (c + 1, int(vidx[v]))
    for y in range(valid.H):
        for x in range(valid.W):
            if (y, x) in slots:
                out.append(slots[(y, x)])
        out.append(NEWLINE)
    return out


# ------------------------------------------------------------------ Qwen region-adaptive (experimental)
def region_index(Hg: int, Wg: int, nph: int, npw: int) -> Tensor:
    """(Hg*Wg,) row-major region (virtual crop) id of every grid position, as :func:`region_sums`."""
    ph, pw = max(Hg // nph, 1), max(Wg // npw, 1)
    ri = torch.clamp(torch.arange(Hg) // ph, max=nph - 1)
    cj = torch.clamp(torch.arange(Wg) // pw, max=npw - 1)
    return (ri[:, None] * npw + cj[None, :]).flatten()


def region_adaptive_select(
    g_grid: Tensor, r: float = 0.25, tau: float = 10.0, region_tokens: int = 12
) -> tuple[Tensor, Tensor]:
    """Experimental Qwen variant (spec section 6; not GlobalCom²): keep per virtual crop.

    g_grid: (h', w') attention received per merged token. Virtual crops ``nph = max(1, round(h'/
    region_tokens))`` (likewise npw), ratios :func:`crop_scales`, ``keep_c = int(N_c * s_c)``, top
    ``keep_c`` by g inside each region (ties by the lowest index). Returns (raster indices ascending,
    the float64 scales).
    """
    g = _as_grid(g_grid)
    Hg, Wg = g.shape
    nph, npw = max(1, round(Hg / region_tokens)), max(1, round(Wg / region_tokens))
    scales = crop_scales(g, nph, npw, r, tau)
    rid = region_index(Hg, Wg, nph, npw).to(g.device)
    flat = g.flatten().to(score_dtype(g))
    counts = [int((rid == c).sum()) for c in range(nph * npw)]
    kept = []
    for c, k in enumerate(crop_budgets(counts, scales)):
        members = torch.nonzero(rid == c).flatten()
        kept.append(members[stable_topk(flat[members], k)])
    return torch.sort(torch.cat(kept)).values, scales


# ------------------------------------------------------------------------------------------ policy
@register
@dataclass
class GlobalCom2(TokenPolicy):
    """GlobalCom² (Liu et al., AAAI 2026, arXiv 2501.05179): stage P, thumbnail-guided compression of
    LLaVA-NeXT AnyRes crops.

    The thumbnail (view 0) keeps ``int(n*r)`` tokens with the largest CLS logits of the last CLIP
    layer; each crop keeps ``int(N_c*s_c)`` of its valid tokens, ``s_c = r*(1 + sigma_c - mean sigma)``
    from the softmax(/tau) of the thumbnail's CLS-logit sums over the crop regions, ranked by the
    l2-normalised local logits plus the thumbnail map bilinearly upsampled onto the crop. Newlines are
    always kept (native layout). A single-view LLaVA-NeXT image passes untouched.

    Fields: ``keep`` = the retention ratio r (a float in (0, 1], default 0.25); ``tau`` (10);
    ``thumbnail_order`` (``"score"``: reference, the thumbnail tokens in descending-score order,
    emitted through ``sorted_output = False``; ``"raster"``: ascending index); ``crop_score`` (``"logits"`` reference /
    ``"probs"``: softmax CLS probabilities, our reading); ``next_layout`` (``"native"`` only);
    ``allow_experimental`` (Qwen region-adaptive variant); ``region_tokens`` (Qwen virtual crop side
    in merged tokens, 12 ~ 336 px); ``positions`` (stage-P convention).

    Extensions: LLaVA-1.5 thumbnail-only compression (not a published setting); Qwen2/2.5-VL and
    LLaVA-OneVision region-adaptive variant (experimental; ``ValueError`` unless
    ``allow_experimental=True``; results must not be reported as GlobalCom²). LLaVA-OneVision has no CLS
    token (SigLIP): the score is the attention each patch receives in the feature layer
    (``vit_received``, bilinearly resized with the canvas), and each view (base view, AnyRes canvas,
    video frame) is compressed region-adaptively on its own grid. Deviations: no reference layout (P3/P4 bugs); per image
    batching (P5 fixed); model dtype (no float16 cast); ties by the lowest index.
    """

    name: ClassVar[str] = "globalcom2"
    description: ClassVar[str] = "GlobalCom²: thumbnail-guided per-crop budgets for LLaVA-NeXT AnyRes (stage P)"
    keep: int | float = 0.25
    tau: float = 10.0
    thumbnail_order: str = "score"
    crop_score: str = "logits"
    next_layout: str = "native"
    allow_experimental: bool = False
    allow_single_view: bool = False
    region_tokens: int = 12
    guidance: bool = True

    def __post_init__(self):
        self._current: tuple[ImageTokens, Tensor] | None = None  # the image apply() is selecting for
        self._signal: str | None = None  # the signal name of the patched model (required_signals)

    def validate(self, family: str, adapter: Any) -> None:
        if family == "llava" and not self.allow_single_view:
            raise ValueError(
                "globalcom2 compresses LLaVA-NeXT AnyRes crops under the guidance of the thumbnail; this "
                "LLaVA-1.5 model has a single view (no thumbnail + crops layout). Use a LLaVA-NeXT model, or "
                "pass allow_single_view=True for the thumbnail-only extension (not a published GlobalCom² setting)"
            )
        if family == "llava_onevision" and not self.allow_experimental:
            raise ValueError(
                "globalcom2 ranks LLaVA-NeXT crops by the CLS-attention logits of a CLIP tower; LLaVA-OneVision's "
                "SigLIP tower has no CLS token and its anyres_max canvas is resized (the crops mix), and the "
                "paper's no-CLS fallback is not published in code. Use hiprune or visionzip (received-attention "
                "scores), or pass allow_experimental=True for the region-adaptive variant on received attention "
                "(its results must not be reported as GlobalCom²)"
            )
        if family in PACKED_VIT_FAMILIES and not self.allow_experimental:
            raise ValueError(
                f"globalcom2 is defined for LLaVA-NeXT AnyRes images (and LLaVA-1.5 thumbnail-only); on {family!r} "
                "only the experimental region-adaptive variant exists: pass allow_experimental=True "
                "(its results must not be reported as GlobalCom²)"
            )
        super().validate(family, adapter)
        if isinstance(self.keep, int) or not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"globalcom2: keep={self.keep!r} is the retention ratio r, a float in (0, 1] (e.g. 0.25)")
        if not self.tau > 0:
            raise ValueError(f"globalcom2: tau={self.tau} must be > 0")
        check_choice("globalcom2", "thumbnail_order", self.thumbnail_order, ("score", "raster"))
        check_choice("globalcom2", "crop_score", self.crop_score, ("logits", "probs"))
        if self.next_layout == "reference":
            raise ValueError(
                "globalcom2: next_layout='reference' (one newline per padded row, bug P4) cannot be expressed "
                "with the model's native placeholders; use next_layout='native' (the reference layout is "
                "available as the kernel assemble_reference)"
            )
        check_choice("globalcom2", "next_layout", self.next_layout, ("native",))
        if family in _NO_CLS_FAMILIES and self.crop_score != "logits":
            raise ValueError(f"globalcom2 ({family}, experimental): crop_score does not apply (received attention "
                             "is used)")
        if int(self.region_tokens) < 1:
            raise ValueError(f"globalcom2: region_tokens={self.region_tokens} must be >= 1")
        self._signal = self._signal_name(adapter)

    @property
    def sorted_output(self) -> bool:  # type: ignore[override]
        """False for the reference ``thumbnail_order="score"``: the selection's order is emitted."""
        return self.thumbnail_order != "score"

    def _signal_name(self, adapter: Any) -> str:
        if adapter.family in PACKED_VIT_FAMILIES:
            return f"vit_received@{adapter.full_attention_blocks()[-1]}"
        if adapter.family == "llava_onevision":  # the feature layer's received attention (no CLS)
            return f"vit_received@{llava_feature_layer(adapter, self.name, 'layer')}"
        return "vit_cls@-1" if self.crop_score == "probs" else "vit_cls_logits@-1"

    def required_signals(self, adapter: Any) -> dict[str, Any]:
        return {self._signal_name(adapter): None}

    # ---------------------------------------------------------------- selection
    def apply(self, image: ImageTokens, ctx: Context):
        """Compute the selection once per image; the base class then enforces the invariants."""
        self._current = (image, self._select_image(image, ctx.family))
        try:
            return super().apply(image, ctx)
        finally:
            self._current = None

    def _selection(self, image: ImageTokens) -> Tensor:
        cur = self._current
        if cur is None or cur[0] is not image:
            raise RuntimeError("globalcom2: budget/select are only called through apply()")
        return cur[1]

    def budget(self, image: ImageTokens) -> int:
        return int(self._selection(image).numel())

    def select(self, image: ImageTokens, n_keep: int, ctx: Context) -> Tensor:
        return self._selection(image)

    def _score(self, image: ImageTokens) -> Tensor:
        name = self._signal
        if name is None:  # not validated against an adapter (kernel-level use): the image's one signal
            if len(image.signals) != 1:
                raise RuntimeError("globalcom2: call validate() first, or give the image exactly one signal")
            (name,) = image.signals
        return image.signals[name].detach().float().cpu()

    def _select_image(self, image: ImageTokens, family: str) -> Tensor:
        """(n_keep,) kept token indices of one image in emission order: ascending, except the
        thumbnail's tokens in descending-score order (first) when ``thumbnail_order="score"``."""
        r = float(self.keep)
        score = self._score(image)
        grids = view_grids(image, family, method="globalcom2")
        if family in _NO_CLS_FAMILIES:
            kept = []
            for vg in grids:  # one temporal slice / OneVision view (base, AnyRes canvas, frame) at a time
                local, _ = region_adaptive_select(vg.scatter(score[vg.index]).view(vg.rows, vg.cols), r,
                                                  self.tau, int(self.region_tokens))
                kept.append(vg.tokens_of(local))
            return torch.sort(torch.cat(kept)).values
        thumb = grids[0]
        if len(grids) == 1:
            if family == "llava_next":  # single-view AnyRes image: untouched (reference)
                return image.candidate_index()
            g = thumb.scatter(score[thumb.index])
            return thumb.tokens_of(select_thumbnail(g, r, self.thumbnail_order))
        return self._select_anyres(image, score, grids, r)

    def _select_anyres(self, image: ImageTokens, score: Tensor, grids: list[ViewGrid], r: float) -> Tensor:
        thumb = grids[0]
        side = thumb.rows
        H, W = image.grid_shapes[1]
        nph, npw = H // side, W // side
        crop_tok = image.candidate.cpu() & (image.view.cpu() >= 1)
        gpos = image.grid.cpu()[crop_tok]
        valid = ValidRegion(int(gpos[:, 0].min()), int(gpos[:, 0].max()) + 1,
                            int(gpos[:, 1].min()), int(gpos[:, 1].max()) + 1, nph, npw, side)
        if valid.H_u * valid.W_u != int(crop_tok.sum()):
            raise RuntimeError("globalcom2: the crop tokens do not form the unpadded rectangle of the crop grid")
        crop_logits = torch.zeros((nph * npw, side * side), dtype=torch.float32)
        by_view = {vg.view: vg for vg in grids[1:]}
        for v, vg in by_view.items():
            crop_logits[v - 1] = vg.scatter(score[vg.index])
        g = thumb.scatter(score[thumb.index])
        sel = globalcom2_select(g, crop_logits, valid, r, self.tau, self.thumbnail_order, self.guidance)
        thumb_tokens = thumb.tokens_of(sel.thumbnail)  # thumbnail order (score or raster)
        crops = [by_view[c + 1].tokens_of(crop_valid_indices(valid, c)[keep_c.cpu()])
                 for c, keep_c in enumerate(sel.crops) if keep_c.numel()]
        crop_tokens = torch.sort(torch.cat(crops)).values if crops else thumb_tokens[:0]
        # the native layout puts the thumbnail (view 0) before every crop token, so thumbnail first and
        # then the crops in native (raster, newline-interleaved) order is the reference's sequence
        return torch.cat([thumb_tokens, crop_tokens])
