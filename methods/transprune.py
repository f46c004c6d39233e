"""TransPrune: token-transition pruning inside the LLM decoder (pure tensor kernels).

Paper: Li, Duan, et al., "TransPrune: Token Transition Pruning for Efficient Large Vision-Language
Model", arXiv 2507.20630 (CVPR 2026). Reference implementation: github.com/liaolea/TransPrune at
commit ``c9e8284`` (a LLaVA fork; ``llava/model/modeling_llama_transprune.py``). Spec:
``docs/methods/transprune.md``.

Stage: **D** (inside the decoder), progressive over 3 stages at the 1-based layers 7, 9, 12 (prune
after that layer), prefill only; at decode only per-stage position offsets apply.

Method:

* Token transition variation (:func:`ttv`) of one module with input/output ``x_in``, ``x_out``:
  ``m_i = |x_out,i| / |x_in,i|``, ``e_i = exp(1 - cos(x_in,i, x_out,i))``, ``w_i = e_i / sum_j e_j``,
  ``TTV_i = m_i * w_i``; a layer's TTV is attention + FFN, accumulated over layers 7..p.
* Instruction-guided attention (:func:`iga`): head-mean attention probabilities (layer p+1's
  norm/q/k) from the instruction rows ``[img + n_s, L_prompt)`` to the image columns, averaged over
  the rows.
* Selection (:func:`transprune_select`): both renormalised to sum 1 (``+1e-8``), ``score =
  alpha*T + (1 - alpha)*I``, top ``n_{s+1}`` (ties lowest index), sorted.
* Schedule (:func:`stage_counts`): ``n_s = int(n_0 * r_s)`` relative to n_0, "High" = (0.875, 0.625,
  0.125): 576 -> 504 -> 360 -> 72.
* Positions (LLaVA reference): contiguous renumbering after each prune; at decode, layers after p_s
  see ``L_full + t - (n_0 - n_{s+1})`` (:func:`decode_offsets`).

Reference vs paper vs library (spec section 5):

1. Direction term: reference ``1 - cos`` (signed); paper ``1 - |cos|``. Library: signed;
   ``direction="abs"``.
2. Softmax domain of e: reference sums over the whole sequence **and whole batch**; paper "all tokens"
   (read: image tokens). Library: per sample over the non-padding sequence (= reference at bs 1),
   ``norm_scope="image"`` (paper reading), ``"batch"`` (bug-compatible batch coupling).
3. TTV and IGA renormalised to sum 1 over the current image tokens before adding: reference yes,
   paper silent. Library: reference.
4. Weighting: reference ``T + I``; paper ``alpha*TTV + (1 - alpha)*IGA`` with alpha = 0.5. Library:
   alpha-form, alpha = 0.5 (identical ranking; scores are half the reference's).
5. Ratios: relative to n_0 with ``int()`` floor (reference); ``keep_ratios`` option.
6. Layer semantics: 1-based, prune after layer p, IGA with layer p+1's norm/q/k, TTV includes layer p
   (reference; ``prune_layers``/``accum_layers`` at policy level).
7. Positions: reference renumbers contiguously with per-stage decode offsets (library default on
   LLaVA, ``positions="renumber"`` via ``"auto"``); ``positions="original"`` is our extension and the
   default on Qwen (policy level).
8. Instruction rows: everything after the image up to the end of the prompt, template tail included
   (reference).
9. Batch size 1 only in the reference (**bug**): library per sample.
10. Overhead in the reference (hidden-state clones, TTV at decode, ``cuda.synchronize``) (**bug**):
    library computes TTV only at prefill, only for accumulation layers (policy level).
11. GQA: the reference's IGA lacks ``repeat_kv`` (**bug** for GQA): library repeats (signal level).
12. Eager attention breaks in the reference after a prune (**bug**): library gathers per-layer masks.
13. Multi-image / long prompts: reference handles only the first image and truncates at 2048;
    library handles all images (quota per image, policy level), no truncation.
14. Ties: reference ``topk`` order unspecified; library lowest index.

Scores are computed in fp32 (float64 stays float64).

Policy (:class:`TransPrune`, registered ``"transprune"``; stage D on all ten families; on the hybrid Qwen3.5
the IGA rows are those of the last full-attention layer at or before the pruning layer, as it runs, and
the attention TTV of a Gated DeltaNet layer is measured across its ``linear_attn``). Hook-layer signals (``vtprune/decoder.py``): ``attn_io``/``mlp_io`` forward hooks on the
accumulation layers' ``self_attn`` and ``mlp`` (reduced at once to the (B, L) TTV by
:meth:`TransPrune.reduce_io`), ``post_visual_rows`` (IGA rows: every prompt row after the last visual
token, head mean, averaged over the rows, recomputed with the pruning layer's own norm/q/k, GQA keys
repeated) and ``image_tokens_in`` (n_0 per image). All stay aligned with the shrinking sequence.
Deviations of the policy from the reference, besides the kernel-level ones above:

* positions: ``positions="auto"`` (default) resolves per family: ``"renumber"`` on LLaVA-1.5 and
  LLaVA-NeXT (the reference, spec section 3 steps 6-7), ``"original"`` on Qwen2/2.5-VL (spec section
  6). ``"renumber"``: after every prune the surviving tokens of each sample are numbered
  contiguously over its real tokens (from its first real token's position, 0 under ``generate``), the
  later layers get cos/sin recomputed for those positions with the language model's own rotary
  module, and at decode a layer after ``p_s`` sees ``L_full + t - (n_0 - n_{s+1})`` (per sample; the
  hook layer's ``position_handling``, ``vtprune/decoder.py``; :func:`decode_offsets` gives the
  offsets of one image). ``"original"`` (our extension, FastV-style) keeps the surviving tokens'
  positions. ``"renumber"`` on Qwen raises ``ValueError``: the spec allows a contiguous variant
  there but calls it ill-defined for 3-D M-RoPE positions; not implemented.
* renumbering with padding (library): a left-padded sample is numbered from the position of its
  first real token, so a batch equals each sample alone; with several images per sample the offset
  is the total count removed before the layer (all images).
* several images per sample: TTV and IGA are normalised over the sample's image pool, the budget is
  the sum of the per-image quotas ``int(n_0^i * r_s)``, and the top-k is taken inside each image.
* LLaVA-NeXT: n_0 counts every visual feature of the image, newline tokens included (reference).
* ``score="ttv"`` (TTV only; the IGA signal is then not computed) and ``score="iga"`` are ablations.
* Qwen2/2.5-VL (no reference code): same layers and ratios, original M-RoPE positions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.policy import Context, DecoderPolicy, DecoderView, Policy
from vtprune.registry import register

from ._common import ONE_D_POSITION_FAMILIES, score_dtype, stable_topk, view_images

__all__ = [
    "HIGH_RATIOS",
    "ttv",
    "iga",
    "stage_counts",
    "transprune_scores",
    "transprune_select",
    "keep_gather_index",
    "decode_offsets",
    "TransPrune",
]

#: The released "High" schedule (relative to n_0; the loader prepends 1.0).
HIGH_RATIOS: tuple[float, float, float] = (0.875, 0.625, 0.125)



def _span_mask(image_span, B: int, L: int, device) -> Tensor:
    if isinstance(image_span, Tensor) and image_span.dtype == torch.bool:
        if tuple(image_span.shape) != (B, L):
            raise ValueError(f"image_span mask must be (B, L) = {(B, L)}")
        return image_span.to(device)
    spans = image_span
    if len(spans) == 2 and all(isinstance(v, int) for v in spans):
        spans = [tuple(spans)] * B
    if len(spans) != B:
        raise ValueError("image_span must be (start, end), B such pairs, or a (B, L) bool mask")
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    for b, (s, e) in enumerate(spans):
        mask[b, s:e] = True
    return mask


_COS_EPS = 1e-8  # F.cosine_similarity's default eps (each norm clamped)
_CHUNK = 64  # tokens converted to the score dtype at a time: small buffers, no fresh (page-faulting) copies


def _norms_and_dot(x: Tensor, y: Tensor, dt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L) ``|x|``, ``|y|`` and ``x.y`` over the last dim of (B, L, D) tensors, computed in ``dt``,
    a chunk of tokens at a time (exact: every token's reductions see the same values)."""
    B, L, _ = x.shape
    out = torch.empty((3, B, L), dtype=dt, device=x.device)
    for s in range(0, L, _CHUNK):
        a, o = x[:, s : s + _CHUNK].to(dt), y[:, s : s + _CHUNK].to(dt)
        torch.linalg.vector_norm(a, dim=-1, out=out[0, :, s : s + _CHUNK])
        torch.linalg.vector_norm(o, dim=-1, out=out[1, :, s : s + _CHUNK])
        out[2, :, s : s + _CHUNK] = torch.linalg.vecdot(a, o)
    return out[0], out[1], out[2]


