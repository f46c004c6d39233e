"""The Adapter interface: everything vtprune needs to know about one model family.

Adapters are the only code that touches ``transformers`` classes. An adapter:

* encodes the images of a request into per-image :class:`~vtprune.policy.ImageTokens` (native LLM
  layout, grid positions, requested vision signals), optionally running stage-V policies;
* computes the positions the unpatched model would use, and turns a shortened sequence back into
  model inputs (``input_ids``, ``attention_mask``, positions, precomputed image features);
* exposes the decoder layers, the rotary tables (:meth:`Adapter.rotary`) and function, and the q/k
  projections for partial attention.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import attention_probs


class Adapter:
    """Base class; one subclass per family (see ``vtprune.adapters.ADAPTERS``)."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    default_positions: str = "renumber"
    position_modes: tuple[str, ...] = ("original", "renumber")

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ---------------------------------------------------------------- structure
    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def llm_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    def num_llm_layers(self) -> int:
        return len(self.llm_layers())

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def visual_token_ids(self) -> dict[str, int]:
        """Placeholder token id of each visual modality the family takes (``{"image": id}``)."""
        return {"image": self.image_token_id}

    def nominal_visual_tokens(self) -> int | None:
        """Visual tokens per image when fixed by the config (LLaVA-1.5), else None."""
        return None

    def attn_implementation(self) -> str:
        return self.language_model.config._attn_implementation

    # ---------------------------------------------------------------- requests
    def has_images(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None

    def encode(self, kwargs: dict[str, Any], signals: dict[str, Any], vision_policies: list, ctx) -> list:
        """Run the vision side; return one ``ImageTokens`` per image, in request order."""
        raise NotImplementedError

    def full_positions(self, kwargs: dict[str, Any], input_ids: Tensor, mask: Tensor) -> Tensor | None:
        """Positions the unpatched model would use for this prefill, in its native format, or None."""
        raise NotImplementedError

    def build_inputs(self, kwargs: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        """Return the kwargs for the model forward on the shortened sequence."""
        raise NotImplementedError

    def decode_positions(self, pos: Tensor) -> Tensor:
        """(B, q) positions of new tokens in the model's native position-id format."""
        return pos

    def after_prefill(self, state) -> None:
        """Hook for family-specific bookkeeping after the prefill inputs were rebuilt."""

    # ---------------------------------------------------------------- LLM layers (stage D)
    def attention_layer_for(self, layer: int) -> int:
        """The decoder layer whose attention rows stand for those of ``layer`` (itself here; hybrid
        models map to a full-attention layer or raise ``ValueError`` naming the fix)."""
        return layer

    def layer_attention_mask(self, layer: int, key_mask: Tensor, q_len: int, dtype: torch.dtype) -> Any:
        """The ``attention_mask`` decoder layer ``layer`` gets for ``q_len`` queries at the end of the
        keys ``key_mask`` (B, kv) bool (4-D, in the model's attention implementation's format)."""
        from ..decoder import build_mask

        return build_mask(self.language_model.config, key_mask, q_len, dtype)

    def token_mixer(self, layer: int) -> nn.Module:
        """The module of decoder layer ``layer`` that mixes tokens (``attn_io`` signals hook it)."""
        return self.llm_layers()[layer].self_attn

    # ---------------------------------------------------------------- LLM attention rows
    def rotary(self, hidden: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) of the language model's own rotary module (``rotary_emb``) for ``position_ids``.

        ``hidden`` only fixes the dtype/device; ``position_ids`` has the model's native format (LLaVA:
        (B, L)). Returns the tables the model would hand its decoder layers for those positions.
        """
        return self.language_model.rotary_emb(hidden, position_ids)

    def rotary_fn(self, layer: nn.Module):
        """The modeling module's own ``apply_rotary_pos_emb`` for a decoder layer."""
        mod = sys.modules[type(layer.self_attn).__module__]
        return mod.apply_rotary_pos_emb

    def llm_attention_rows(
        self,
        layer_idx: int,
        hidden: Tensor,
        position_embeddings: tuple[Tensor, Tensor],
        rows: Tensor,
        key_mask: Tensor | None,
    ) -> Tensor:
        """Head-wise probabilities of decoder layer ``layer_idx`` for query rows ``rows``.

        Args:
            hidden: (B, L, D) input of the layer (before its input norm).
            position_embeddings: (cos, sin), each (B, L, hd) (the layer's own rotary tables).
            rows: (B, R) long, query positions in the current sequence.
            key_mask: (B, L) bool, False on padding keys.
        Returns:
            (B, H, R, L) fp32 probabilities under the causal + padding mask.
        """
        layer = self.llm_layers()[layer_idx]
        attn = layer.self_attn
        h = layer.input_layernorm(hidden)
        b, n, _ = h.shape
        hd = attn.head_dim
        h_rows = torch.gather(h, 1, rows[..., None].expand(-1, -1, h.shape[-1]))
        q = attn.q_proj(h_rows).view(b, rows.shape[1], -1, hd).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, -1, hd).transpose(1, 2)
        cos, sin = position_embeddings
        cos = cos.expand(b, *cos.shape[1:])
        sin = sin.expand(b, *sin.shape[1:])
        cos_r = torch.gather(cos, -2, rows[..., None].expand(-1, -1, cos.shape[-1]))
        sin_r = torch.gather(sin, -2, rows[..., None].expand(-1, -1, sin.shape[-1]))
        rot = self.rotary_fn(layer)
        q, _ = rot(q, q, cos_r, sin_r)
        k, _ = rot(k, k, cos, sin)
        return attention_probs(q, k, attn.scaling, key_mask=key_mask, query_index=rows)


def vit_layer_parts(layer: nn.Module) -> tuple[nn.Module, nn.Module, int, float]:
    """(norm, attention module, num_heads, scale) of a plain ViT layer (CLIP, SigLIP, DINOv2)."""
    norm = getattr(layer, "layer_norm1", None) or getattr(layer, "norm1", None)
    attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None)
    if norm is None or attn is None or not hasattr(attn, "q_proj"):
        raise ValueError(f"unsupported vision layer {type(layer).__name__}: expected CLIP, SigLIP or DINOv2 layers")
    heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads")
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling")
    return norm, attn, int(heads), float(scale)


def vit_qk(layer: nn.Module, x: Tensor, rows: slice | Tensor | None = None) -> tuple[Tensor, Tensor, float]:
    """q (V, H, R, hd) for ``rows`` (all rows if None) and k (V, H, N, hd) of a plain ViT layer.

    ``x`` is the layer input (V, N, C) (before the layer's first norm).
    """
    norm, attn, heads, scale = vit_layer_parts(layer)
    h = norm(x)
    v, n, c = h.shape
    hq = h if rows is None else h[:, rows]
    q = attn.q_proj(hq).view(v, hq.shape[1], heads, -1).transpose(1, 2)
    k = attn.k_proj(h).view(v, n, heads, -1).transpose(1, 2)
    return q, k, scale
