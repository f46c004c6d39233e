"""The token schedule of one request: how many tokens each stage actually processed.

A :class:`TokenSchedule` is what :attr:`vtprune.Patch.stats` records for the last request (one entry
per sample) and what :func:`vtprune.count_flops` consumes. Every count is per sample and excludes
padding.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenSchedule:
    """Token counts of one sample.

    Attributes:
        llm_tokens_per_layer: tokens entering each decoder layer at prefill (len = num LLM layers);
            system + visual + text tokens actually present in that layer.
        visual_tokens_per_layer: the visual tokens among ``llm_tokens_per_layer`` (same length).
        visual_tokens_in: visual tokens the model would have fed to the LLM without pruning.
        visual_tokens_per_image: visual tokens per image at the LLM input (after stage V/P).
        vision_tokens_per_layer: per view, the tokens entering each vision-encoder layer
            (``[[577, 577, ...], ...]`` for one CLIP view; shorter lists when merging shrinks it).
            Empty when the vision encoder did not run in this request.
        vision_windows: Qwen2.5-VL only: per vision block, the list of attention segment lengths
            (windows or whole images) actually used; empty otherwise.
        projector_tokens: tokens that went through the projector / merger.
        new_tokens: tokens generated after prefill (0 for a plain forward).
    """

    llm_tokens_per_layer: list[int] = field(default_factory=list)
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    visual_tokens_in: int = 0
    visual_tokens_per_image: list[int] = field(default_factory=list)
    vision_tokens_per_layer: list[list[int]] = field(default_factory=list)
    vision_windows: list[list[int]] = field(default_factory=list)
    projector_tokens: int = 0
    new_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Tokens entering the first decoder layer."""
        return self.llm_tokens_per_layer[0] if self.llm_tokens_per_layer else 0

    @property
    def eq_visual_tokens(self) -> float:
        """Mean visual tokens per decoder layer (the "equivalent visual tokens" of ``vtprune/flops.py``)."""
        v = self.visual_tokens_per_layer
        return sum(v) / len(v) if v else 0.0
