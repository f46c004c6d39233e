"""CDPruner: a conditional determinantal point process over the visual tokens (stage P).

Paper: Zhang, Liu, Li, Lu, Zhang, Pan, She, Zhang, "Beyond Attention or Similarity: Maximizing
Conditional Diversity for Token Pruning in MLLMs", NeurIPS 2025, arXiv 2506.10967. Reference
implementation: github.com/Theia-4869/CDPruner at commit ``9541616`` (``llava/model/llava_arch.py``:
``encode_images``; ``llava/model/multimodal_encoder/clip_encoder.py``: the CLIP image/text embeddings;
``llava/eval/model_vqa_loader.py``: the text is the raw question), Apache-2.0, read, not copied. Also
read: the openvinotoolkit/openvino_contrib PyTorch port (``modules/genai_optimizations/genai_opt/
visual_token_pruning.py`` at ``9b77af1``), which applies it to Hugging Face models without a CLIP text
tower.

Idea. Keep a subset that is diverse *given the instruction*: a DPP whose kernel multiplies the
similarity of two visual tokens by the relevance of each to the instruction, so the MAP subset trades
redundancy against relevance. Once per image (per view) at prefill.

Algorithm (one view of ``n`` candidate tokens; ``T`` to keep):

1. Similarity ``S = Xn Xn^T`` (n, n) of the features the LLM receives (after the projector), ``Xn = X /
   ||X||``, computed in fp32.
2. Relevance: image embeddings ``E`` (n, C) and instruction embeddings ``Q`` (M, C), both normalised;
   ``r_i = mean_m(-E_i . Q_m)`` (note the **minus**); then ``r = (r - min r + 1e-6) / (max r - min r)``
   over every token of the image (all views together).
3. Kernel ``L = diag(r) S diag(r)`` (the reference's commented variant ``theta``: ``r <- exp(alpha r)``,
   ``alpha = theta / (2 (1 - theta))``).
4. Greedy MAP inference (Chen et al., NeurIPS 2018, incremental Cholesky): gains ``d_i = L_ii``; ``T``
   times pick ``j = argmax d`` over the unchosen tokens, ``e = (L_j - c_j^T C) / sqrt(d_j)``, append
   ``e`` to ``C``, ``d <- d - e^2``. Ties: the lowest index.
5. Keep the chosen tokens in ascending order (the reference scatters an index mask).

Reference code vs paper, and what vtprune does (default = the code):

1. The relevance is the **negated** mean cosine (the code; a known property of CLIP's patch tokens,
   whose text similarity maps come out inverted). ``relevance="cosine"`` drops the minus;
   ``relevance="off"`` is the unconditional DPP on ``S`` (the paper's "similarity only" reading).
2. ``theta``: the code leaves the exponential reweighting commented out; ``theta=None`` (default) is
   the code, a float in [0, 1) enables it.
3. Min-max with ``+1e-6`` in the numerator only (the code); a constant relevance (one token, or all
   equal) would divide by zero there: vtprune uses ``r = 1`` then.
4. When the kernel's rank is exhausted (more tokens requested than the features span, e.g. ``T >
   D``) the code keeps going on rounding residues, then on NaN, and re-picks chosen tokens (fewer
   than ``T`` distinct). vtprune stops the greedy once the best gain is below
   ``100 * eps * max(L_ii)`` and fills the rest by relevance (``L_ii``, descending) -- the same picks
   wherever the kernel has rank, ``T`` distinct tokens always.

vtprune deviations and extensions (the text side):

* The reference embeds the instruction with CLIP's **text tower** (one pooled embedding per 77-token
  segment) and the image with CLIP's ``post_layernorm`` + ``visual_projection`` of the feature layer.
  Hugging Face's LLaVA and Qwen models carry neither a text tower nor that projection, so on every
  family vtprune measures relevance in the **LLM input space**: the projected visual tokens (the same
  ``X`` as the similarity) against the LLM's input embeddings of the instruction's tokens (text
  signal ``instruction_embeds``, one row per token, the mean over rows as the code's mean over
  segments). This is the openvino_contrib port's choice for models without a CLIP text tower.
* The instruction: the reference passes the raw question (the benchmark's answer-format suffix
  removed). vtprune sees only the tokenised prompt, so ``instruction="after_image"`` takes the tokens
  after the sample's last image placeholder (the question plus the chat template's tail);
  ``"all_text"`` takes every text token (the openvino_contrib port). No instruction token at all:
  ``r = 1`` (the unconditional DPP).
* Budget per view, as the reference's ``visual_token_num``: int ``keep`` per view (capped at the
  view's tokens) or a fraction of each view's candidates. LLaVA-NeXT: one DPP per view on its
  unpadded tokens (the reference runs every 576-token view and lets the unpadding drop chosen tokens;
  it also forces a 672x672 grid); relevance normalised over the whole image as the reference;
  newlines always kept.
* Qwen2-VL / Qwen2.5-VL: the merger outputs per image (per temporal slice); original M-RoPE positions.
* Batching and several images per sample: per image; every image of a sample shares its instruction.
* Precision: fp32 (fp64 stays fp64); the reference computes the similarity in fp32 and the gains in
  its default dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from vtprune.policy import Context, ImageTokens, TokenPolicy
from vtprune.registry import register

from ._common import PerViewBudget, check_choice, first_argmax, score_dtype, stable_topk

__all__ = ["cosine_similarity_matrix", "relevance_scores", "minmax_relevance", "conditional_kernel",
           "dpp_greedy_map", "cdpruner_select"]


def _unit_rows(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected a (n, D) tensor, got {tuple(x.shape)}")
    x = x.to(score_dtype(x, dtype))
    norms = x.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a zero feature vector has no direction (cosine undefined)")
    return x / norms


def cosine_similarity_matrix(features: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
    """(n, D) -> (n, n) cosine similarities of ``x / ||x||`` rows (fp32; fp64 stays fp64)."""
    xn = _unit_rows(features, dtype)
    return xn @ xn.T


def relevance_scores(image_embeds: Tensor, text_embeds: Tensor, *, sign: str = "negated",
                     dtype: torch.dtype | None = None) -> Tensor:
    """(n, C) image and (M, C) text embeddings -> (n,) mean cosine over the M text rows, negated for
    ``sign="negated"`` (the reference), as is for ``"cosine"``; M = 0 raises ``ValueError``."""
    if text_embeds.shape[0] == 0:
        raise ValueError("no text embeddings: relevance is undefined")
    cos = _unit_rows(image_embeds, dtype) @ _unit_rows(text_embeds, dtype).T
    if sign == "negated":
        return (-cos).mean(dim=-1)
    if sign == "cosine":
        return cos.mean(dim=-1)
    raise ValueError(f"unknown relevance sign {sign!r}")


def minmax_relevance(scores: Tensor) -> Tensor:
    """The reference's normalisation ``(r - min + 1e-6) / (max - min)``; ones when ``max == min``."""
    lo, hi = scores.min(), scores.max()
    if not bool(hi > lo):
        return torch.ones_like(scores)
    return (scores - lo + 1e-6) / (hi - lo)