def ttv(
    x_in: Tensor,
    x_out: Tensor,
    valid_mask: Tensor | None = None,
    direction: str = "signed",
    norm_scope: str = "sequence",
    image_span=None,
) -> Tensor:
    """Token transition variation of one module (attention or FFN), in at least fp32.

    x_in, x_out: (B, L, D) module input (normed) and output (before the residual add).
    valid_mask: (B, L) bool, True for real tokens (None = all real); padding gets TTV 0.
    direction: ``"signed"`` (reference, ``e = exp(1 - cos)``) or ``"abs"`` (paper, ``exp(1 - |cos|)``).
    norm_scope: the sum in ``w_i = e_i / sum e``: ``"sequence"`` (real tokens of the same sample;
    library default), ``"image"`` (the sample's image tokens only; paper reading; needs
    ``image_span`` = (start, end), B pairs, or a (B, L) bool mask; other tokens get 0), ``"batch"``
    (real tokens of all samples; reference bug-compatible).
    Returns (B, L) ``TTV_i = m_i * w_i``.
    """
    if x_in.shape != x_out.shape or x_in.dim() != 3:
        raise ValueError("x_in and x_out must both be (B, L, D)")
    dt = torch.promote_types(score_dtype(x_in), score_dtype(x_out))
    B, L, _ = x_in.shape
    a = x_in  # for the device / shapes below
    mask = torch.ones(B, L, dtype=torch.bool, device=a.device) if valid_mask is None else valid_mask.to(a.device).bool()
    na, no, dot = _norms_and_dot(x_in, x_out, dt)
    m = no / na
    cos = dot / (na.clamp_min(_COS_EPS) * no.clamp_min(_COS_EPS))
    if direction == "signed":
        e = torch.exp(1.0 - cos)
    elif direction == "abs":
        e = torch.exp(1.0 - cos.abs())
    else:
        raise ValueError(f"direction must be 'signed' or 'abs'; got {direction!r}")
    if norm_scope == "sequence":
        scope = mask
        e = torch.where(scope, e, torch.zeros_like(e))
        Z = e.sum(dim=-1, keepdim=True)
    elif norm_scope == "image":
        if image_span is None:
            raise ValueError("norm_scope='image' needs image_span")
        scope = mask & _span_mask(image_span, B, L, a.device)
        e = torch.where(scope, e, torch.zeros_like(e))
        Z = e.sum(dim=-1, keepdim=True)
    elif norm_scope == "batch":
        scope = mask
        e = torch.where(scope, e, torch.zeros_like(e))
        Z = e.sum()
    else:
        raise ValueError(f"norm_scope must be 'sequence', 'image' or 'batch'; got {norm_scope!r}")
    out = m * (e / Z)
    return torch.where(scope, out, torch.zeros_like(out))


