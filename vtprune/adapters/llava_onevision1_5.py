"""LLaVA-OneVision-1.5 (``LlavaOnevision15ForConditionalGeneration``): RICE-ViT + Qwen3 with 1-D positions.

Despite the name it shares nothing with LLaVA-OneVision's layout: the vision side is Qwen2.5-VL-like
(``model.model.visual``: one packed sequence of native-resolution patches in 2x2 merge-unit order,
``cu_seqlens`` per image / video frame, 2-D vision RoPE, full attention in every block), except that
the tower prepends **one CLS token to every frame** and drops it before the 2x2 patch merger; the
LLM is Qwen3 with plain 1-D positions (``position_ids=None`` -> arange, ``generate`` numbers from the
attention mask), no M-RoPE.

So the adapter takes the Qwen one for the vision side (merged tokens in raster order per frame, one
view per frame, ``vit_received@b`` = the attention each merged token receives in block ``b``:
recomputed per frame segment from the block's own ``qkv`` and vision rotary function, head mean,
sum over all query rows of the segment (CLS row included), the CLS key dropped, mean over the 4
patches of each merge unit) and the LLaVA one for positions (renumbered by default,
``positions="original"`` gathers the unpruned ones). Methods see it as a packed, CLS-free tower:
the per-frame CLS token never reaches the LLM and is not offered as a signal (VisionZip, ToDRE and
GlobalCom2 use received attention, as on Qwen).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..attention import attention_probs
from ..policy import ImageTokens
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter


class LlavaOnevision15Adapter(Qwen2VLAdapter):
    family = "llava_onevision1_5"
    model_types = ("llava_onevision1_5",)
    default_positions = "renumber"
    position_modes = ("original", "renumber")

    def visual_token_ids(self) -> dict[str, int]:
        return {"image": self.image_token_id, "video": int(self.config.video_token_id)}

    def has_images(self, kwargs) -> bool:
        return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None

    # ------------------------------------------------------------ vision signals
    @contextmanager
    def _capture(self, blocks: set[int]):
        """The inputs (hidden, cu_seqlens, rotary tables) of ``blocks``."""
        got: dict = {}
        handles = []
        for b in blocks:
            def hook(m, args, kwargs, b=b):
                cu = args[1] if len(args) > 1 else kwargs["cu_seqlens"]
                got[b] = (args[0] if args else kwargs["hidden_states"], cu, kwargs["position_embeddings"])
            handles.append(self.vit_blocks()[b].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield got
        finally:
            for h in handles:
                h.remove()

    def _received_cls(self, block: int, x: Tensor, cu: Tensor, rope) -> Tensor:
        """(merged tokens,) attention received per merge unit, frames concatenated (CLS keys dropped)."""
        blk = self.vit_blocks()[block]
        attn = blk.attn
        h = blk.norm1(x)
        n = h.shape[0]
        q, k, _ = attn.qkv(h).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        mod = sys.modules[type(attn).__module__]
        q, k = mod.apply_rotary_pos_emb_vision(q, k, *rope)
        cu = cu.tolist()
        out = []
        for s, e in zip(cu[:-1], cu[1:]):
            if e - s <= 1:
                continue
            probs = attention_probs(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], attn.scaling,
                                    chunk_heads=4)
            out.append(probs[0].mean(0).sum(0)[1:])  # received by each patch; the frame's CLS key dropped
        m = self.config.vision_config.spatial_merge_size ** 2
        return torch.cat(out).view(-1, m).mean(-1)

    # ------------------------------------------------------------ encoding
    def encode(self, kwargs, signals, vision_policies, ctx):
        if vision_policies:
            raise ValueError("stage-V (in-encoder) policies are not supported on LLaVA-OneVision-1.5 (packed ViT); "
                             "use the stage-P variant of the method")
        blocks = {}
        for name in signals:
            kind, _, layer = name.partition("@")
            if kind != "vit_received":
                raise ValueError(f"unknown LLaVA-OneVision-1.5 vision signal {name!r}; supported: vit_received@BLOCK")
            blocks[name] = self.resolve_vit_layer(int(layer))
        items, sched = [], []
        for modality, pix, grid in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):
            if kwargs.get(pix) is not None:
                got_items, got_sched = self._encode(modality, kwargs[pix], kwargs[grid], blocks, len(items))
                items += got_items
                sched += got_sched
        return items, sched

    def _encode(self, modality: str, pixels: Tensor, grid_thw: Tensor, blocks: dict, first: int):
        inner = self.model.model
        get = inner.get_image_features if modality == "image" else inner.get_video_features
        with self._capture(set(blocks.values())) as got:
            out = get(pixels, grid_thw, return_dict=True)
        sig_all = {name: self._received_cls(b, *got[b]) for name, b in blocks.items()}
        merge = self.config.vision_config.spatial_merge_size
        n_blocks = len(self.vit_blocks())
        items, sched, start = [], [], 0
        for i, f in enumerate(out.pooler_output):
            t, hh, ww = (int(v) for v in grid_thw[i])
            gh, gw = hh // merge, ww // merge
            n = f.shape[0]
            j = torch.arange(n)
            items.append(
                ImageTokens(
                    features=f,
                    candidate=torch.ones(n, dtype=torch.bool),
                    view=j // (gh * gw),  # frame
                    grid=torch.stack([(j % (gh * gw)) // gw, j % gw], -1),
                    grid_shapes=[(gh, gw)] * t,
                    signals={name: s[start : start + n] for name, s in sig_all.items()},
                    image_index=first + i,
                    extra={"source": j, "n_views": t, "projector_tokens": n, "modality": modality},
                )
            )
            sched.extend([[hh * ww + 1] * n_blocks for _ in range(t)])  # full attention per frame, CLS included
            start += n
        return items, sched

    def llm_qk(self, attn, h_rows: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Qwen3 attention: per-head RMS norms on q and k before rotary."""
        hd = attn.head_dim
        q = attn.q_norm(attn.q_proj(h_rows).view(*h_rows.shape[:2], -1, hd)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(*h.shape[:2], -1, hd)).transpose(1, 2)
        return q, k

    # ------------------------------------------------------------ positions and inputs (1-D, as LLaVA)
    full_positions = LlavaAdapter.full_positions
    renumber_positions = LlavaAdapter.renumber_positions

    def decode_positions(self, pos: Tensor) -> Tensor:
        return pos

    def after_prefill(self, state) -> None:
        """Nothing to set: 1-D positions, no ``rope_deltas``."""

    def build_inputs(self, kwargs, new):
        out = dict(kwargs)
        for key in ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw"):
            out.pop(key, None)
        out["input_ids"] = new["input_ids"]
        out["attention_mask"] = new["attention_mask"]
        out["position_ids"] = new["position_ids"]
        if kwargs.get("mm_token_type_ids") is not None:
            out["mm_token_type_ids"] = new["gather"](kwargs["mm_token_type_ids"], 0)
        mm = {}
        for modality in ("image", "video"):
            feats = [f for f, item in zip(new["features"], new["items"]) if item.extra.get("modality") == modality]
            if feats:
                mm[modality] = BaseModelOutputWithPooling(pooler_output=feats)
        out["mm_encoder_outputs"] = mm
        return out
