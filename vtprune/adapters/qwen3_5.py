"""Qwen3.5 (dense ``qwen3_5`` and MoE ``qwen3_5_moe``): Qwen3-VL's vision side without DeepStack and a
hybrid LLM of Gated DeltaNet (linear attention) layers with full attention every few layers
(``text_config.layer_types``; the released models: every 4th layer, the first at index 3).

* **Stage P** shortens the input as on every Qwen family (original M-RoPE positions gathered).
* **Stage D** drops tokens physically from layer K on, for both layer kinds: a linear-attention layer
  has no key mask, so it gets the 2-D padding mask of the surviving sequence (the model's own
  convention for its Gated DeltaNet layers: padded rows zeroed before the projections) and its
  convolution and recurrent states are those of the shortened sequence, at prefill and at decode.
  A full-attention layer gets the usual 4-D mask of the survivors.
* **Attention rows.** Only full-attention layers have attention rows. A method that asks for the rows
  of decoder layer ``l`` (FastV: the last prompt token at layer ``K - 1``; ToDRE / TransPrune: the
  rows after the visual span) gets those of the **last full-attention layer at or before ``l``**,
  computed from that layer's own input, norm and q/k (rotary on the partial rotary dims); with no
  full-attention layer at or before ``l`` ``patch()`` raises ``ValueError`` naming the first layer
  that works (released models: FastV needs ``layer >= 4``).
* **Token transitions** (TransPrune's ``attn_io``) of a linear-attention layer are measured across
  its token mixer (``linear_attn``), the module that plays the attention's role there.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..decoder import build_mask
from .qwen3_vl import Qwen3VLAdapter


class Qwen3_5Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    model_types = ("qwen3_5",)

    def num_deepstack_levels(self) -> int:
        return 0

    def _item_extras(self, out, index: int) -> dict:
        return {}

    # ------------------------------------------------------------ hybrid layers
    def layer_types(self) -> list[str]:
        return list(self.language_model.config.layer_types)

    def full_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types()) if t == "full_attention"]

    def attention_layer_for(self, layer: int) -> int:
        full = [i for i in self.full_attention_layers() if i <= layer]
        if not full:
            first = min(self.full_attention_layers(), default=None)
            fix = (f"the first full-attention layer is {first}, so ask for rows of a layer >= {first} "
                   f"(e.g. FastV layer >= {first + 1})" if first is not None else "this model has none")
            raise ValueError(
                f"{self.family}: attention rows of decoder layer {layer} do not exist (Gated DeltaNet layers "
                f"have no attention map); vtprune reads them at the last full-attention layer at or before "
                f"the requested one, and there is none: {fix}"
            )
        return full[-1]

    def layer_attention_mask(self, layer: int, key_mask: Tensor, q_len: int, dtype) -> Any:
        if self.layer_types()[layer] != "linear_attention":
            return build_mask(self.language_model.config, key_mask, q_len, dtype)
        # the model's own convention for its Gated DeltaNet layers: the 2-D padding mask of the queries,
        # None when nothing is padded or for a single new token
        m = key_mask[:, -q_len:]
        if q_len == 1 or bool(m.all()):
            return None
        return m.long()

    def token_mixer(self, layer: int) -> nn.Module:
        dec = self.llm_layers()[layer]
        return dec.linear_attn if self.layer_types()[layer] == "linear_attention" else dec.self_attn

    def llm_qk(self, attn: nn.Module, h_rows: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Qwen3.5 attention: ``q_proj`` emits (query, gate) per head; q/k norms."""
        b, r, _ = h_rows.shape
        hd = attn.head_dim
        q = attn.q_proj(h_rows).view(b, r, -1, 2 * hd)[..., :hd]  # (query, gate) per head
        q = attn.q_norm(q).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(b, h.shape[1], -1, hd)).transpose(1, 2)
        return q, k


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    family = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)
