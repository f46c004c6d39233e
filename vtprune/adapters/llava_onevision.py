"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, AnyRes-max images, pooled video.

What the model feeds its LLM (transformers' own code, never re-implemented here):

* an image alone in its sample: the base view (``s x s`` tokens, no newline), then the AnyRes crop
  canvas, unpadded and, when larger than ``anyres_max_N`` base views (ratio > 1.1), bilinearly
  resized down; one ``image_newline`` after each canvas row;
* an image in a sample with several images: its base view only, then one newline;
* a video: per frame the projected tokens bilinearly pooled to ``ceil(s/2)^2``, frames one after the
  other, then one newline for the whole video (separate ``<video>`` placeholders).

The native layout is recovered by running HF's own ``pack_image_features`` / ``apply_pooling`` on a
float64 *probe* whose channels are a marker (1 on tokens, 0 on newlines), the flat encoder index and
the requested scalar vision signals: a gathered token gets its patch's index and signals exactly; a
resized or pooled token gets the same bilinear mix of its patches' signals as its features got (and
no single source, ``source = -1``).

Layout handed to policies (one :class:`~vtprune.policy.ImageTokens` per image or video):

* image: ``view`` 0 = base view (``grid`` on ``s x s``), 1 = the AnyRes canvas (``grid`` on the
  canvas after unpadding/resizing, ``grid_shapes[1]``), -1 = newlines (never candidates);
* video: ``view`` = frame index, ``grid`` on the pooled frame grid, the trailing newline -1;
  ``modality = "video"``.

Positions: 1-D, as LLaVA (renumbered by default, ``positions="original"`` gathers the unpruned ones).
SigLIP has no CLS token: signals are per patch (``vit_received``, ``vit_keys``, ``vit_hidden``);
the CLS kinds of the registry (``vit_cls``, ``vit_cls_logits``) raise ``ValueError``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..policy import ImageTokens
from .base import Encoded
from .llava import LlavaAdapter

#: a canvas never resized: ``pack_image_features`` with this ``vision_aspect_ratio`` gives the unpadded canvas
_NO_RESIZE = "anyres_max_1000000"


