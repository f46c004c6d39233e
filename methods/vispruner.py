"""VisPruner: important tokens by the encoder's CLS attention, then diverse tokens by similarity (stage P).

Paper: Zhang, Cheng, Lu, Zhang, Zhuo, Cao, Guo, She, Zhang, "Beyond Text-Visual Attention: Exploiting
Visual Cues for Effective Token Pruning in VLMs", ICCV 2025, arXiv 2412.01818 (the successor of
FasterVLM). Reference implementation: github.com/Theia-4869/VisPruner at commit ``aefa01a``
(``llava/model/llava_arch.py``: ``encode_images``; ``llava/model/multimodal_encoder/clip_encoder.py``
and ``siglip_encoder.py``: the attention it reads; ``visual_token_num`` / ``important_ratio`` in
``llava/eval/model_vqa_loader.py``, default ratio 0.5), Apache-2.0, read, not copied. Qwen2.5-VL: the
ModelTC/LightCompress port (``llmc/compression/token_reduction/vispruner.py`` at ``9701d03``), since the
authors released LLaVA code only.

Idea. Two visual cues, no text: the encoder's own [CLS] attention picks a few *important* tokens; the
rest of the budget goes to *diverse* tokens, obtained by repeatedly discarding near-duplicates from the
remaining tokens with a ToMe-style bipartite match. Once per image (per view) at prefill.

Algorithm (one view; ``n`` candidate tokens; ``T`` tokens to keep; ``r`` = ``important_ratio``):

1. Scores ``s`` (n,): the CLS query's softmax row of the feature layer over the patch keys, mean
   over heads (CLS column dropped, not renormalised). CLS-less towers: see "deviations".
2. ``T_imp = int(T * r)`` (floor), ``T_div = T - T_imp``. Order all tokens by ``s`` descending:
   the first ``T_imp`` are important; the rest, **in that order**, form the residual list ``R``.
3. Duplicate removal while ``|R| > T_div``: ``m = min(step, |R| - T_div)`` (``step = 8``); split ``R``
   alternately into ``A = R[0::2]`` and ``B = R[1::2]``; for each ``a`` in ``A`` its highest cosine
   similarity to any ``b`` in ``B`` (features ``x / ||x||``); drop the ``m`` members of ``A`` with the
   highest similarity; the new list is ``[A kept, ordered by similarity descending] + B``.
4. Keep important + residual, in ascending index order (the reference scatters an index mask).

Similarity features: LLaVA: the vision tower's feature-layer outputs (before the projector), as the
reference; Qwen: the merger outputs (the port's choice; there is no per-token pre-merger feature).

Reference code vs paper, and what vtprune does (default = the code):

1. Step 3's bookkeeping (alternating split of the similarity-ordered list, ``step = 8``) is the code's;
   the paper describes removal of duplicates by similarity in rounds. ``step`` is a field.
2. The code indexes ``A`` with a helper of size ``|R| // 2 - m``: it raises when ``|R|`` is odd
   (``N - T_imp`` odd, e.g. 576 tokens with ``T_imp`` odd) and when ``m > |R| // 2`` (a small
   ``T_div``, e.g. ``T = 16, r = 0.75``). vtprune's kernel is the same rule without those crashes:
   ``A`` has ``ceil(|R|/2)`` members and at most all of them are dropped in a round; it equals the code
   wherever the code runs. The LightCompress port instead bumps ``T_imp`` by one when ``N - T_imp`` is
   odd; vtprune does not.
3. Sorting: the code's ``argsort`` is not stable; vtprune breaks ties by the lowest index.
4. Precision: scores and similarities in fp32 (fp64 stays fp64); the reference runs in fp16.

vtprune deviations and extensions:

* Budget per view, as the reference's ``visual_token_num``: an int ``keep`` is ``T`` per view (capped at
  the view's tokens), a float is a fraction of each view's candidates (Python rounding, at least 1).
* LLaVA-NeXT: per view (base + crops), like the reference, but on the native layout: a crop's
  candidates are its unpadded tokens only (the reference selects among all 576 and the unpadding then
  drops some of the chosen ones, so its crops keep fewer than ``T``); newlines are always kept and not
  budgeted. The reference also forces a 672x672 grid (2880 tokens); vtprune keeps the model's own
  AnyRes grid.
* Towers without a CLS token (SigLIP in LLaVA; the Qwen ViT): the attention each token *receives* in
  the tower's last layer, mean over heads and query rows -- the reference's own SigLIP path
  (``attentions[-1].mean(dim=-2)``) and, on Qwen, the LightCompress port's last-block column sum
  averaged over each 2x2 merge unit (signal ``vit_received``; same ranking as the column mean).
  ``importance="received"`` selects it on a CLS tower too.
* Qwen2-VL / Qwen2.5-VL: per image (per temporal slice); original M-RoPE positions of the kept tokens.
* LLaVA-OneVision (SigLIP, AnyRes-max canvas that may be resized) and OneVision-1.5: as on Qwen, the
  last layer's received attention ranks and the projected features measure similarity (the resized
  canvas has no per-token encoder feature); per view.
* Batching and several images per sample: per image; scores are recomputed from each layer's own
  q/k projections in fp32, so the model keeps SDPA (the reference needs eager attention maps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from vtprune.policy import Context, ImageTokens, TokenPolicy, check_keep_value
from vtprune.registry import register

from ._common import (
    LLAVA_FAMILIES,
    PerViewBudget,
    check_choice,
    llava_feature_layer,
    resolve_layer,
    score_dtype,
    stable_topk,
)

__all__ = ["important_count", "importance_order", "remove_duplicates", "VisPrunerGroups", "vispruner_select"]


def important_count(n_keep: int, important_ratio: float) -> int:
    """``T_imp = int(T * r)``: Python ``int`` of the float product (floor), as the reference."""
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio!r}")
    return int(n_keep * important_ratio)


def importance_order(scores: Tensor) -> Tensor:
    """(n,) scores -> (n,) token indices by score descending, ties by the lowest index."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("importance scores contain NaN")
    return stable_topk(scores, scores.numel())


