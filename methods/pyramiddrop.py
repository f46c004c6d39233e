"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", CVPR 2025, arXiv 2410.17247).

Staged in-LLM dropping of image tokens, ranked by the last instruction token's attention. Authors:
Xing, Huang, Dong, Lu, Zhang, Zang, Cao, He, Wang, Wu, Lin.
Reference implementation: github.com/Cooperx521/PyramidDrop at commit ``6444f30`` (a LLaVA fork on
transformers 4.37.2; ``llava/model/modeling_llama_pdrop.py``: ``LlamaModel.pdrop_forward`` and
``pdrop_rank_drop``; ``llava/model/llava_arch.py``: ``prepare_inputs_labels_for_multimodal_pdrop``;
evaluation scripts ``scripts/v1_5/pdrop_eval/*.sh``).

Stage: **D**, prefill only, S stages. After each 1-based layer ``l_s`` of ``layer_list`` (default
8, 16, 24 of LLaVA-1.5-7B's 32) the image tokens are cut to ``n_s = int(N * ratios[s])`` (N = the
image's token count at the LLM input; default ratios 0.5, 0.25, 0.125, i.e. lambda = 0.5: 576 -> 288
-> 144 -> 72). Decode reuses the per-layer shortened caches.

Algorithm at stage s, per sample (current sequence of length L', image tokens at positions ``I``):

1. Input ``x`` (L', D) of 0-based layer ``l_s`` (= the output of 1-based layer ``l_s``).
2. Rank with that layer's own weights (signal ``last_row`` at layer ``l_s``): ``q`` of the **last
   prompt token** and ``k`` of every token from ``input_layernorm(x)``, rotary at the current
   positions, ``softmax(q k^T / sqrt(hd))`` over all keys, mean over heads -> (L',); the scores of
   the image tokens ``a[I]``.
3. Keep the top ``n_s`` image tokens (ties: lowest index), in sequence order; text is never dropped.
4. Positions (LLaVA, the reference): the survivors are renumbered ``0 .. L_{s}-1`` for every later
   layer; at decode a token at unpruned position ``P`` enters the layers after ``l_s`` at ``P - (N -
   n_s)`` (the reference subtracts each stage's removed count from the decode position ids).

Reference code vs paper (default = the code):

1. Query token: the paper ranks by "the last instruction token"; the code's query row at inference
   is the last token of the prompt (the chat template's tail included, e.g. ``ASSISTANT:``). Library:
   the last prompt token (signal ``last_row``).
2. Budget per stage relative to the image's original count with ``int()`` flooring
   (``image_token_ratio_list`` with a leading 1.0); the paper's lambda^s schedule is the option
   ``lam`` (ratios = (lam, lam^2, ...)).
3. Ranking layer: the code computes the scores with layer ``l_s``'s (0-based) norm and q/k on its
   input, i.e. the *next* layer after the 1-based boundary ``l_s``; the paper describes the attention
   "at the end of the stage". Library: the code.

vtprune deviations:

* Grouped-query attention: the reference's ranking multiplies queries by keys without repeating the
  KV heads (**bug**: it fails for GQA models such as Qwen2-VL); the library repeats them.
* Numerics: the reference casts the softmax back to the model dtype before the head mean; the
  library keeps fp32 (float64 stays float64). SDPA stays on everywhere (the row is recomputed).
* Batches: per sample with padding removed; the reference works with right padding only and a single
  image span per sample (``image_token_posi[i]``). Several images in a sample: each keeps
  ``int(N_i * ratio)`` of its own tokens (per-image quotas).
* Qwen2-VL / Qwen2.5-VL (not in the reference): original M-RoPE positions (``positions="original"``;
  renumbering M-RoPE is ill-defined); LLaVA may use ``positions="original"`` too (our extension).
* LLaVA-NeXT: the image span's newline tokens are candidates like the other span tokens (the
  reference's 1.6 evaluation does the same: its span is the whole image feature incl. newlines).
* Ties: lowest index (reference ``topk`` order unspecified).

Policy: :class:`PyramidDrop` (``"pyramiddrop"``), stage D on all ten families (on the hybrid Qwen3.5 a stage
ranks with the row of the last full-attention layer at or before its ranking layer, as that layer runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from vtprune.policy import Context, DecoderPolicy, DecoderView, Policy
from vtprune.registry import register

from ._common import ONE_D_POSITION_FAMILIES, check_decoder_positions, parse_tuple, stable_topk, view_images

DEFAULT_LAYERS = (8, 16, 24)
DEFAULT_RATIOS = (0.5, 0.25, 0.125)


# ------------------------------------------------------------------------------------ kernels
def stage_counts(n0: int, ratios: Sequence[float]) -> tuple[int, ...]:
    """``(n_0, int(n_0 * r_1), ...)``: image tokens after each stage (floor, relative to n_0);
    ``stage_counts(576, (0.5, 0.25, 0.125)) == (576, 288, 144, 72)``."""
    return (int(n0),) + tuple(int(n0 * r) for r in ratios)


def lambda_ratios(lam: float, n_stages: int) -> tuple[float, ...]:
    """The paper's geometric schedule ``(lam, lam^2, ..., lam^S)``."""
    return tuple(lam ** (s + 1) for s in range(n_stages))


def rank_drop(scores: Tensor, n_keep: int) -> Tensor:
    """Indices (ascending) of the ``n_keep`` largest ``scores`` (n,); ties go to the lowest index."""
    return torch.sort(stable_topk(scores.double(), n_keep)).values


def decode_shifts(n0: int, ratios: Sequence[float], layer_list: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Per 0-based layer, how many positions a decode token is moved back with renumbering: the image
    tokens removed before that layer (``N - n_s`` for layers after ``l_s``)."""
    counts = stage_counts(n0, ratios)
    return tuple(counts[0] - counts[sum(1 for l in layer_list if i >= l)] for i in range(num_layers))


# ------------------------------------------------------------------------------------ policy
@register
@dataclass
class PyramidDrop(DecoderPolicy):
    """PyramidDrop (Xing et al., CVPR 2025): stage D, image tokens cut after each layer of ``layer_list``.

    Fields: ``layer_list`` (1-based layers after which a stage ends; default 8/16/24; tiny LLMs need
    explicit layers, e.g. ``(1, 2, 3)``), ``ratios`` (image tokens kept after each stage, relative to
    the image's count at the LLM input; default 0.5/0.25/0.125), ``lam`` (optional: ratios = lam^s),
    ``positions`` (``"auto"``: ``"renumber"`` on the 1-D-position families (LLaVA, LLaVA-NeXT, OneVision,
    OneVision-1.5) as the reference, ``"original"`` on
    Qwen; ``"original"`` keeps the survivors' positions). The inherited ``layer``/``keep`` are unused
    and must stay None.
    """

    name: ClassVar[str] = "pyramiddrop"
    description: ClassVar[str] = (
        "PyramidDrop: image tokens cut after each stage of the LLM, ranked by the last instruction "
        "token's attention (stage D)"
    )
    layer: int | None = None
    keep: int | float | None = None
    layer_list: tuple[int, ...] = DEFAULT_LAYERS
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    lam: float | None = None
    positions: str = "auto"

    def __post_init__(self):
        self.layer_list = parse_tuple(self.layer_list, method="pyramiddrop", knob="layer_list")
        self.ratios = parse_tuple(self.ratios, method="pyramiddrop", knob="ratios", cast=float)
        if self.lam is not None:
            if not 0.0 < float(self.lam) <= 1.0:
                raise ValueError(f"pyramiddrop: lam={self.lam} must lie in (0, 1]")
            self.ratios = lambda_ratios(float(self.lam), len(self.layer_list))

    def validate(self, family: str, adapter: Any) -> None:
        Policy.validate(self, family, adapter)
        if self.layer is not None or self.keep is not None:
            raise ValueError("pyramiddrop: use layer_list (1-based) and ratios (or lam) instead of layer/keep")
        n = adapter.num_llm_layers()
        ll = self.layer_list
        if not ll or list(ll) != sorted(set(ll)):
            raise ValueError(f"pyramiddrop: layer_list={ll} must be strictly increasing 1-based layers")
        if ll[0] < 1 or ll[-1] > n - 1:
            raise ValueError(
                f"pyramiddrop: layer_list={ll} must lie in 1..{n - 1} for this {n}-layer LLM (1-based: a stage "
                "ends after that layer); the default (8, 16, 24) needs >= 25 layers"
            )
        if len(self.ratios) != len(ll):
            raise ValueError(f"pyramiddrop: ratios={self.ratios} needs one ratio per layer of layer_list {ll}")
        if not all(0.0 < r <= 1.0 for r in self.ratios) or list(self.ratios) != sorted(self.ratios, reverse=True):
            raise ValueError(f"pyramiddrop: ratios={self.ratios} must lie in (0, 1] and not increase")
        check_decoder_positions("pyramiddrop", self.positions, family)

    def resolved_positions(self, family: str) -> str:
        if self.positions != "auto":
            return self.positions
        return "renumber" if family in ONE_D_POSITION_FAMILIES else "original"

    def pruning_layers(self, num_layers: int) -> list[int]:
        """0-based layers whose input is cut: after 1-based layer l = before 0-based layer l."""
        return list(self.layer_list)

    def position_handling(self, num_layers: int, family: str) -> dict[int, str]:
        mode = self.resolved_positions(family)
        return {l: mode for l in self.layer_list}

    def signal_layers(self, num_layers: int) -> dict[int, tuple[str, ...]]:
        out: dict[int, tuple[str, ...]] = {0: ("image_tokens_in",)}
        for l in self.layer_list:
            out[l] = out.get(l, ()) + ("last_row",)
        return out

    def _images(self, view: DecoderView, layer: int) -> tuple[Tensor, list[tuple[Tensor, int]]]:
        """Visual positions and, per image, (positions into them, quota ``int(N_i * ratio)``)."""
        ratio = self.ratios[list(self.layer_list).index(layer)]
        vis, images = view_images(view)
        return vis, [(m, min(stage_counts(n0, (ratio,))[1], m.numel())) for m, n0 in images]

    def budget_view(self, view: DecoderView, layer: int) -> int:
        return sum(q for _, q in self._images(view, layer)[1])

    def select(self, layer: int, view: DecoderView, ctx: Context) -> Tensor:
        vis, images = self._images(view, layer)
        scores = view.signals[f"last_row@{layer}"][vis].float().cpu()
        kept = [members[rank_drop(scores[members.cpu()], quota).to(members.device)] for members, quota in images]
        return torch.sort(vis[torch.cat(kept)]).values
