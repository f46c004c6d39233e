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
  pruned this is the model's own computation on the same tensors (bit-identical). A recycled token
  (stage D, ``DecoderSelection``) takes its slot's LLM-input index, so it gets the slot's rows.
* **Video timestamps.** Qwen3-VL writes ``<t seconds>`` text before every frame; those are text
  tokens (never dropped) and the M-RoPE positions of the unpruned sequence are gathered, so every
  kept frame token and timestamp keeps its place.
* **Attention rows** of the LLM apply the layer's ``q_norm``/``k_norm`` (Qwen3 attention).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def num_deepstack_levels(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes)

    # ------------------------------------------------------------ encoder side
    def _item_extras(self, out, index: int) -> dict:
        levels = out.deepstack_features
        return {"deepstack": torch.stack([lvl[index] for lvl in levels], 1)}  # (n, levels, D)

    def build_inputs(self, kwargs, new):
        """Every modality's output also carries the kept rows of each DeepStack level (the rows of the
        emitted tokens: ``new.kept_index``; a merged token takes its representative's)."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        out = super().build_inputs(kwargs, new)
        if not self.num_deepstack_levels():
            return out
        for modality, enc in out["mm_encoder_outputs"].items():
            sel = [k for k, m in enumerate(new.modalities) if m == modality]
            levels = [[new.items[k].extra["deepstack"][new.kept_index[k].to(new.items[k].extra["deepstack"].device), lvl]
                       for k in sel] for lvl in range(self.num_deepstack_levels())]
            out["mm_encoder_outputs"][modality] = BaseModelOutputWithDeepstackFeatures(
                pooler_output=enc.pooler_output, deepstack_features=levels)
        return out

    # ------------------------------------------------------------ LLM attention rows
    def llm_qk(self, attn: nn.Module, h_rows: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Qwen3 attention: ``q_norm`` / ``k_norm`` on each head after the projections."""
        b, r, _ = h_rows.shape
        hd = attn.head_dim
        q = attn.q_norm(attn.q_proj(h_rows).view(b, r, -1, hd)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(b, h.shape[1], -1, hd)).transpose(1, 2)
        return q, k

    # ------------------------------------------------------------ DeepStack inside the LLM
    def install_hooks(self, state) -> list:
        """A pre-hook on the language model takes DeepStack over for the request; forward hooks on the
        first ``n_levels`` decoder layers add each level to the visual tokens still present."""
        n = min(self.num_deepstack_levels(), self.num_llm_layers())
        if n == 0:
            return []
        run = _DeepStack(self.language_model, state)
        handles = [self.language_model.register_forward_pre_hook(run.take, with_kwargs=True),
                   self.language_model.register_forward_hook(run.drop)]
        for i in range(n):
            handles.append(self.llm_layers()[i].register_forward_hook(lambda m, a, out, i=i: run.add(i, out)))
        return handles


class _DeepStack:
    """DeepStack run by the patch on the current (possibly shortened) sequence of one request."""

    def __init__(self, language_model: nn.Module, state):
        self.lm = language_model
        self.state = state  # the patch's RequestState (read only)
        self.taken: tuple[Tensor, list[Tensor]] | None = None

    def take(self, module, args, kwargs):
        """Language-model pre-hook: keep ``visual_pos_masks`` (B, L') and the per-level rows
        (n_visual, D) of a patched prefill; the model itself then adds nothing."""
        self.taken = None
        embeds = kwargs.get("deepstack_visual_embeds")
        if embeds is None or not self.state.active:
            return None
        self.taken = (kwargs["visual_pos_masks"], list(embeds))
        kwargs["deepstack_visual_embeds"] = None
        kwargs["visual_pos_masks"] = None
        return args, kwargs

    def drop(self, module, args, output):
        self.taken = None
        return None

    def add(self, level: int, hidden: Tensor):
        """Forward hook of decoder layer ``level``: the model's own ``_deepstack_process`` at the visual
        tokens present in that layer (``DecoderState.cur_index`` after a stage-D prune)."""
        if self.taken is None:
            return None
        vis, embeds = self.taken
        emb = embeds[level]
        dec = self.state.decoder
        if dec.cur_index is not None:
            vis = vis.to(dec.cur_index.device)
            row = (vis.flatten().long().cumsum(0) - 1).view(vis.shape)  # row of each visual position in emb
            cur_vis = torch.gather(vis, 1, dec.cur_index) & dec.cur_keymask
            emb = emb[torch.gather(row, 1, dec.cur_index)[cur_vis].to(emb.device)]
            vis = cur_vis
        return self.lm._deepstack_process(hidden, vis, emb)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
