"""Qwen3-VL (dense ``qwen3_vl`` and MoE ``qwen3_vl_moe``): packed ViT, 2x2 merger, M-RoPE, DeepStack.

Everything the Qwen2-VL adapter does holds here (HF's own merged features, original M-RoPE positions
gathered at the kept columns, ``rope_deltas`` for decoding, images and videos as items whose views are
frames). What is new:

* **DeepStack.** The ViT also emits, from ``deepstack_visual_indexes`` blocks, one extra feature per
  merged token and level; the LLM adds level ``i`` to the hidden states of the visual positions after
  decoder layer ``i``. Pruning before the LLM hands the model the kept rows of *every* level (the same
  indices as the main features) through ``mm_encoder_outputs``. A merging policy defines its merge on
  the main features only: the DeepStack rows of a merged token are those of its representative.
  Inside the LLM (stage D) the adapter runs DeepStack itself on the current sequence: a pre-hook on the
  language model takes ``visual_pos_masks`` / ``deepstack_visual_embeds`` (the model gets None), and a
  forward hook on each of the first ``n_levels`` decoder layers calls the model's own
  ``_deepstack_process`` with the visual positions and rows that survive in that layer. With nothing
  pruned this is the model's own computation on the same tensors (bit-identical).
* **Video timestamps.** Qwen3-VL writes ``<t seconds>`` text before every frame; those are text
  tokens (never dropped) and the M-RoPE positions of the unpruned sequence are gathered, so every
  kept frame token and timestamp keeps its place.
* **Attention rows** of the LLM apply the layer's ``q_norm``/``k_norm`` (Qwen3 attention).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..attention import attention_probs
from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._state = None
        self._deepstack: tuple[Tensor, list[Tensor]] | None = None

    def num_deepstack_levels(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes)

    # ------------------------------------------------------------ encoder side
    def _item_extras(self, out, index: int) -> dict:
        levels = out.deepstack_features
        return {"deepstack": torch.stack([lvl[index] for lvl in levels], 1)}  # (n, levels, D)

    def _encoder_output(self, items, features, kept):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        levels = [
            [it.extra["deepstack"][k.to(it.extra["deepstack"].device), lvl] for it, k in zip(items, kept)]
            for lvl in range(self.num_deepstack_levels())
        ]
        return BaseModelOutputWithDeepstackFeatures(pooler_output=features, deepstack_features=levels)

    # ------------------------------------------------------------ LLM attention rows
    def _qk(self, attn: nn.Module, h_rows: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, R, hd) queries of the rows and (B, Hkv, L, hd) keys, before rotary."""
        b, r, _ = h_rows.shape
        hd = attn.head_dim
        q = attn.q_norm(attn.q_proj(h_rows).view(b, r, -1, hd)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(b, h.shape[1], -1, hd)).transpose(1, 2)
        return q, k

    def llm_attention_rows(self, layer_idx, hidden, position_embeddings, rows, key_mask):
        layer = self.llm_layers()[layer_idx]
        attn = layer.self_attn
        h = layer.input_layernorm(hidden)
        b = h.shape[0]
        h_rows = torch.gather(h, 1, rows[..., None].expand(-1, -1, h.shape[-1]))
        q, k = self._qk(attn, h_rows, h)
        cos, sin = position_embeddings
        cos = cos.expand(b, *cos.shape[1:])
        sin = sin.expand(b, *sin.shape[1:])
        cos_r = torch.gather(cos, -2, rows[..., None].expand(-1, -1, cos.shape[-1]))
        sin_r = torch.gather(sin, -2, rows[..., None].expand(-1, -1, sin.shape[-1]))
        rot = self.rotary_fn(layer)
        q, _ = rot(q, q, cos_r, sin_r)
        k, _ = rot(k, k, cos, sin)
        return attention_probs(q, k, attn.scaling, key_mask=key_mask, query_index=rows)

    # ------------------------------------------------------------ DeepStack inside the LLM
    def after_prefill(self, state) -> None:
        super().after_prefill(state)
        self._state = state

    def install_hooks(self) -> list:
        n = self.num_deepstack_levels()
        handles = [self.language_model.register_forward_pre_hook(self._take_deepstack, with_kwargs=True),
                   self.language_model.register_forward_hook(self._drop_deepstack)]
        layers = self.llm_layers()
        for i in range(min(n, len(layers))):
            handles.append(layers[i].register_forward_hook(lambda m, a, out, i=i: self._add_deepstack(i, out)))
        return handles

    def _take_deepstack(self, module, args, kwargs):
        self._deepstack = None
        embeds = kwargs.get("deepstack_visual_embeds")
        if embeds is None or self._state is None or not self._state.active:
            return None
        self._deepstack = (kwargs["visual_pos_masks"], list(embeds))
        kwargs["deepstack_visual_embeds"] = None
        kwargs["visual_pos_masks"] = None
        return args, kwargs

    def _drop_deepstack(self, module, args, output):
        self._deepstack = None
        return None

    def _add_deepstack(self, level: int, hidden: Tensor):
        if self._deepstack is None:
            return None
        vis, embeds = self._deepstack
        st = self._state
        emb = embeds[level]
        if st.cur_index is not None:  # the sequence was shortened inside the LLM: the surviving visual rows
            vis = vis.to(st.cur_index.device)
            row = (vis.flatten().long().cumsum(0) - 1).view(vis.shape)  # row of each visual position in emb
            cur_vis = torch.gather(vis, 1, st.cur_index) & st.cur_keymask
            emb = emb[torch.gather(row, 1, st.cur_index)[cur_vis].to(emb.device)]
            vis = cur_vis
        return self.language_model._deepstack_process(hidden, vis, emb)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
