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

import dataclasses
from contextlib import contextmanager

import torch
from torch import Tensor

from ..policy import ImageTokens
from ..signals import PACKED_VIT_SIGNALS, PackedViTBlock, parse_signal
from .base import Encoded
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter


class LlavaOnevision15Adapter(Qwen2VLAdapter):
    family = "llava_onevision1_5"
    model_types = ("llava_onevision1_5",)
    default_positions = "renumber"
    position_modes = ("original", "renumber")
    image_input_keys = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")

    def visual_token_ids(self) -> dict[str, int]:
        return {"image": self.image_token_id, "video": int(self.config.video_token_id)}

    def has_images(self, kwargs) -> bool:
        return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None

    # ------------------------------------------------------------ vision signals
    @contextmanager
    def _capture(self, blocks: set[int]):
        """The inputs of ``blocks`` as ``(hidden, kwargs)`` (the blocks take ``cu_seqlens`` positionally)."""
        got: dict = {}
        handles = []
        for b in blocks:
            def hook(m, args, kwargs, b=b):
                kw = dict(kwargs, cu_seqlens=args[1] if len(args) > 1 else kwargs["cu_seqlens"])
                got[b] = (args[0] if args else kwargs["hidden_states"], kw)
            handles.append(self.vit_layers()[b].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield got
        finally:
            for h in handles:
                h.remove()

    def _block(self, block: int, x: Tensor, kw: dict, grid_thw: Tensor) -> PackedViTBlock:
        """The Qwen block view, with the frame's CLS token at the start of every segment."""
        return dataclasses.replace(super()._block(block, x, kw, grid_thw), prefix=1)

    # ------------------------------------------------------------ encoding
    def encode(self, kwargs, signals, vision_policies, ctx) -> Encoded:
        if vision_policies:
            raise ValueError("stage-V (in-encoder) policies are not supported on LLaVA-OneVision-1.5 (packed ViT); "
                             "use the stage-P variant of the method")
        blocks: dict[str, tuple[str, int]] = {}
        for name in signals:
            kind, layer = parse_signal(name)
            if kind not in PACKED_VIT_SIGNALS:
                raise ValueError(f"unknown LLaVA-OneVision-1.5 vision signal {name!r}; supported: "
                                 + ", ".join(f"{k}@BLOCK" for k in PACKED_VIT_SIGNALS))
            blocks[name] = (kind, self.resolve_vit_layer(layer))
        items, sched = [], []
        for modality, pix, grid in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):
            if kwargs.get(pix) is not None:
                got_items, got_sched = self._encode(modality, kwargs[pix], kwargs[grid], blocks, len(items))
                items += got_items
                sched += got_sched
        return Encoded(items, sched)

    def _encode(self, modality: str, pixels: Tensor, grid_thw: Tensor, blocks: dict, first: int):
        inner = self.model.model
        get = inner.get_image_features if modality == "image" else inner.get_video_features
        with self._capture({b for _, b in blocks.values()}) as got:
            out = get(pixels, grid_thw, return_dict=True)
        sig_all = {name: PACKED_VIT_SIGNALS[kind](self._block(b, *got[b], grid_thw))
                   for name, (kind, b) in blocks.items()}
        merge = self.config.vision_config.spatial_merge_size
        n_blocks = len(self.vit_layers())
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
                    source=j,
                    n_views=t,
                    modality=modality,
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