def conditional_kernel(similarity: Tensor, relevance: Tensor, theta: float | None = None) -> Tensor:
    """``L = diag(q) S diag(q)`` with ``q = relevance`` or, with ``theta`` in [0, 1), ``exp(alpha *
    relevance)``, ``alpha = theta / (2 (1 - theta))`` (the reference's commented variant)."""
    if similarity.dim() != 2 or similarity.shape != (relevance.numel(), relevance.numel()):
        raise ValueError("similarity must be (n, n) and relevance (n,)")
    q = relevance.to(similarity.dtype)
    if theta is not None:
        if not 0.0 <= theta < 1.0:
            raise ValueError(f"theta must be in [0, 1), got {theta}")
        q = torch.exp(theta / (2 * (1 - theta)) * q)
    return q[:, None] * similarity * q[None, :]


def dpp_greedy_map(kernel: Tensor, k: int, *, tol: float | None = None) -> Tensor:
    """Greedy MAP of a DPP with (n, n) PSD ``kernel``: the (k,) selection order, distinct indices.

    The fast incremental-Cholesky greedy (Chen et al., 2018) as the reference runs it; ties go to the
    lowest index. Once the best remaining gain is ``<= tol`` (default ``100 * eps * max diag``: the
    chosen tokens span the kernel) the rest are filled by ``diag`` descending instead of by rounding
    residues.
    """
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be (n, n), got {tuple(kernel.shape)}")
    n = kernel.shape[0]
    if isinstance(k, bool) or int(k) != k or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}], got {k!r}")
    k = int(k)
    if torch.isnan(kernel).any():
        raise ValueError("the DPP kernel contains NaN")
    quality = kernel.diagonal().clone()
    if tol is None:
        tol = 100 * torch.finfo(kernel.dtype).eps * float(quality.max().clamp(min=0)) if n else 0.0
    gains = quality.clone()
    rows = kernel.new_zeros((k, n))  # the Cholesky rows c_i of the chosen tokens
    chosen = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    order: list[int] = []
    for i in range(k):
        avail = gains.masked_fill(chosen, float("-inf"))
        j = first_argmax(avail)
        if not float(avail[j]) > tol:  # exhausted: the rest by quality
            order.extend(stable_topk(quality, k - i, torch.nonzero(~chosen).flatten()).tolist())
            break
        e = (kernel[j] - rows[:i, j] @ rows[:i]) / torch.sqrt(gains[j])
        rows[i] = e
        gains = gains - e * e
        chosen[j] = True
        order.append(j)
    return torch.tensor(order, dtype=torch.long, device=kernel.device)


