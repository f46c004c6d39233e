"""The Adapter interface: everything vtprune needs to know about one model family.

Adapters are the only code that touches ``transformers`` (or open_clip) classes. One subclass per
family, registered in ``vtprune.adapters.ADAPTERS`` by ``model_types``. The contract, in the order
:class:`~vtprune.api.Patch` uses it at prefill:

1. :meth:`Adapter.has_images` -- does this forward carry images (else it runs unchanged)?
2. :meth:`Adapter.full_positions` -- the positions the unpatched model would use.
3. :meth:`Adapter.encode` -- run the vision side (stage-V policies included, through
   :meth:`Adapter.run_vision_policies`) and return one :class:`~vtprune.policy.ImageTokens` per
   image in request order, with the requested signals (``vtprune/signals.py``), plus the encoder's
   token schedule per view: an :class:`Encoded`.
4. :meth:`Adapter.renumber_positions` (stage P renumbers) -- positions of the shortened sequence.
5. :meth:`Adapter.build_inputs` -- the model kwargs for the shortened sequence (:class:`ShortInputs`);
   the base version replaces ids / mask / positions and hands the features as precomputed
   ``mm_encoder_outputs``; a family adds its own keys (Qwen: ``mm_token_type_ids``).
6. :meth:`Adapter.after_prefill` -- family bookkeeping once the inputs are rebuilt (Qwen:
   ``rope_deltas``).

At decode: :meth:`Adapter.decode_positions`. Stage D: :meth:`Adapter.llm_layers`,
:meth:`Adapter.rotary`, :meth:`Adapter.llm_attention_rows` (recomputed attention rows, fp32, from
:meth:`Adapter.llm_qk`), and for LLMs whose layers differ (hybrid Qwen3.5):
:meth:`Adapter.attention_layer_for` (which layer's rows stand for a layer's),
:meth:`Adapter.layer_attention_mask` (the mask a layer takes) and :meth:`Adapter.token_mixer`.
Several visual modalities (Qwen: images and videos): :meth:`Adapter.visual_token_ids`.
Vision towers: :meth:`Adapter.vit_layers` and :meth:`Adapter.resolve_vit_layer` (what methods use to
name signal layers). Hooks of their own (open_clip ViTs: the whole work; Qwen3-VL: DeepStack inside
the LLM) come from :meth:`Adapter.install_hooks`.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from .tap import can_tap, tap
from ..attention import attention_probs
from ..policy import Context, ImageTokens, VisionPolicy
from ..rows import take_rows


class Encoded(NamedTuple):
    """What :meth:`Adapter.encode` returns.

    images: one :class:`ImageTokens` per image, in request order (all samples flattened).
    vision_schedule: per encoder view of the request (in order), the tokens entering each encoder
        layer (empty lists when the tower's schedule is unknown).
    """

    images: list[ImageTokens]
    vision_schedule: list[list[int]]


@dataclass
class ShortInputs:
    """The shortened prefill handed to :meth:`Adapter.build_inputs` (``L'`` = the new length).

    Attributes:
        input_ids: (B, L') ids, placeholders of dropped tokens removed, repacked with padding.
        attention_mask: (B, L') mask, or None when the caller passed none and no padding is needed.
        position_ids: positions in the model's native format, or None (the model numbers itself).
        features: per image, (n_out, D) features in sequence order.
        gather: ``(t (…, B, L), pad) -> (…, B, L')``: any per-column tensor of the caller's input at the
            kept columns (e.g. Qwen's ``mm_token_type_ids``).
        modalities: per image, its :attr:`~vtprune.policy.ImageTokens.modality` (``"image"`` /
            ``"video"``); empty: all images.
        items: the encoded items (:meth:`Adapter.encode`'s images), aligned with ``features``.
        kept_index: per item, the native token index of each emitted token (aligned with
            ``features``): what an adapter gathers its own per-token data with (Qwen3-VL DeepStack).
    """

    input_ids: Tensor
    attention_mask: Tensor | None
    position_ids: Any
    features: list[Tensor]
    gather: Callable[[Tensor, Any], Tensor]
    modalities: list[str] = field(default_factory=list)
    items: list[ImageTokens] = field(default_factory=list)
    kept_index: list[Tensor] = field(default_factory=list)


class Adapter:
    """Base class; one subclass per family (see the module docstring for the contract).

    Class data: ``family`` (the name policies see), ``model_types`` (``config.model_type`` values),
    ``default_positions`` (stage-P convention for ``positions="auto"``), ``position_modes`` (the
    modes defined for this family), ``image_input_keys`` (kwargs consumed by the vision side and
    removed from the shortened inputs).
    """

    family: str = ""
    model_types: tuple[str, ...] = ()
    default_positions: str = "renumber"
    position_modes: tuple[str, ...] = ("original", "renumber")
    image_input_keys: tuple[str, ...] = ("pixel_values",)

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
        """``{modality: placeholder token id}`` of the visual inputs this family takes (image, video)."""
        return {"image": self.image_token_id}

    def nominal_visual_tokens(self) -> int | None:
        """Visual tokens per image when fixed by the config (LLaVA-1.5), else None."""
        return None

    def attn_implementation(self) -> str:
        return self.language_model.config._attn_implementation

    def text_embeddings(self, ids: Tensor) -> Tensor:
        """(M,) token ids -> (M, D) the LLM's own input embeddings (text signals, ``signals.TEXT_SIGNALS``)."""
        return self.model.get_input_embeddings()(ids)

    def vit_layers(self) -> nn.ModuleList:
        """The vision tower's layers / blocks, in order (what signal layer indices refer to)."""
        raise NotImplementedError(f"{type(self).__name__} exposes no vision layers")

    def resolve_vit_layer(self, layer: int) -> int:
        """A 0-based (negative: from the end) vision layer index -> 0-based; ``ValueError`` if out of range."""
        n = len(self.vit_layers())
        if not -n <= layer < n:
            raise ValueError(f"vision layer {layer} out of range for a {n}-layer vision tower")
        return layer % n

    def install_hooks(self, state) -> list:
        """Extra hook handles installed with the patch and removed with it (default: none). Adapters
        without an LLM (open_clip ViTs) do their whole work in such hooks; Qwen3-VL runs DeepStack on
        the sequence stage D shortened. ``state`` is the patch's :class:`~vtprune.state.RequestState`
        (hooks read it, never write it)."""
        return []

    # ---------------------------------------------------------------- requests
    def has_images(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None

    def encode(self, kwargs: dict[str, Any], signals: dict[str, Any], vision_policies: list[VisionPolicy],
               ctx: Context) -> Encoded:
        """Run the vision side; return one ``ImageTokens`` per image, in request order, and the
        encoder's per-view token schedule. ``signals`` are the names the policies requested."""
        raise NotImplementedError

    def full_positions(self, kwargs: dict[str, Any], input_ids: Tensor, mask: Tensor) -> Tensor | None:
        """Positions the unpatched model would use for this prefill, in its native format, or None."""
        raise NotImplementedError

    def renumber_positions(self, kwargs: dict[str, Any], new_mask: Tensor) -> Tensor | None:
        """Contiguous positions of the shortened sequence (``positions="renumber"``), or None when the
        model numbers it itself. Default: not defined for this family (``ValueError``)."""
        raise ValueError(f"positions='renumber' is not defined for {self.family}; use positions='original'")

    def build_inputs(self, kwargs: dict[str, Any], new: ShortInputs) -> dict[str, Any]:
        """The kwargs for the model forward on the shortened sequence: the caller's kwargs without the
        image inputs, with the new ids, mask and positions and the features as ``mm_encoder_outputs``."""
        out = dict(kwargs)
        for key in self.image_input_keys:
            out.pop(key, None)
        out["input_ids"] = new.input_ids
        out["attention_mask"] = new.attention_mask
        out["position_ids"] = new.position_ids
        kinds = new.modalities or ["image"] * len(new.features)
        mm = {}
        for modality in dict.fromkeys(kinds):  # each modality's features, in request order
            feats = [f for f, k in zip(new.features, kinds) if k == modality]
            mm[modality] = self.encoder_output(modality, feats)
        out["mm_encoder_outputs"] = mm
        return out

    def encoder_output(self, modality: str, features: list[Tensor]):
        """The precomputed ``mm_encoder_outputs[modality]`` the model takes for these per-item features
        (default: ``pooler_output`` = the list, as LLaVA and Qwen take images)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=features)

    def decode_positions(self, pos: Tensor) -> Tensor:
        """(B, q) positions of new tokens in the model's native position-id format."""
        return pos

    def after_prefill(self, state) -> None:
        """Family bookkeeping after the prefill inputs were rebuilt; ``state`` is the request's
        :class:`~vtprune.state.PrefillState`. Default: nothing."""

    # ---------------------------------------------------------------- stage V
    def check_stage_v(self) -> None:
        """Raise ``ValueError`` naming an alternative when this model's vision tower cannot run stage-V
        policies layer by layer (called by ``VisionPolicy.validate``; default: it can)."""

    @staticmethod
    def run_vision_policies(layer: int, n_layers: int, x: Tensor, sources: Tensor,
                            policies: list[VisionPolicy], ctx: Context) -> tuple[Tensor, Tensor, bool]:
        """The stage-V step after encoder layer ``layer``: let each policy that acts there shrink ``x``.

        ``x`` (V, N, C) layer output; ``sources`` (V, N) long, original token index of each token's
        representative. Returns ``(x, sources, changed)``.
        """
        changed = False
        for p in policies:
            if layer in p.layers(n_layers):
                res = p.after_layer(layer, x, ctx)
                if res is not None:
                    x, s = res
                    sources = torch.gather(sources, 1, s.to(sources.device))
                    changed = True
        return x, sources, changed

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

    def llm_key_projection(self, layer: int) -> nn.Module | None:
        """The key projection (an ``nn.Linear`` applied to the normed layer input) of decoder layer
        ``layer``, or None when its token mixer has none (a Gated DeltaNet layer). The decoder serves
        this module the rows a signal already projected before the layer's cut (:mod:`vtprune.reuse`)."""
        proj = getattr(getattr(self.llm_layers()[layer], "self_attn", None), "k_proj", None)
        return proj if isinstance(proj, nn.Linear) else None

    def tap_llm_attention(self, layer: int, callback):
        """Tap decoder layer ``layer``'s attention (:mod:`vtprune.adapters.tap`): ``callback(module, q,
        k, lse)`` after each call with q (B, H, L, hd) and k (B, Hkv, L, hd) as the layer computed them
        (norms and rotary applied); a removable handle, or None when the layer's token mixer does not
        dispatch through transformers' attention interface (a Gated DeltaNet layer)."""
        mod = getattr(self.llm_layers()[layer], "self_attn", None)
        return tap(mod, callback) if mod is not None and can_tap(mod) else None

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
        b = h.shape[0]
        h_rows = take_rows(h, rows, 1)
        q, k = self.llm_qk(attn, h_rows, h)
        cos, sin = position_embeddings
        cos_r = take_rows(cos, rows, cos.dim() - 2)  # a batch of 1 is broadcast to B
        sin_r = take_rows(sin, rows, sin.dim() - 2)
        cos = cos.expand(b, *cos.shape[1:])
        sin = sin.expand(b, *sin.shape[1:])
        rot = self.rotary_fn(layer)
        q, _ = rot(q, q[:, :1], cos_r, sin_r)  # the second operand only fixes shapes: one head, not all
        _, k = rot(k[:, :1], k, cos, sin)
        return attention_probs(q, k, attn.scaling, key_mask=key_mask, query_index=rows, chunk_heads=4)

    def llm_keys(self, layer_idx: int, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """(B, Hkv, L, hd) keys of decoder layer ``layer_idx`` as its KV cache stores them.

        Input norm, the family's key projection (:meth:`llm_qk`) and the layer's own rotary tables, in
        the model's dtype; grouped-query heads are not repeated (``hidden``: (B, L, D) input of the layer).
        """
        layer = self.llm_layers()[layer_idx]
        h = layer.input_layernorm(hidden)
        b = h.shape[0]
        _, k = self.llm_qk(layer.self_attn, h[:, :1], h)  # the family's own q/k (e.g. Qwen3's k norm)
        cos, sin = position_embeddings
        _, k = self.rotary_fn(layer)(k[:, :1], k, cos.expand(b, *cos.shape[1:]), sin.expand(b, *sin.shape[1:]))
        return k

    def llm_rope_scores(self, layer_idx: int, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor],
                        rows: Tensor) -> Tensor:
        """(B, R, L) ``q.k / sqrt(hd)`` (fp32; float64 for float64 models) of all-ones queries (rows ``rows`` (B, R)) and keys after the
        layer's rotary tables: the score the positions alone contribute (``hidden`` fixes B, L, dtype)."""
        layer = self.llm_layers()[layer_idx]
        hd = layer.self_attn.head_dim
        b, n, _ = hidden.shape
        cos, sin = position_embeddings
        dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        cos, sin = cos.expand(b, *cos.shape[1:]).to(dt), sin.expand(b, *sin.shape[1:]).to(dt)
        ones = torch.ones((b, 1, n, hd), dtype=dt, device=hidden.device)
        _, k = self.rotary_fn(layer)(ones, ones, cos, sin)
        q = torch.gather(k[:, 0], 1, rows[..., None].expand(-1, -1, hd))
        return torch.matmul(q, k[:, 0].transpose(-1, -2)) / math.sqrt(hd)

    def sample_rotary(self, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor], position_ids: Tensor | None,
                      key_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The rotary tables of a decoder layer at the positions each sample has when run alone.

        A plain forward of a left-padded batch numbers the padding too (positions ``arange(L)``), which
        attention does not notice (RoPE is relative) but absolute functions of the rotated keys do.
        1-D position ids are shifted so that each sample's first real token (``key_mask`` (B, L))
        keeps its unpadded number; without padding or position ids the layer's tables are returned.
        """
        if position_ids is None or position_ids.shape[-1] != hidden.shape[1] or bool(key_mask.all()):
            return position_embeddings
        b = hidden.shape[0]
        pid = position_ids.long().expand(b, position_ids.shape[-1])
        first = key_mask.long().argmax(-1, keepdim=True)  # first real token (left padding)
        return self.rotary(hidden, (pid - torch.gather(pid, 1, first)).masked_fill(~key_mask, 0))

    def llm_final_norm(self, hidden: Tensor) -> Tensor:
        """The language model's final norm (the one before ``lm_head``) applied to ``hidden`` (B, L, D)."""
        return self.language_model.norm(hidden)


    def llm_qk(self, attn: nn.Module, h_rows: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, R, hd) queries of the rows ``h_rows`` (B, R, D) and (B, Hkv, L, hd) keys of ``h`` (B, L, D),
        before rotary, from a decoder layer's attention module (Llama / Qwen2: plain projections)."""
        hd = attn.head_dim
        q = attn.q_proj(h_rows).view(*h_rows.shape[:2], -1, hd).transpose(1, 2)
        k = attn.k_proj(h).view(*h.shape[:2], -1, hd).transpose(1, 2)
        return q, k


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
