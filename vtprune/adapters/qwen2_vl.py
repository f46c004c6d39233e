"""Qwen2-VL and Qwen2.5-VL (packed ViT with ``cu_seqlens``, 2x2 patch merger, M-RoPE).

Features are HF's own merged tokens (``get_image_features``, raster order per image). Positions are
always the original M-RoPE positions: computed by the model's own ``compute_3d_position_ids`` (or
taken from ``generate``'s precomputed 4-row ids) on the unpruned sequence, then gathered at the kept
columns; ``rope_deltas`` is set to ``max_kept_pos + 1 - L_kept`` so that decoding without explicit
positions continues at the unpruned numbering.

Vision signals (``vit_received@b``): the attention each merged token receives in block ``b``,
recomputed per attention segment (whole image in full-attention blocks, windows otherwise) from the
block's input with its own ``qkv`` projection and vision rotary function: head mean, sum over query
rows, mean over the 4 patches of each merge unit, un-permuted from window order to raster order.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from ..policy import ImageTokens
from ..signals import PACKED_VIT_SIGNALS, PackedViTBlock, parse_signal
from .base import Adapter, Encoded, ShortInputs


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    default_positions = "original"
    position_modes = ("original",)  # M-RoPE positions cannot be renumbered contiguously

    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

    def vit_layers(self) -> nn.ModuleList:
        """The vision blocks (signal layer indices refer to them)."""
        return self.visual.blocks

    def vit_blocks(self) -> nn.ModuleList:
        """Alias of :meth:`vit_layers` (Qwen calls them blocks)."""
        return self.vit_layers()

    def window_index(self, grid_thw: Tensor) -> Tensor | None:
        """Merge-unit permutation of the ViT (None: raster order, as in Qwen2-VL)."""
        return None

    def full_attention_blocks(self) -> list[int]:
        return list(range(len(self.vit_blocks())))

    # ------------------------------------------------------------ encoding
    @contextmanager
    def _capture(self, blocks: set[int]):
        """Capture the inputs of ``blocks`` and, for every block, the attention segments it used."""
        got: dict = {}
        handles = []
        for b in range(len(self.vit_blocks())):
            def hook(m, args, kwargs, b=b):
                got[("cu", b)] = kwargs["cu_seqlens"]
                if b in blocks:
                    x = args[0] if args else kwargs["hidden_states"]
                    got[b] = (x, kwargs)
            handles.append(self.vit_blocks()[b].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield got
        finally:
            for h in handles:
                h.remove()

    def _block(self, block: int, x: Tensor, kw: dict, grid_thw: Tensor) -> PackedViTBlock:
        """q/k of vision block ``block`` recomputed from its captured input with its own ``qkv``
        projection and vision rotary function, and its attention segments."""
        blk = self.vit_blocks()[block]
        attn = blk.attn
        h = blk.norm1(x)
        n = h.shape[0]
        qkv = attn.qkv(h).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        q, k = qkv[0], qkv[1]
        mod = sys.modules[type(attn).__module__]
        cos, sin = kw["position_embeddings"]
        q, k = mod.apply_rotary_pos_emb_vision(q, k, cos, sin)
        return PackedViTBlock(q=q, k=k, scale=attn.scaling, cu_seqlens=kw["cu_seqlens"].tolist(),
                              unit=self.config.vision_config.spatial_merge_size ** 2,
                              window_index=self.window_index(grid_thw))

    #: (modality, pixel key, grid key, inner-model feature function); images first, then videos
    MODALITIES = (("image", "pixel_values", "image_grid_thw", "get_image_features"),
                  ("video", "pixel_values_videos", "video_grid_thw", "get_video_features"))
    image_input_keys = ("pixel_values", "pixel_values_videos")

    def visual_token_ids(self) -> dict[str, int]:
        return {"image": int(self.config.image_token_id), "video": int(self.config.video_token_id)}

    def has_images(self, kwargs) -> bool:
        return any(kwargs.get(pix) is not None for _, pix, _, _ in self.MODALITIES)

    def encode(self, kwargs, signals, vision_policies, ctx) -> Encoded:
        """One ``ImageTokens`` per image, then one per video (request order within each modality).

        A video is one item (``modality="video"``) whose views are its temporal patches
        (``grid_shapes`` one per frame); its placeholders are the video token's.
        """
        if vision_policies:
            raise ValueError(
                f"stage-V (in-encoder) policies are not supported on {self.family} (packed ViT); "
                "use the stage-P variant of the method"
            )
        blocks: dict[str, tuple[str, int]] = {}
        for name in signals:
            kind, layer = parse_signal(name)
            if kind not in PACKED_VIT_SIGNALS:
                raise ValueError(
                    f"unknown Qwen vision signal {name!r}; supported: "
                    + ", ".join(f"{k}@BLOCK" for k in PACKED_VIT_SIGNALS)
                )
            blocks[name] = (kind, self.resolve_vit_layer(layer))
        images, sched = [], []
        for modality, pix_key, grid_key, fn in self.MODALITIES:
            if kwargs.get(pix_key) is None:
                continue
            items, s = self._encode_modality(modality, kwargs[pix_key], kwargs[grid_key], fn, blocks)
            for it in items:
                it.image_index = len(images)
                images.append(it)
            sched += s
        return Encoded(images, sched)

    def _item_extras(self, out, index: int) -> dict:
        """Adapter-private per-item data taken from the encoder output (Qwen3-VL: DeepStack rows)."""
        return {}

    def _encode_modality(self, modality: str, pixels: Tensor, grid_thw: Tensor, fn: str,
                         blocks: dict[str, tuple[str, int]]) -> tuple[list[ImageTokens], list[list[int]]]:
        """Items and per-item encoder schedule of one modality (the model's own feature function)."""
        with self._capture({b for _, b in blocks.values()}) as got:
            out = getattr(self.model.model, fn)(pixels, grid_thw, return_dict=True)
        feats = list(out.pooler_output)
        sig_all = {name: PACKED_VIT_SIGNALS[kind](self._block(b, *got[b], grid_thw))
                   for name, (kind, b) in blocks.items()}
        merge = self.config.vision_config.spatial_merge_size
        images, start = [], 0
        n_blocks = len(self.vit_blocks())
        sched = []
        cu = [got[("cu", b)].tolist() for b in range(n_blocks)]
        patch0 = 0
        for i, f in enumerate(feats):
            t, hh, ww = (int(v) for v in grid_thw[i])
            gh, gw = hh // merge, ww // merge
            n = f.shape[0]
            j = torch.arange(n)
            grid = torch.stack([(j % (gh * gw)) // gw, j % gw], -1)
            sig = {name: s[start : start + n] for name, s in sig_all.items()}
            # attention segments (whole frames or windows) each block used for this item's patches
            patch1 = patch0 + t * hh * ww
            windows = [[e - s for s, e in zip(c[:-1], c[1:]) if patch0 <= s < patch1 and e > s] for c in cu]
            images.append(
                ImageTokens(
                    features=f,
                    candidate=torch.ones(n, dtype=torch.bool),
                    view=j // (gh * gw),  # temporal slice (frame)
                    grid=grid,
                    grid_shapes=[(gh, gw)] * t,
                    signals=sig,
                    source=j,
                    vision_windows=windows,
                    modality=modality,
                    extra=self._item_extras(out, i),
                )
            )
            sched.append([t * hh * ww] * n_blocks)
            patch0 = patch1
            start += n
        return images, sched

    # ------------------------------------------------------------ positions and inputs
    def full_positions(self, kwargs, input_ids, mask):
        pos = kwargs.get("position_ids")
        if pos is not None:
            return pos
        inner = self.model.model
        saved = inner.rope_deltas
        inner.rope_deltas = None
        try:
            extra = {}
            if kwargs.get("second_per_grid_ts") is not None:  # Qwen2.5-VL video: seconds per temporal patch
                extra["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
            pos = inner.compute_3d_position_ids(
                input_ids=input_ids,
                inputs_embeds=torch.empty(*input_ids.shape, 0),
                image_grid_thw=kwargs.get("image_grid_thw"),
                video_grid_thw=kwargs.get("video_grid_thw"),
                attention_mask=kwargs.get("attention_mask"),
                cache=None,
                mm_token_type_ids=kwargs.get("mm_token_type_ids"),
                **extra,
            )
        finally:
            inner.rope_deltas = saved
        if pos is None:
            raise ValueError(
                "Qwen-VL inputs need `mm_token_type_ids` (returned by the processor) to compute M-RoPE "
                "positions; pass the processor's full output to the model"
            )
        return pos

    def renumber_positions(self, kwargs, new_mask):
        raise ValueError(
            "positions='renumber' is not defined for Qwen M-RoPE positions; use positions='original' (default)"
        )

    def build_inputs(self, kwargs, new: ShortInputs):
        out = super().build_inputs(kwargs, new)
        if kwargs.get("mm_token_type_ids") is not None:
            out["mm_token_type_ids"] = new.gather(kwargs["mm_token_type_ids"], 0)
        return out

    def sample_rotary(self, hidden, position_embeddings, position_ids, key_mask):
        """The layer's own M-RoPE tables: computed from the padding mask, already per sample."""
        return position_embeddings

    def decode_positions(self, pos: Tensor) -> Tensor:
        return pos[None].expand(3, -1, -1)

    def after_prefill(self, state) -> None:
        """``rope_deltas`` so that cache-length-based decode positions continue the unpruned numbering
        (``state``: the request's :class:`~vtprune.state.PrefillState`)."""
        pos = state.positions  # (3|4, B, L') kept positions
        mask = state.mask
        p3 = pos[-3:] if pos.dim() == 3 else pos
        masked = p3.masked_fill(~mask.bool()[None], -1)
        max_pos = masked.amax(dim=(0, 2))
        n_kept = mask.long().sum(-1)
        self.model.model.rope_deltas = (max_pos + 1 - n_kept).unsqueeze(1)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def window_index(self, grid_thw):
        from transformers.vision_utils import get_vision_window_index

        vc = self.config.vision_config
        widx, _ = get_vision_window_index(grid_thw, vc.spatial_merge_size, vc.window_size, vc.patch_size)
        return widx

    def full_attention_blocks(self) -> list[int]:
        return list(self.config.vision_config.fullatt_block_indexes)