def iga(
    attn_probs_head_mean: Tensor,
    img_start: int,
    n_img: int,
    prompt_end: int,
    query_start: int = 0,
) -> Tensor:
    """Instruction-guided attention to the current image tokens (unnormalised).

    attn_probs_head_mean: (B, Q, Lk) head-mean softmax probabilities (or (B, H, Q, Lk), averaged over
    heads here); row q is the query at absolute position ``query_start + q``. Uses the query rows
    ``[img_start + n_img, prompt_end)`` and the columns ``[img_start, img_start + n_img)``, averaged
    over the rows. Returns (B, n_img) in at least fp32.
    """
    a = attn_probs_head_mean
    if a.dim() == 4:
        a = a.to(score_dtype(a)).mean(dim=1)
    if a.dim() != 3:
        raise ValueError("attention must be (B, Q, Lk) or (B, H, Q, Lk)")
    a = a.to(score_dtype(a))
    r0, r1 = img_start + n_img - query_start, prompt_end - query_start
    if r0 < 0 or r1 > a.shape[1] or r1 <= r0:
        raise ValueError(f"query rows [{r0 + query_start}, {prompt_end}) not available")
    cols = a[:, r0:r1, img_start : img_start + n_img]
    return cols.mean(dim=1)


def stage_counts(n0: int, ratios: Sequence[float] = HIGH_RATIOS) -> tuple[int, ...]:
    """Image-token counts ``(n_0, n_1, ..., n_S)`` with ``n_s = int(n_0 * r_s)`` (floor, relative to
    n_0; Python float arithmetic). ``stage_counts(576) == (576, 504, 360, 72)``."""
    return (int(n0),) + tuple(int(n0 * r) for r in ratios)


