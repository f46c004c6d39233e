"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", EMNLP 2025, arXiv 2502.11494).

Duplication-aware reduction of visual tokens inside the LLM: pivot tokens + the tokens least
duplicated with them. Authors: Wen, Gao, Wang, Zhang, Zhang, Li, He, Zhang. The authors'
repository (github.com/ZichenWen1/DART) could not be fetched here; the reference is the port that
production toolchains ship, **ModelTC/LightCompress (LLMC+)** at commit ``9701d035``,
``llmc/compression/token_reduction/dart.py`` (``get_retained_image_token`` and its two hooks), read
together with its history (``c70c7f6c`` first port, ``7de3a7eb`` reshape fix, ``774e2c53``).

Stage: **D**, once, at prefill, at the input of decoder layer ``K`` (0-based; ``K = 2``: two unpruned
layers, the paper's and the authors' scripts' ``pruned_layer 2``). Text-aware only through the text
pivots. Decode reuses the shortened cache of layers >= K (static).

Algorithm, per sample (M visual tokens at positions ``S`` (M,), text after the last visual token at
positions ``T`` (n_t,), hidden width D):

1. Key norms (signal ``key_l1`` at layer K-1): ``a_i = ||k_i||_1`` over all KV heads (Hkv * hd
   values) of token i's key in layer K-1, rotary applied, i.e. what that layer's KV cache holds.
2. Pivots: the ``pivot_image`` visual tokens with the largest ``a`` and the ``pivot_text`` tokens of
   ``T`` with the largest ``a`` (P = pivot_image + pivot_text pivots).
3. States (signal ``final_norm`` at layer K): ``h = norm_final(x)`` (L, D), the input of layer K
   passed through the LLM's **final** RMSNorm.
4. Greedy duplication filter (:func:`dart_select`): the candidates are the visual tokens that are not
   pivots. For each pivot p in turn (order: ``pivot_order``) take the ``k_p`` candidates least similar
   to it, ``argtopk_j -cos(h_p, h_j)``, keep them and remove them from the candidates.
5. Kept visual tokens: image pivots + everything taken in step 4 (text pivots are text, never
   dropped). All text tokens are kept; survivors keep their **original** positions (FastV
   convention, as the reference's ``position_ids = keep_indexs``).

Budget (:func:`picks_per_pivot`): the reference takes the same ``k = int(M * (1 - ratio) / P)`` from
every pivot, so it keeps ``pivot_image + P * k`` tokens (124 of 576 for ratio 0.7778, "128"), not
``keep``. ``keep`` here is the reference's budget before that rounding: a float ``f`` gives ``k =
int(M * f / P)`` (``reduction_ratio=r`` gives exactly the reference's ``int(M * (1 - r) / P)``), an int
``n`` gives ``k = n // P`` (the authors' ``max_num_trunction``). ``budget_rule="exact"`` (our
extension) keeps exactly ``round(f * M)`` / ``n`` tokens: the ``n - pivot_image`` picks are spread
over the pivots, the first ``(n - pivot_image) mod P`` pivots in order taking one more.

Reference code vs paper (default = the code):

1. Similarity space: the code compares the tokens after the LLM's final RMSNorm (``normlayer =
   language_model.norm``); the paper speaks of the tokens' hidden states. ``similarity="hidden"``
   uses the raw input of layer K (cosine is scale-invariant, but the norm's per-channel weight is not).
2. Pivot order: the code visits the pivots in the iteration order of a CPython ``set`` built from the
   image-pivot positions (in ``topk`` order) followed by the text-pivot positions; since each pivot
   removes its picks before the next one chooses, this order changes the result. ``pivot_order="set"``
   (default) reproduces it (it is CPython's deterministic ``set`` order of those integers);
   ``"score"`` visits image pivots by decreasing key norm, then text pivots. The candidate list is the
   iteration order of the remaining positions' ``set`` as well (it decides ties only).
3. Kept count: see Budget above (``budget_rule="reference"`` default, ``"exact"`` option).
4. Pivot selection by the L1 norm of the keys ("K-norm" in the paper): the code's p = 1 norm over the
   flattened KV heads.

vtprune deviations (batching, numerics):

* The visual span is read from ``input_ids`` per sample (reference: a fixed start 35 on LLaVA / 15 on
  Qwen2.5-VL and the length of the first sample's span); the text pivots are the tokens after the
  sample's last visual token (reference: everything after the single image span).
* Batches: per sample, padding removed (reference: batch index 0 only, bs 1).
* Several images in a sample: one pool over all of them (reference: one image).
* LLaVA-NeXT: the image span's newline tokens are candidates like the other span tokens (the
  reference's span for LLaVA-1.6 includes them too).
* Key norms in fp32 from the layer's keys recomputed in its pre-hook (model dtype projections;
  reference: norms of the cached keys in the model dtype); cosine similarities in fp32 (float64 stays
  float64). SDPA stays on everywhere (the reference needs the cache of layer K-1, no eager).
* Not enough candidates (tiny images, large budgets): each pivot takes what is left (reference:
  ``topk`` error). Fewer text tokens than ``pivot_text``: all of them are pivots.
* Ties (equal norms or similarities): the earliest candidate in the reference's list order wins
  (reference: ``torch.topk`` order, unspecified).

Policy: :class:`DART` (``"dart"``), stage D on all ten families (Qwen3 keys include the k norm: the
adapter's ``llm_qk``; Qwen3-VL's layer-K input includes its DeepStack level; on the hybrid Qwen3.5 the
keys of layer K-1 are read at the last full-attention layer at or before it, and a K with none there
is a ``ValueError`` naming the first K that works).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.policy import Context, DecoderPolicy, DecoderView, check_keep_value, resolve_budget
from vtprune.registry import register

from ._common import check_choice, stable_topk

PIVOT_ORDERS = ("set", "score")
BUDGET_RULES = ("reference", "exact")
SIMILARITIES = ("final_norm", "hidden")


# ------------------------------------------------------------------------------------ kernels
def top_positions(scores: Tensor, positions: Sequence[int], k: int) -> list[int]:
    """The ``k`` entries of ``positions`` with the largest ``scores`` (same length), best first; ties
    go to the entry listed first."""
    k = min(k, len(positions))
    if k <= 0:
        return []
    return [int(positions[i]) for i in stable_topk(scores.double(), k).tolist()]


def picks_per_pivot(n_visual: int, n_pivots_cfg: int, n_pivot_image: int, n_pivots: int, *,
                    keep: int | float | None = None, reduction_ratio: float | None = None,
                    rule: str = "reference") -> list[int]:
    """How many candidates each of the ``n_pivots`` pivots takes (in visiting order).

    ``n_pivots_cfg`` = pivot_image + pivot_text as configured (the reference's divisor);
    ``n_pivot_image`` / ``n_pivots`` = the pivots actually present. ``rule="reference"``: every pivot
    takes ``k`` = ``int(M * (1 - reduction_ratio) / P)`` / ``int(M * keep / P)`` (float keep) /
    ``keep // P`` (int keep). ``rule="exact"``: ``round(keep * M)`` (or ``keep``) tokens in total,
    image pivots included, the remainder spread over the first pivots.
    """
    if n_pivots <= 0:
        return []
    if rule == "reference":
        if reduction_ratio is not None:
            k = int(n_visual * (1 - reduction_ratio) / n_pivots_cfg)
        elif isinstance(keep, float):
            k = int(n_visual * keep / n_pivots_cfg)
        else:
            k = int(keep) // n_pivots_cfg
        return [k] * n_pivots
    if rule != "exact":
        raise ValueError(f"budget rule {rule!r}; choose one of {BUDGET_RULES}")
    total = round(n_visual * (1 - reduction_ratio)) if reduction_ratio is not None else resolve_budget(keep, n_visual)
    rest = max(0, total - n_pivot_image)
    base, extra = divmod(rest, n_pivots)
    return [base + (1 if i < extra else 0) for i in range(n_pivots)]


def visiting_order(image_pivots: Sequence[int], text_pivots: Sequence[int], order: str = "set") -> list[int]:
    """Order in which the pivots choose. ``"set"``: the reference's, the iteration order of a CPython
    ``set`` of the positions (image pivots first, each list best first); ``"score"``: image pivots
    then text pivots, each best first."""
    if order == "set":
        return list(set(list(image_pivots) + list(text_pivots)))
    if order == "score":
        return list(dict.fromkeys(list(image_pivots) + list(text_pivots)))
    raise ValueError(f"pivot_order {order!r}; choose one of {PIVOT_ORDERS}")


def dart_select(key_norm: Tensor, states: Tensor, visual: Tensor, text: Tensor, *, pivot_image: int = 4,
                pivot_text: int = 4, picks: Sequence[int] | int | None = None, pivot_order: str = "set",
                keep: int | float = 0.222, reduction_ratio: float | None = None,
                budget_rule: str = "reference") -> Tensor:
    """DART's kept visual positions of one sample, ascending.

    Args:
        key_norm: (L,) pivot scores (L1 norm of each token's key in layer K-1).
        states: (L, D) token states for the duplication test (final-normed input of layer K).
        visual: (M,) positions of the visual tokens (candidates), any order.
        text: (n_t,) positions of the text tokens that may be pivots.
        pivot_image, pivot_text: configured pivot counts.
        picks: tokens each pivot takes (int: all the same; list: per pivot in visiting order); None
            derives them from ``keep`` / ``reduction_ratio`` / ``budget_rule``.
    Returns:
        (n_keep,) long positions (image pivots + picks).
    """
    vis = [int(v) for v in visual.tolist()]
    txt = [int(t) for t in text.tolist()]
    kn = key_norm.detach().double().cpu()
    img_piv = top_positions(kn[visual.long().cpu()], vis, pivot_image)
    txt_piv = top_positions(kn[text.long().cpu()], txt, pivot_text)
    order = visiting_order(img_piv, txt_piv, pivot_order)
    if picks is None:
        picks = picks_per_pivot(len(vis), pivot_image + pivot_text, len(img_piv), len(order), keep=keep,
                                reduction_ratio=reduction_ratio, rule=budget_rule)
    elif isinstance(picks, int):
        picks = [picks] * len(order)
    kept = set(img_piv)
    remaining = set(vis) - kept
    x = states.double() if states.dtype == torch.float64 else states.float()
    for pivot, k in zip(order, picks):
        cands = list(remaining)
        if not cands or k <= 0:
            continue
        cand_idx = torch.tensor(cands, dtype=torch.long, device=states.device)
        dissim = -F.cosine_similarity(x[pivot][None], x[cand_idx], dim=-1)
        chosen = top_positions(dissim, cands, k)
        kept.update(chosen)
        remaining.difference_update(chosen)
    return torch.tensor(sorted(kept), dtype=torch.long)


def dart_budget(n_visual: int, n_text: int, *, pivot_image: int = 4, pivot_text: int = 4,
                keep: int | float = 0.222, reduction_ratio: float | None = None,
                budget_rule: str = "reference") -> int:
    """Visual tokens :func:`dart_select` keeps for ``n_visual`` candidates and ``n_text`` text tokens."""
    n_img = min(pivot_image, n_visual)
    n_piv = n_img + min(pivot_text, n_text)
    picks = picks_per_pivot(n_visual, pivot_image + pivot_text, n_img, n_piv, keep=keep,
                            reduction_ratio=reduction_ratio, rule=budget_rule)
    return min(n_visual, n_img + sum(picks))


def _own_attention(adapter: Any, layer: int) -> bool:
    """Whether decoder ``layer`` has attention rows and keys of its own (not a Gated DeltaNet layer)."""
    try:
        return adapter.attention_layer_for(layer) == layer
    except ValueError:
        return False


# ------------------------------------------------------------------------------------ policy
@register
@dataclass
class DART(DecoderPolicy):
    """DART: at decoder layer ``layer`` (K) keep pivots + the visual tokens least duplicated with them.

    Fields: ``layer`` K (0-based first pruned layer; keys of layer K-1 pick the pivots; paper 2),
    ``keep`` (float fraction or int count of the visual tokens, the reference's budget before its
    per-pivot rounding; default 0.222 = the authors' example ratio 0.778), ``reduction_ratio``
    (optional, overrides ``keep`` with the reference's exact arithmetic), ``pivot_image`` (4),
    ``pivot_text`` (4), ``pivot_order`` (``"set"`` reference / ``"score"``), ``budget_rule``
    (``"reference"`` / ``"exact"``), ``similarity`` (``"final_norm"`` reference / ``"hidden"``).
    """

    name: ClassVar[str] = "dart"
    description: ClassVar[str] = (
        "DART: keep pivot tokens and the visual tokens least duplicated with them after layer K (stage D)"
    )
    layer: int = 2
    keep: int | float = 0.222
    reduction_ratio: float | None = None
    pivot_image: int = 4
    pivot_text: int = 4
    pivot_order: str = "set"
    budget_rule: str = "reference"
    similarity: str = "final_norm"

    def validate(self, family: str, adapter: Any) -> None:
        super().validate(family, adapter)
        if self.reduction_ratio is not None and not 0.0 <= float(self.reduction_ratio) < 1.0:
            raise ValueError(f"dart: reduction_ratio={self.reduction_ratio} must lie in [0, 1)")
        for knob in ("pivot_image", "pivot_text"):
            v = getattr(self, knob)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"dart: {knob}={v!r} must be an int >= 0")
        if self.pivot_image + self.pivot_text < 1:
            raise ValueError("dart: pivot_image + pivot_text must be at least 1")
        check_choice("dart", "pivot_order", self.pivot_order, PIVOT_ORDERS)
        check_choice("dart", "budget_rule", self.budget_rule, BUDGET_RULES)
        check_choice("dart", "similarity", self.similarity, SIMILARITIES)
        check_keep_value(self.keep)
        try:  # hybrid LLMs (Qwen3.5): keys are read at the last full-attention layer at or before K-1
            adapter.attention_layer_for(self.layer - 1)
        except ValueError:
            first = next(l for l in range(adapter.num_llm_layers()) if _own_attention(adapter, l))
            raise ValueError(
                f"dart: the key norms of layer K-1 = {self.layer - 1} are read at the last full-attention layer at "
                f"or before it (Gated DeltaNet layers cache no keys) and this LLM has none there (the first is "
                f"{first}): use layer >= {first + 1}"
            ) from None

    def signal_layers(self, num_layers: int) -> dict[int, str | tuple[str, ...]]:
        out: dict[int, str | tuple[str, ...]] = {self.layer - 1: "key_l1"}
        if self.similarity == "final_norm":
            out[self.layer] = "final_norm"
        return out

    def _parts(self, view: DecoderView) -> tuple[Tensor, Tensor]:
        vis = torch.nonzero(view.visual).flatten()
        ar = torch.arange(view.visual.numel(), device=vis.device)
        last = int(vis.max()) if vis.numel() else -1
        text = torch.nonzero((ar > last) & ~view.visual).flatten()
        return vis, text

    def _budget_args(self) -> dict:
        return dict(pivot_image=self.pivot_image, pivot_text=self.pivot_text, keep=self.keep,
                    reduction_ratio=self.reduction_ratio, budget_rule=self.budget_rule)

    def budget_view(self, view: DecoderView, layer: int) -> int:
        vis, text = self._parts(view)
        return dart_budget(vis.numel(), text.numel(), **self._budget_args())

    def select(self, layer: int, view: DecoderView, ctx: Context) -> Tensor:
        vis, text = self._parts(view)
        states = view.signals[f"final_norm@{self.layer}"] if self.similarity == "final_norm" else view.hidden
        kept = dart_select(view.signals[f"key_l1@{self.layer - 1}"], states, vis.cpu(), text.cpu(),
                           pivot_order=self.pivot_order, **self._budget_args())
        return kept.to(vis.device)