def remove_duplicates(features: Tensor, residual: Tensor, n_keep: int, *, step: int = 8,
                      dtype: torch.dtype | None = None) -> Tensor:
    """Iterative bipartite duplicate removal: ``residual`` (R,) ordered token indices -> (n_keep,).

    ``features`` (n, D) of all tokens (indexed by ``residual``); cosine similarity of ``x / ||x||``.
    Each round drops ``min(step, R - n_keep)`` members of ``A = R[0::2]`` (fewer if ``A`` is smaller),
    those most similar to some member of ``B = R[1::2]`` (ties: the later one in ``A`` survives, the
    earlier is dropped first), and continues with ``[A kept, by similarity descending] + B``. Returns
    the surviving list in that order.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (n, D), got {tuple(features.shape)}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    res = residual.to(features.device).long()
    if not 0 <= n_keep <= res.numel():
        raise ValueError(f"n_keep must be in [0, {res.numel()}], got {n_keep}")
    x = features.to(score_dtype(features, dtype))
    xn = x / x.norm(dim=-1, keepdim=True)
    while n_keep > 0:
        m = min(step, res.numel() - n_keep)
        if m <= 0:
            break
        a, b = res[0::2], res[1::2]
        sim = (xn[a] @ xn[b].T).max(dim=-1).values  # (|A|,)
        if torch.isnan(sim).any():
            raise ValueError("VisPruner similarities contain NaN (a zero feature vector?)")
        res = torch.cat([a[stable_topk(sim, sim.numel())[m:]], b])
    return res if n_keep > 0 else res[:0]


class VisPrunerGroups(NamedTuple):
    """``important`` (T_imp,) in score order; ``diverse`` (T_div,) in the final residual order;
    ``kept`` (T,) ascending."""

    important: Tensor
    diverse: Tensor
    kept: Tensor


def vispruner_select(scores: Tensor, features: Tensor, n_keep: int, important_ratio: float = 0.5, *,
                     step: int = 8, dtype: torch.dtype | None = None) -> VisPrunerGroups:
    """VisPruner of one view: ``scores`` (n,) importance, ``features`` (n, D) similarity features."""
    n = scores.numel()
    if features.shape[0] != n:
        raise ValueError(f"features has {features.shape[0]} rows for {n} scores")
    if isinstance(n_keep, bool) or int(n_keep) != n_keep or not 0 <= n_keep <= n:
        raise ValueError(f"n_keep must be an int in [0, {n}], got {n_keep!r}")
    n_imp = important_count(int(n_keep), important_ratio)
    order = importance_order(scores.to(score_dtype(scores, dtype)))
    important, residual = order[:n_imp], order[n_imp:]
    diverse = remove_duplicates(features, residual, int(n_keep) - n_imp, step=step, dtype=dtype)
    kept = torch.sort(torch.cat([important.to(diverse.device), diverse])).values
    return VisPrunerGroups(important, diverse, kept)


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------
@register
@dataclass
class VisPruner(PerViewBudget, TokenPolicy):
    """VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818), stage P: important + diverse tokens.

    Fields:
        keep: tokens per view, as the reference's ``visual_token_num``: an int count (capped at the
            view's tokens; LLaVA-1.5 and Qwen images have one view, LLaVA-NeXT base + crops) or a float
            fraction of each view's candidates. Default 64.
        important_ratio: share of the budget taken by attention, ``T_imp = int(T * r)``; default 0.5
            (the reference's default); 1.0 = FasterVLM-style attention only, 0.0 = diversity only.
        importance: ``"auto"`` = ``"cls"`` on a LLaVA tower with a CLS token (CLS row of ``layer``,
            signal ``vit_cls``), else ``"received"`` (attention received in ``layer``, signal
            ``vit_received``; the reference's SigLIP path, and Qwen).
        layer: 0-based vision layer of the scores. ``None`` = ``"cls"``: the layer whose output LLaVA
            uses (22 of 24, the reference's ``select_layer``); ``"received"``: the last layer / block.
        step: tokens dropped per duplicate-removal round (the reference's 8).
        positions: ``"auto"`` (LLaVA renumbers, Qwen keeps the original M-RoPE positions).

    Similarity features: LLaVA the feature layer's outputs (signal ``vit_hidden``, before the
    projector, as the reference); Qwen the merger outputs. See the module docstring for the
    reference's crashes that the kernel avoids and for the NeXT and CLS-less readings.
    """

    name: ClassVar[str] = "vispruner"
    description: ClassVar[str] = (
        "VisPruner: CLS-attention important tokens + similarity-deduplicated diverse tokens, stage P")

    keep: int | float = 64
    important_ratio: float = 0.5
    importance: str = "auto"
    layer: int | None = None
    step: int = 8
    positions: str = "auto"

    def __post_init__(self):
        self._family: str | None = None
        self._score_signal: str | None = None
        self._feature_signal: str | None = None
        self._offset = 0

    # ------------------------------------------------------------ validation and signals
    def validate(self, family: str, adapter: Any) -> None:
        super().validate(family, adapter)
        check_choice(self.name, "importance", self.importance, ("auto", "cls", "received"))
        if isinstance(self.important_ratio, bool) or not isinstance(self.important_ratio, (int, float)) \
                or not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"vispruner: important_ratio={self.important_ratio!r} must be a number in [0, 1]")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"vispruner: step={self.step!r} must be an int >= 1")
        check_keep_value(self.keep)
        if family in LLAVA_FAMILIES:
            has_cls = adapter.vit_has_cls()
            importance = self.importance if self.importance != "auto" else ("cls" if has_cls else "received")
            if importance == "cls" and not has_cls:
                raise ValueError(
                    "vispruner: importance='cls' needs a vision tower with a CLS token; this tower has none "
                    "(use importance='received', the reference's SigLIP reading)")
            if has_cls and adapter.feature_offset() != 1:
                raise ValueError(
                    "vispruner needs vision_feature_select_strategy='default' on a tower with a CLS token "
                    "(the CLS feature itself has no place on the patch grid)")
            fl = adapter.config.vision_feature_layer
            if isinstance(fl, bool) or not isinstance(fl, int):
                raise ValueError(
                    f"vispruner needs a single integer vision_feature_layer (its similarity features are that "
                    f"layer's outputs); this model has {fl!r}")
            depth = len(adapter.vit_layers())
            feat_layer = llava_feature_layer(adapter, self.name, "layer")
            if self.layer is not None:
                layer = resolve_layer(self.layer, depth, method=self.name, knob="layer")
            else:
                layer = feat_layer if importance == "cls" else depth - 1
            self._score_signal = f"{'vit_cls' if importance == 'cls' else 'vit_received'}@{layer}"
            self._feature_signal = f"vit_hidden@{feat_layer}"
            self._offset = adapter.feature_offset()
        else:
            if self.importance == "cls":
                raise ValueError(
                    "vispruner: importance='cls' needs a CLS token; Qwen and LLaVA-OneVision vision towers have none "
                    "(use importance='auto' or 'received')")
            depth = len(adapter.vit_layers())
            layer = depth - 1 if self.layer is None else resolve_layer(self.layer, depth, method=self.name,
                                                                        knob="layer")
            self._score_signal, self._feature_signal = f"vit_received@{layer}", None
        self._family = family

    def required_signals(self, adapter: Any) -> dict[str, Any]:
        if self._score_signal is None:
            self.validate(adapter.family, adapter)
        names = [self._score_signal] + ([self._feature_signal] if self._feature_signal else [])
        return {name: None for name in names}

    # ------------------------------------------------------------ budget and selection
    def _view_features(self, image: ImageTokens, g) -> Tensor:
        """(m, C) similarity features of the view's candidate tokens."""
        if self._feature_signal is None:
            return image.features[g.index.to(image.features.device)]
        hidden = image.signals[self._feature_signal]
        if hidden.dim() == 2:  # LLaVA-1.5: the image's only view
            hidden = hidden[None]
        if hidden.shape[1] != g.size + self._offset or g.view >= hidden.shape[0]:
            raise ValueError(
                "vispruner needs every view's full patch grid from the encoder; it cannot follow a stage-V "
                "policy that changes the encoder tokens")
        return hidden[g.view][(g.local + self._offset).to(hidden.device)]

    def select(self, image: ImageTokens, n_keep: int, ctx: Context) -> Tensor:
        scores = image.signals[self._score_signal]
        kept = []
        for g, n_keep in self.view_budgets(image):
            s = scores[g.index.to(scores.device)].float()
            groups = vispruner_select(s, self._view_features(image, g), n_keep, float(self.important_ratio),
                                      step=self.step)
            kept.append(g.index[groups.kept.cpu()])
        return torch.sort(torch.cat(kept)).values