def transprune_scores(ttv_acc_img: Tensor, iga_img: Tensor, alpha: float = 0.5) -> Tensor:
    """``alpha * T/(sum T + 1e-8) + (1 - alpha) * I/(sum I + 1e-8)``; inputs (B, n), output (B, n)."""
    dt = torch.promote_types(score_dtype(ttv_acc_img), score_dtype(iga_img))
    t, i = ttv_acc_img.to(dt), iga_img.to(dt)
    t_hat = t / (t.sum(dim=-1, keepdim=True) + 1e-8)
    i_hat = i / (i.sum(dim=-1, keepdim=True) + 1e-8)
    return alpha * t_hat + (1.0 - alpha) * i_hat


def transprune_select(ttv_acc_img: Tensor, iga_img: Tensor, n_keep: int, alpha: float = 0.5) -> Tensor:
    """Indices (B, n_keep) into the current image span to keep, ascending.

    ttv_acc_img: (B, n) accumulated TTV over the image tokens; iga_img: (B, n) IGA. Top ``n_keep`` of
    :func:`transprune_scores`, ties by the lowest index. 1-D inputs give a 1-D result.
    """
    squeeze = ttv_acc_img.dim() == 1
    t = ttv_acc_img.unsqueeze(0) if squeeze else ttv_acc_img
    i = iga_img.unsqueeze(0) if squeeze else iga_img
    score = transprune_scores(t, i, alpha)
    keep = stable_topk(score, n_keep).sort(dim=-1).values
    return keep[0] if squeeze else keep


def keep_gather_index(L: int, img_start: int, n_img: int, keep: Tensor) -> Tensor:
    """Sequence gather index ``[0, img) ++ (img + keep) ++ [img + n_img, L)``.

    keep: (B, k) or (k,) indices into the image span. Returns (B, L - n_img + k) or (L - n_img + k,);
    use it for the hidden states, the stored per-layer TTV vectors and the masks.
    """
    squeeze = keep.dim() == 1
    k = keep.unsqueeze(0) if squeeze else keep
    B = k.shape[0]
    pre = torch.arange(img_start, device=k.device).expand(B, -1)
    post = torch.arange(img_start + n_img, L, device=k.device).expand(B, -1)
    idx = torch.cat([pre, k.long() + img_start, post], dim=1)
    return idx[0] if squeeze else idx


def decode_offsets(
    n0: int,
    ratios: Sequence[float] = HIGH_RATIOS,
    prune_layers: Sequence[int] = (7, 9, 12),
    n_layers: int = 32,
) -> tuple[int, ...]:
    """Per-layer (0-based index) decode position offsets for the contiguous-renumbering convention.

    A layer after the 1-based pruning layer ``p_s`` holds ``n_{s+1}`` image tokens and sees position
    ``L_full + t - (n_0 - n_{s+1})`` for decode token t; layers up to ``p_0`` get 0. Returns a tuple
    of ``n_layers`` offsets (<= 0): for n_0 = 576, High: 0 (layers 1-7), -72 (8-9), -216 (10-12),
    -504 (13-32).
    """
    counts = stage_counts(n0, ratios)
    if len(prune_layers) != len(ratios):
        raise ValueError("prune_layers and ratios must have the same length")
    out = []
    for i in range(n_layers):
        layer1 = i + 1
        s = sum(1 for p in prune_layers if layer1 > p)
        out.append(-(counts[0] - counts[s]))
    return tuple(out)


# ------------------------------------------------------------------------------------------ policy
def _int_tuple(value, what: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _tuple(value, what))