class LlavaOnevisionAdapter(LlavaAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    default_positions = "renumber"
    image_input_keys = ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos", "image_sizes_videos")

    def nominal_visual_tokens(self) -> int | None:
        return None

    @property
    def video_token_id(self) -> int:
        return int(self.config.video_token_id)

    def visual_token_ids(self) -> dict[str, int]:
        return {"image": self.image_token_id, "video": self.video_token_id}

    def has_images(self, kwargs: dict[str, Any]) -> bool:
        return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None

    def _side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    # ------------------------------------------------------------ signals
    def _probe(self, view_sig: dict, views: slice, n_enc: int, off: int) -> tuple[Tensor, list[str]]:
        """(V, s*s, 2 + k) float64 probe of the encoder views ``views``: marker, flat index, k signals."""
        side = self._side()
        hw = side * side
        if n_enc - off != hw:
            raise ValueError(
                f"LLaVA-OneVision: the tower gives {n_enc - off} feature tokens per view, not {side}x{side}; "
                "only towers whose features are the full patch grid are supported"
            )
        names = [k for k, t in view_sig.items() if torch.is_tensor(t) and t.dim() == 2]
        n_views = views.stop - views.start
        idx = torch.arange(n_views * hw, dtype=torch.float64).view(n_views, hw, 1)
        chans = [torch.ones_like(idx), idx]
        chans += [view_sig[k][views, off : off + hw].detach().double().cpu()[..., None] for k in names]
        return torch.cat(chans, -1), names

    def _token_signals(self, view_sig: dict, names: list[str], packed: Tensor, views: slice, candidate: Tensor,
                       device) -> dict[str, Any]:
        """Per-token signals (probe channels 2..) plus the per-view and non-tensor signals."""
        sig: dict[str, Any] = {}
        for name, t in view_sig.items():
            if not torch.is_tensor(t):  # the projector function
                sig[name] = t
            elif t.dim() == 3:  # per-view tensors (V, N, C)
                sig[name] = t[views]
        for j, name in enumerate(names):
            vals = packed[:, 2 + j].where(candidate, torch.zeros((), dtype=packed.dtype))
            sig[name] = vals.to(device=view_sig[name].device, dtype=view_sig[name].dtype)
        return sig

    # ------------------------------------------------------------ encoding
    def encode(self, kwargs, signals, vision_policies, ctx) -> Encoded:
        if vision_policies:
            raise ValueError("stage-V (in-encoder) policies are supported on LLaVA-1.5 with CLIP only, "
                             "not LLaVA-OneVision; use a stage-P method")
        ins, outs = self._signal_layers(signals)
        vkw = self._vision_kwargs(kwargs)
        images, sched = [], []
        if kwargs.get("pixel_values") is not None:
            imgs, s = self._encode_images(kwargs, signals, vkw, ins, outs)
            images += imgs
            sched += s
        if kwargs.get("pixel_values_videos") is not None:
            vids, s = self._encode_videos(kwargs, signals, vkw, ins, outs, len(images))
            images += vids
            sched += s
        return Encoded(images, sched)

    def _encode_images(self, kwargs, signals, vkw, ins, outs):
        from transformers.models.llava_onevision import modeling_llava_onevision as mlo

        inner = self.model.model
        cfg = self.config
        pixel_values, image_sizes = kwargs["pixel_values"], kwargs["image_sizes"]
        batch_num_images = kwargs.get("batch_num_images")
        with self._capture(ins, outs) as got:  # exactly the call the model's forward makes
            out = inner.get_image_features(pixel_values, image_sizes, batch_num_images=batch_num_images,
                                           return_dict=True, **vkw)
        feats = list(out.pooler_output)
        view_sig = self._view_signals(signals, got)
        n_enc = out.last_hidden_state.shape[1]
        off = 1 if (vkw["vision_feature_select_strategy"] == "default") else 0
        side, n_layers = self._side(), len(self.vit_layers())
        hw = side * side
        if batch_num_images is None:
            single = [True] * len(image_sizes)
        else:
            single = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        images, sched, view0 = [], [], 0
        for i, f in enumerate(feats):
            n_views = mlo.image_size_to_num_patches(image_sizes[i], cfg.image_grid_pinpoints,
                                                    cfg.vision_config.image_size) if single[i] else 1
            views = slice(view0, view0 + n_views)
            probe, names = self._probe(view_sig, views, n_enc, off)
            newline = torch.zeros(probe.shape[-1], dtype=torch.float64)
            packed = inner.pack_image_features([probe], image_sizes[i : i + 1], image_newline=newline,
                                               vision_aspect_ratio=cfg.vision_aspect_ratio)[0][0]
            if packed.shape[0] != f.shape[0]:
                raise RuntimeError("LLaVA-OneVision layout recovery failed: feature count mismatch")
            is_tok = packed[:, 0] > 0.5
            n = packed.shape[0]
            view = torch.zeros(n, dtype=torch.long)
            grid = torch.full((n, 2), -1, dtype=torch.long)
            j = torch.arange(min(hw, n))
            grid[: j.numel()] = torch.stack([j // side, j % side], -1)
            shapes = [(side, side)]
            exact = torch.ones(n, dtype=torch.bool)
            if n_views > 1:
                rows = int((~is_tok[hw:]).sum())
                cols = (n - hw) // rows - 1
                k = torch.arange(n - hw)
                view[hw:] = 1
                grid[hw:] = torch.stack([k // (cols + 1), k % (cols + 1)], -1)
                shapes.append((rows, cols))
                # resized canvas (AnyRes-max): tokens mix patches, no single source
                full = inner.pack_image_features([probe[..., :1]], image_sizes[i : i + 1], image_newline=newline[:1],
                                                 vision_aspect_ratio=_NO_RESIZE)[0][0]
                if full.shape[0] != n:
                    exact[hw:] = False
            view[~is_tok] = -1
            grid[~is_tok] = -1
            source = torch.where(is_tok & exact, packed[:, 1].round().long(), -1)
            images.append(
                ImageTokens(
                    features=f,
                    candidate=is_tok,
                    view=view,
                    grid=grid,
                    grid_shapes=shapes,
                    signals=self._token_signals(view_sig, names, packed, views, is_tok, f.device),
                    image_index=i,
                    source=source,
                    n_views=n_views,
                    projector_tokens=n_views * (n_enc - off),
                )
            )
            sched.extend([[n_enc] * n_layers for _ in range(n_views)])
            view0 += n_views
        return images, sched

    def _encode_videos(self, kwargs, signals, vkw, ins, outs, first_index: int):
        inner = self.model.model
        videos = kwargs["pixel_values_videos"]
        n_vid, frames = videos.shape[:2]
        with self._capture(ins, outs) as got:
            out = inner.get_video_features(videos, return_dict=True, **vkw)
        pooled = out.pooler_output  # (n_vid, frames * pp + 1, D)
        view_sig = self._view_signals(signals, got)
        n_enc = out.last_hidden_state.shape[1]
        off = 1 if (vkw["vision_feature_select_strategy"] == "default") else 0
        n_layers = len(self.vit_layers())
        images, sched = [], []
        for b in range(n_vid):
            views = slice(b * frames, (b + 1) * frames)
            probe, names = self._probe(view_sig, views, n_enc, off)
            p = inner.apply_pooling(probe)  # the model's own per-frame pooling: (frames, pp, C)
            pp = p.shape[1]
            packed = torch.cat([p.reshape(frames * pp, -1), torch.zeros(1, p.shape[-1], dtype=p.dtype)])
            f = pooled[b]
            if packed.shape[0] != f.shape[0]:
                raise RuntimeError("LLaVA-OneVision video layout recovery failed: feature count mismatch")
            ph = pw = -(-self._side() // 2)
            n = packed.shape[0]
            k = torch.arange(n)
            is_tok = k < frames * pp
            view = torch.where(is_tok, k // pp, -1)
            grid = torch.stack([(k % pp) // pw, k % pw], -1)
            grid[~is_tok] = -1
            images.append(
                ImageTokens(
                    features=f,
                    candidate=is_tok,
                    view=view,
                    grid=grid,
                    grid_shapes=[(ph, pw)] * frames,
                    signals=self._token_signals(view_sig, names, packed, views, is_tok, f.device),
                    image_index=first_index + b,
                    source=torch.full((n,), -1, dtype=torch.long),
                    n_views=frames,
                    projector_tokens=frames * (n_enc - off),
                    modality="video",
                )
            )
            sched.extend([[n_enc] * n_layers for _ in range(frames)])
        return images, sched

    # ------------------------------------------------------------ inputs
    def encoder_output(self, modality, features):
        """Videos: the model scatters ``pooler_output.flatten(0, 1)``, so the kept tokens of all videos
        go in as one (1, n, D) tensor; images as the base class (a list)."""
        if modality == "video":
            return BaseModelOutputWithPooling(pooler_output=torch.cat(features)[None])
        return super().encoder_output(modality, features)