def cdpruner_select(features: Tensor, relevance: Tensor | None, k: int, *, theta: float | None = None,
                    dtype: torch.dtype | None = None) -> Tensor:
    """CDPruner of one view: (n, D) features, (n,) normalised relevance (None: unconditional) ->
    (k,) kept indices, ascending."""
    sim = cosine_similarity_matrix(features, dtype=dtype)
    rel = torch.ones(sim.shape[0], dtype=sim.dtype, device=sim.device) if relevance is None else relevance
    kernel = conditional_kernel(sim, rel.to(sim.device), theta)
    return torch.sort(dpp_greedy_map(kernel, k)).values


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------
@register
@dataclass
class CDPruner(PerViewBudget, TokenPolicy):
    """CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967), stage P: conditional-DPP selection.

    Fields:
        keep: tokens per view, as the reference's ``visual_token_num``: an int count (capped at the
            view's tokens) or a float fraction of each view's candidates. Default 64.
        relevance: ``"negated"`` (the reference's negated mean cosine) | ``"cosine"`` | ``"off"``
            (unconditional DPP on the similarity).
        theta: ``None`` (the reference) or a float in [0, 1): relevance ``exp(theta / (2 (1 - theta)) r)``.
        instruction: ``"after_image"`` (tokens after the sample's last image placeholder) |
            ``"all_text"`` (every text token of the sample).
        positions: ``"auto"`` (LLaVA renumbers, Qwen keeps the original M-RoPE positions).

    Similarity and relevance both use the projected visual tokens and the LLM's input embeddings of
    the instruction (text signal ``instruction_embeds`` / ``text_embeds``); see the module docstring
    for why this replaces the reference's CLIP text tower, and for the other deviations.
    """

    name: ClassVar[str] = "cdpruner"
    description: ClassVar[str] = "CDPruner: conditional DPP of the projected tokens on instruction relevance, stage P"

    keep: int | float = 64
    relevance: str = "negated"
    theta: float | None = None
    instruction: str = "after_image"
    positions: str = "auto"

    def __post_init__(self):
        self._family: str | None = None

    def validate(self, family: str, adapter: Any) -> None:
        super().validate(family, adapter)
        check_choice(self.name, "relevance", self.relevance, ("negated", "cosine", "off"))
        check_choice(self.name, "instruction", self.instruction, ("after_image", "all_text"))
        if self.theta is not None and (isinstance(self.theta, bool) or not isinstance(self.theta, (int, float))
                                       or not 0.0 <= self.theta < 1.0):
            raise ValueError(f"cdpruner: theta={self.theta!r} must be None or a number in [0, 1)")
        self._family = family

    @property
    def _text_signal(self) -> str:
        return "instruction_embeds" if self.instruction == "after_image" else "text_embeds"

    def required_signals(self, adapter: Any) -> dict[str, Any]:
        return {} if self.relevance == "off" else {self._text_signal: None}

    def image_relevance(self, image: ImageTokens) -> Tensor | None:
        """(n_candidates,) normalised relevance of the image's candidates (None: unconditional)."""
        if self.relevance == "off":
            return None
        text = image.signals[self._text_signal]
        if text.num_tokens == 0:
            return None
        x = image.features[image.candidate_index().to(image.features.device)]
        raw = relevance_scores(x, text.embeds.to(x.device), sign=self.relevance)
        return minmax_relevance(raw)

    def select(self, image: ImageTokens, n_keep: int, ctx: Context) -> Tensor:
        rel = self.image_relevance(image)
        position = torch.full((image.num_tokens,), -1, dtype=torch.long)  # token -> candidate number
        position[image.candidate_index()] = torch.arange(image.num_candidates)
        kept = []
        for g, n_view in self.view_budgets(image):
            x = image.features[g.index.to(image.features.device)]
            r = None if rel is None else rel[position[g.index].to(rel.device)]
            chosen = cdpruner_select(x, r, n_view, theta=self.theta)
            kept.append(g.index[chosen.cpu()])
        return torch.sort(torch.cat(kept)).values