def _tuple(value, what: str) -> tuple:
    """Accept a tuple/list, a single number, or a spec-string form ``"7/9/12"`` (also ``;``)."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[/;\s]+", value.strip()) if p]
        try:
            return tuple(float(p) if any(c in p for c in ".eE") else int(p) for p in parts)
        except ValueError:
            raise ValueError(f"transprune: {what}={value!r}; use numbers separated by '/' (e.g. 7/9/12)") from None
    if isinstance(value, (int, float)):
        return (value,)
    return tuple(value)


@register
@dataclass
class TransPrune(DecoderPolicy):
    """TransPrune (Li, Duan et al., arXiv 2507.20630): stage D, progressive token-transition pruning.

    After each 1-based layer ``p_s`` of ``prune_layers`` (default 7, 9, 12) the image tokens are cut to
    ``n_{s+1} = int(n_0 * keep_ratios[s])`` (relative to the image's count at the LLM input n_0; default
    "High" 0.875/0.625/0.125: 576 -> 504 -> 360 -> 72), ranked by ``alpha * TTV + (1 - alpha) * IGA``
    (each normalised to sum 1 over the current image tokens):

    * TTV: token transition variation of the attention and FFN modules, summed over the accumulation
      layers ``accum_layers`` (1-based, default ``p_0 .. p_last`` = 7..12) up to ``p_s``;
    * IGA: the attention from the instruction rows (all prompt tokens after the image, chat tail
      included) to the image tokens, computed with layer ``p_s + 1``'s norm/q/k.

    Fields: ``prune_layers``, ``keep_ratios``, ``accum_layers`` (tuples; spec strings use ``7/9/12``),
    ``alpha`` (0.5), ``score`` (``"both"``; ``"ttv"`` = TTV-only mode, ``"iga"`` = IGA-only), ``ttv_direction``
    (``"signed"`` reference / ``"abs"`` paper), ``ttv_norm_scope`` (``"sequence"`` / ``"image"`` /
    ``"batch"``), ``positions`` (``"auto"``: ``"renumber"`` on LLaVA/LLaVA-NeXT, the reference's
    contiguous renumbering with per-stage decode offsets; ``"original"`` on Qwen; ``"original"`` keeps
    the surviving tokens' positions, our extension). The inherited ``layer``/``keep`` are unused and
    must stay None. Tiny LLMs need explicit layers, e.g. ``prune_layers=(1, 2, 3)``.

    Deviations from the reference (details in the module docstring): per-sample TTV
    normalisation (= reference at batch size 1); renumbering per sample from its first real token
    (batching); no contiguous renumbering on Qwen; GQA keys repeated in IGA; per-layer masks (eager
    works); all images of a sample (per-image quotas); ties by the lowest index; TTV computed only at
    prefill and only in the accumulation layers.
    """

    name: ClassVar[str] = "transprune"
    description: ClassVar[str] = (
        "TransPrune: progressive in-LLM pruning by token transition variation + instruction attention (stage D)"
    )
    layer: int | None = None
    keep: int | float | None = None
    prune_layers: tuple[int, ...] = (7, 9, 12)
    keep_ratios: tuple[float, ...] = HIGH_RATIOS
    accum_layers: tuple[int, ...] | None = None
    alpha: float = 0.5
    score: str = "both"
    ttv_direction: str = "signed"
    ttv_norm_scope: str = "sequence"
    positions: str = "auto"

    def __post_init__(self):
        self.prune_layers = _int_tuple(self.prune_layers, "prune_layers")
        self.keep_ratios = tuple(float(r) for r in _tuple(self.keep_ratios, "keep_ratios"))
        if self.accum_layers is not None:
            self.accum_layers = _int_tuple(self.accum_layers, "accum_layers")

    # ---------------------------------------------------------------- configuration
    def validate(self, family: str, adapter: Any) -> None:
        Policy.validate(self, family, adapter)
        if self.layer is not None or self.keep is not None:
            raise ValueError("transprune: use prune_layers (1-based) and keep_ratios instead of layer/keep")
        n = adapter.num_llm_layers()
        pl = self.prune_layers
        if not pl or list(pl) != sorted(set(pl)):
            raise ValueError(f"transprune: prune_layers={pl} must be strictly increasing 1-based layers")
        if pl[0] < 1 or pl[-1] > n - 1:
            raise ValueError(
                f"transprune: prune_layers={pl} must lie in 1..{n - 1} for this {n}-layer LLM "
                "(1-based: prune after that layer); the default (7, 9, 12) needs >= 13 layers"
            )
        if len(self.keep_ratios) != len(pl):
            raise ValueError(f"transprune: keep_ratios={self.keep_ratios} needs one ratio per prune layer {pl}")
        if not all(0.0 < r <= 1.0 for r in self.keep_ratios):
            raise ValueError(f"transprune: keep_ratios={self.keep_ratios} must lie in (0, 1] (relative to n_0)")
        if any(a < 1 or a > n for a in self._accum()):
            raise ValueError(f"transprune: accum_layers={self._accum()} must lie in 1..{n} (1-based)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"transprune: alpha={self.alpha} must lie in [0, 1]")
        for field_name, value, choices in (
            ("score", self.score, ("both", "ttv", "iga")),
            ("ttv_direction", self.ttv_direction, ("signed", "abs")),
            ("ttv_norm_scope", self.ttv_norm_scope, ("sequence", "image", "batch")),
        ):
            if value not in choices:
                raise ValueError(f"transprune: {field_name}={value!r}; choose one of {choices}")
        if self.positions not in ("auto", "original", "renumber"):
            raise ValueError(f"transprune: positions={self.positions!r}; choose one of ('auto', 'original', 'renumber')")
        if self.positions == "renumber" and family not in ONE_D_POSITION_FAMILIES:
            raise ValueError(
                f"transprune: positions='renumber' is defined for LLaVA/LLaVA-NeXT only; {family!r} uses 3-D "
                "M-RoPE positions (contiguous renumbering is ill-defined there): use positions='original' or 'auto'"
            )

    def resolved_positions(self, family: str) -> str:
        """``"renumber"`` (LLaVA/LLaVA-NeXT, reference) or ``"original"`` (Qwen) for ``"auto"``."""
        if self.positions != "auto":
            return self.positions
        return "renumber" if family in ONE_D_POSITION_FAMILIES else "original"

    def pruning_layers(self, num_layers: int) -> list[int]:
        """0-based layers whose input is pruned: pruning after 1-based layer p = before 0-based layer p."""
        return list(self.prune_layers)

    def position_handling(self, num_layers: int, family: str) -> dict[int, str]:
        """Hook-layer position handling of each pruning layer (``vtprune/decoder.py``)."""
        mode = self.resolved_positions(family)
        return {l: mode for l in self.pruning_layers(num_layers)}

    def _accum(self) -> tuple[int, ...]:
        if self.accum_layers is not None:
            return self.accum_layers
        return tuple(range(self.prune_layers[0], self.prune_layers[-1] + 1))

    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        kinds: dict[int, list[str]] = {0: ["image_tokens_in"]}
        if self.score != "iga":
            for a in self._accum():
                kinds.setdefault(a - 1, []).extend(["attn_io", "mlp_io"])
        if self.score != "ttv":
            for p in self.prune_layers:
                kinds.setdefault(p, []).append("post_visual_rows")
        return {l: tuple(k) for l, k in kinds.items()}

    def reduce_io(self, layer: int, kind: str, x_in: Tensor, x_out: Tensor, key_mask: Tensor, visual: Tensor) -> Tensor:
        """TTV of one module (attention or FFN) at prefill: (B, L) fp32."""
        return ttv(x_in, x_out, valid_mask=key_mask, direction=self.ttv_direction,
                   norm_scope=self.ttv_norm_scope, image_span=visual)

    # ---------------------------------------------------------------- selection
    def _stage(self, layer: int) -> int:
        return list(self.prune_layers).index(layer)

    def _images(self, view: DecoderView, layer: int) -> tuple[Tensor, list[tuple[Tensor, int]]]:
        """Current visual positions and, per image, (positions into ``vis``, quota ``n_{s+1}``)."""
        ratio = self.keep_ratios[self._stage(layer)]
        vis, images = view_images(view)
        return vis, [(members, min(stage_counts(n0, (ratio,))[1], members.numel())) for members, n0 in images]

    def budget_view(self, view: DecoderView, layer: int) -> int:
        """Sum of the per-image quotas ``int(n_0^i * r_s)`` (capped at the tokens still present)."""
        return sum(q for _, q in self._images(view, layer)[1])

    def select(self, layer: int, view: DecoderView, ctx: Context) -> Tensor:
        vis, images = self._images(view, layer)
        zeros = torch.zeros(vis.numel(), dtype=torch.float32, device=vis.device)
        t_acc, iga_img = zeros, zeros
        if self.score != "iga":
            for a in self._accum():
                if a - 1 < layer:  # 1-based a <= p_s
                    t_acc = t_acc + (view.signals[f"attn_io@{a - 1}"] + view.signals[f"mlp_io@{a - 1}"])[vis].float()
        if self.score != "ttv":
            iga_img = view.signals[f"post_visual_rows@{layer}"][vis].float()
        alpha = {"both": self.alpha, "ttv": 1.0, "iga": 0.0}[self.score]
        score = transprune_scores(t_acc[None], iga_img[None], alpha)[0]
        kept = []
        for members, quota in images:
            kept.append(stable_topk(score, quota, members))
        return torch.sort(vis[torch.cat(kept)]).values
