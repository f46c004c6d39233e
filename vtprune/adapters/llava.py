"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

Vision towers: CLIP, SigLIP and DINOv2 (any plain ViT whose layers have a first norm and q/k
projections). Features come from HF's own ``get_image_features`` (so keep-all is bit-identical);
vision signals read the requested encoder layers' own q/k (and, under SDPA on CPU, the flash
kernel's row logsumexp) through temporary attention taps (``adapters/tap.py``); a tower that cannot be
tapped has its q/k projections' outputs captured by forward hooks instead. LLaVA-NeXT's native layout (base view, unpadded crop grid, one
``image_newline`` per row) is recovered by running HF's own ``pack_image_features`` on index
features, so the adapter never re-implements the unpadding geometry.

Positions: the LLM gets a shorter sequence; LLaVA's reference convention renumbers contiguously,
``positions="original"`` gathers the unpruned positions instead.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from ..policy import ImageTokens, ViTInfo
from ..signals import VIT_SIGNALS, ViTLayer, parse_signal
from .base import Adapter, Encoded, vit_layer_parts, vit_qk
from .tap import can_tap, tap

# Not a tensor: the signal ``"projector"`` is a callable mapping vision hidden states (..., C) to LLM
# features (..., D) with the model's own ``multi_modal_projector`` (VisionZip projects merged and CLS
# tokens itself). Methods get the function, never the module. Every other signal is ``"kind@layer"``
# of the plain-ViT registry ``vtprune.signals.VIT_SIGNALS``.
PROJECTOR_SIGNAL = "projector"


class VisionRun(NamedTuple):
    """The vision side of a LLaVA-1.5 request (:meth:`LlavaAdapter.run_vision`).

    features: per image, (n, D) projected features. signals: per-view signal tensors on encoder
    tokens ((V, N) or (V, N, C)) and the projector function. sources: per image, (n,) encoder-token
    index of each feature (None: ``encode`` recovers the layout, LLaVA-NeXT). schedule: per view,
    the tokens entering each encoder layer.
    """

    features: list[Tensor]
    signals: dict[str, Any]
    sources: list[Tensor] | None
    schedule: list[list[int]]
    #: after an input-only policy shrank the image (``downsample``): (N,) native encoder index whose
    #: placeholder each encoder token of the run takes, and the native encoder tokens per view
    native_index: Tensor | None = None
    native_tokens: int | None = None


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    default_positions = "renumber"
    image_input_keys = ("pixel_values", "image_sizes")

    # ------------------------------------------------------------ vision structure
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def vit_layers(self) -> nn.ModuleList:
        tower = self.vision_tower
        inner = getattr(tower, "vision_model", tower)
        enc = inner.encoder
        return enc.layers if hasattr(enc, "layers") else enc.layer

    def vit_has_cls(self) -> bool:
        return self.config.vision_config.model_type != "siglip_vision_model"

    def feature_offset(self) -> int:
        """Encoder tokens dropped at the front of the features (1 = CLS dropped by 'default')."""
        strategy = self.config.vision_feature_select_strategy
        return 1 if (strategy == "default" and self.vit_has_cls()) else 0

    def nominal_visual_tokens(self) -> int | None:
        """Visual tokens per image, fixed by the config for CLIP/SigLIP towers. DINOv2 interpolates its
        position table to any resolution (the processor decides), so its count is known per request."""
        vc = self.config.vision_config
        if vc.model_type == "dinov2":
            return None
        side = vc.image_size // vc.patch_size
        return side * side + (1 if self.vit_has_cls() else 0) - self.feature_offset()

    #: vision towers whose encoder layers stage-V policies can run one by one (``config.model_type``)
    STAGE_V_TOWERS = ("clip_vision_model", "dinov2")

    def check_stage_v(self) -> None:
        kind = self.config.vision_config.model_type
        if kind not in self.STAGE_V_TOWERS:
            raise ValueError(
                f"stage-V (in-encoder) policies support {' and '.join(self.STAGE_V_TOWERS)} vision towers; "
                f"this model's tower is {kind!r} (use a stage-P method, e.g. 'pitome-p')"
            )

    def vit_embed(self, pixel_values: Tensor, interpolate: bool = False) -> Tensor:
        """(V, 3, H, W) pixels -> (V, N, C) the input of the first encoder layer, with the tower's own
        modules: CLIP ``pre_layrnorm(embeddings)`` (position table interpolated when ``interpolate``);
        DINOv2 ``embeddings`` (CLS token, position table interpolated to the actual grid). The layers'
        outputs are then ``hidden_states[l + 1]`` of the unpatched tower (no final norm), which is what
        the features are selected from."""
        self.check_stage_v()
        tower = self.vision_tower
        pixel_values = pixel_values.to(tower.dtype)
        if self.config.vision_config.model_type == "dinov2":
            return tower.embeddings(pixel_values)
        return tower.pre_layrnorm(tower.embeddings(pixel_values, interpolate_pos_encoding=interpolate))

    def _tower_kwargs(self, resized: bool) -> dict[str, Any]:
        """Extra tower kwargs for a resized input: CLIP / SigLIP interpolate their position table only
        when asked; DINOv2 always does (and takes no such argument)."""
        if resized and self.config.vision_config.model_type != "dinov2":
            return {"interpolate_pos_encoding": True}
        return {}

    def _resize_input(self, pixel_values: Tensor, policies, ctx) -> tuple[Tensor, Tensor | None, int | None]:
        """Apply the input-only stage-V policies (``downsample``) to (V, 3, H, W) pixels.

        Returns ``(pixels, native_index, native_tokens)``: the (possibly smaller) pixels; when resized,
        (N',) the native encoder index whose placeholder each encoder token of the smaller run takes
        (the policy's ``input_slots``; the CLS token keeps 0) and the native encoder tokens per view.
        """
        p = int(self.config.vision_config.patch_size)
        rows, cols = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
        grid, patches = (rows, cols), None  # patches: native raster index of each patch of ``grid``
        for pol in policies:
            new = pol.input_grid(*grid, ctx)
            if new is not None and tuple(new) != grid:
                pixel_values = pol.resize(pixel_values, (new[0] * p, new[1] * p))
                slots = pol.input_slots(*grid, tuple(new)).long()
                patches = slots if patches is None else patches[slots]
                grid = tuple(new)
        if patches is None:
            return pixel_values, None, None
        cls = 1 if self.vit_has_cls() else 0
        native = torch.cat([torch.zeros(cls, dtype=torch.long), patches + cls]).to(pixel_values.device)
        return pixel_values, native, rows * cols + cls

    def project(self, hidden: Tensor) -> Tensor:
        """The model's ``multi_modal_projector`` applied to vision hidden states (..., C) -> (..., D)."""
        return self.model.model.multi_modal_projector(hidden)

    # ------------------------------------------------------------ encoding
    @contextmanager
    def _capture(self, layers: set[int], outputs: set[int]):
        """Capture inputs of ``layers`` and outputs of ``outputs`` (0-based vision layers)."""
        got: dict[tuple[str, int], Tensor] = {}
        handles = []
        vit = self.vit_layers()
        for l in layers:
            handles.append(vit[l].register_forward_pre_hook(lambda m, a, l=l: got.__setitem__(("in", l), a[0])))
            # the layer's own q/k (and, under the CPU flash kernel, its rows' logsumexp), reused by the signals
            _, attn, _, _ = vit_layer_parts(vit[l])
            if can_tap(attn):
                handles.append(tap(attn, lambda m, q, k, lse, l=l: got.update({("q", l): q, ("k", l): k, ("lse", l): lse}),
                                   want_lse=True))
                continue
            for kind in ("q", "k"):
                proj = getattr(attn, f"{kind}_proj")
                handles.append(proj.register_forward_hook(
                    lambda m, a, out, l=l, kind=kind: got.__setitem__((kind, l), out)))
        for l in outputs:
            def hook(m, a, out, l=l):
                got[("out", l)] = out[0] if isinstance(out, tuple) else out
            handles.append(vit[l].register_forward_hook(hook))
        try:
            yield got
        finally:
            for h in handles:
                h.remove()

    def _vision_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        layer = kwargs.get("vision_feature_layer")
        strategy = kwargs.get("vision_feature_select_strategy")
        return {
            "vision_feature_layer": cfg.vision_feature_layer if layer is None else layer,
            "vision_feature_select_strategy": cfg.vision_feature_select_strategy if strategy is None else strategy,
        }

    def _signal_layers(self, signals) -> tuple[set[int], set[int]]:
        """Vision layers whose q/k (``ins``) and outputs (``outs``) the requested signals read."""
        ins, outs = set(), set()
        for name in signals:
            if name == PROJECTOR_SIGNAL:
                continue
            kind, layer = parse_signal(name)
            if kind not in VIT_SIGNALS:
                raise ValueError(f"unknown vision signal {name!r}; kinds: {', '.join(VIT_SIGNALS)}")
            if VIT_SIGNALS[kind].needs_cls and not self.vit_has_cls():
                raise ValueError(
                    f"signal {name!r} needs a CLS token; this model's {self.config.vision_config.model_type!r} tower "
                    "has none (use the per-patch 'vit_received')"
                )
            layer = self.resolve_vit_layer(layer)
            (outs if VIT_SIGNALS[kind].reads == "output" else ins).add(layer)
        return ins, outs

    @staticmethod
    def _layer_qk(layer: nn.Module, idx: int, got: dict) -> tuple[Tensor, Tensor, float]:
        """q, k (V, H, N, hd) of vision layer ``idx``: the projections captured during the tower's own
        forward when available (no extra matmuls), else recomputed from the captured layer input."""
        if ("q", idx) in got and ("k", idx) in got:
            _, _, heads, scale = vit_layer_parts(layer)
            q, k = got[("q", idx)], got[("k", idx)]
            if q.dim() == 4:  # from the tap: (V, H, N, hd) already
                return q, k, scale
            v, n, _ = q.shape
            return q.view(v, n, heads, -1).transpose(1, 2), k.view(v, n, heads, -1).transpose(1, 2), scale
        return vit_qk(layer, got[("in", idx)])

    def _view_signals(self, signals, got) -> dict[str, Any]:
        """Per-view signal tensors, indexed on encoder tokens: (V, N) or (V, N, C)."""
        vit = self.vit_layers()
        out = {}
        for name in signals:
            if name == PROJECTOR_SIGNAL:
                out[name] = self.project
                continue
            kind, layer = parse_signal(name)
            layer = self.resolve_vit_layer(layer)
            view = ViTLayer(index=layer, output=got.get(("out", layer)),
                            qk=lambda l=layer: self._layer_qk(vit[l], l, got), lse=got.get(("lse", layer)))
            out[name] = VIT_SIGNALS[kind].fn(view)
        return out

    def run_vision(self, kwargs: dict[str, Any], signals, vision_policies, ctx) -> VisionRun:
        """Run the tower (with stage-V policies, layer by layer) and the projector."""
        ins, outs = self._signal_layers(signals)
        pixel_values = kwargs["pixel_values"]
        vkw = self._vision_kwargs(kwargs)
        pixel_values, native, n_native = self._resize_input(
            pixel_values, [p for p in vision_policies if p.input_only], ctx)
        resized = native is not None
        if any(not p.input_only for p in vision_policies):
            run = self._run_vision_stage_v(pixel_values, vkw, signals, vision_policies, ctx, ins, outs, resized)
            return run._replace(native_index=native, native_tokens=n_native)
        with self._capture(ins, outs) as got:
            out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **vkw,
                                                      **self._tower_kwargs(resized))
        feats = list(out.pooler_output)
        n_enc = out.last_hidden_state.shape[1]
        view_sig = self._view_signals(signals, got)
        n_layers = len(self.vit_layers())
        sched = [[n_enc] * n_layers for _ in range(pixel_values.shape[0])]
        sources = [torch.arange(f.shape[0]) + self.feature_offset() for f in feats]
        return VisionRun(feats, view_sig, sources, sched, native, n_native)

    def _run_vision_stage_v(self, pixel_values, vkw, signals, policies, ctx, ins, outs, resized=False) -> VisionRun:
        """Stage V: run the encoder layer by layer, letting policies shrink the sequence."""
        if not isinstance(vkw["vision_feature_layer"], int):
            raise ValueError("stage-V policies need a single integer vision_feature_layer")
        vit = self.vit_layers()
        feat_layer = self.resolve_vit_layer(vkw["vision_feature_layer"])
        x = self.vit_embed(pixel_values, interpolate=resized)
        v, n, _ = x.shape
        src = torch.arange(n, device=x.device)[None].expand(v, -1)
        got: dict[tuple[str, int], Tensor] = {}
        sched = [[] for _ in range(v)]
        # what a stage-V policy may plan with: tower depth, last layer run, tokens in, CLS dropped after
        ctx.vit = ViTInfo(layers=len(vit), last_layer=feat_layer, tokens=n,
                          drop_cls=vkw["vision_feature_select_strategy"] == "default")
        for l in range(feat_layer + 1):
            if l in ins:
                got[("in", l)] = x
            for i in range(v):
                sched[i].append(x.shape[1])
            log_size = ctx.attn_log_size  # proportional attention of a merging policy
            bias = None if log_size is None else log_size.to(x.dtype)[:, None, None, :]
            x = vit[l](x, attention_mask=bias)
            x = x[0] if isinstance(x, tuple) else x
            x, src, _ = self.run_vision_policies(l, len(vit), x, src, policies, ctx)
            if l in outs:
                got[("out", l)] = x
        if ins - set(range(feat_layer + 1)) or outs - set(range(feat_layer + 1)):
            raise ValueError("with a stage-V policy, vision signals must come from layers <= the feature layer")
        strategy = vkw["vision_feature_select_strategy"]
        if strategy == "default":
            x, src = x[:, 1:], src[:, 1:]
        feats = self.model.model.multi_modal_projector(x)
        return VisionRun(list(feats), self._view_signals(signals, got), list(src), sched)

    def encode(self, kwargs, signals, vision_policies, ctx) -> Encoded:
        run = self.run_vision(kwargs, signals, vision_policies, ctx)
        feats, view_sig, sources, sched = run[:4]
        images = []
        for i, (f, src) in enumerate(zip(feats, sources)):
            cls = 1 if self.vit_has_cls() else 0
            n_tok = f.shape[0]
            side = self._grid_side(sched[i][0] - cls)
            patch = src - cls
            grid = torch.stack([patch // side, patch % side], -1)
            grid[patch < 0] = -1
            sig = {}
            for name, t in view_sig.items():
                if not torch.is_tensor(t):  # the projector function
                    sig[name] = t
                    continue
                sig[name] = t[i] if t.dim() == 3 else t[i][src.to(t.device)]
            slots, n_slots = None, None
            if vision_policies:  # the sequence shrank in (or before) the encoder: tokens fill some placeholders
                native = src if run.native_index is None else run.native_index[src.to(run.native_index.device)]
                slots = (native - self.feature_offset()).cpu()  # the representative's placeholder
                if torch.unique(slots).numel() != slots.numel() or bool((slots < 0).any()):
                    raise RuntimeError("a stage-V policy gave two output tokens the same representative source")
                n_slots = self.nominal_visual_tokens()
                if n_slots is None:  # DINOv2: the grid the processor chose (before any downsampling)
                    n_slots = (run.native_tokens or sched[i][0]) - self.feature_offset()
            images.append(
                ImageTokens(
                    features=f,
                    candidate=torch.ones(n_tok, dtype=torch.bool),
                    view=torch.zeros(n_tok, dtype=torch.long),
                    grid=grid.cpu(),
                    grid_shapes=[(side, side)],
                    signals=sig,
                    image_index=i,
                    source=src.cpu(),
                    placeholder_index=slots,
                    n_placeholders=n_slots,
                )
            )
        return Encoded(images, sched)

    @staticmethod
    def _grid_side(n_patches: int) -> int:
        """Side of the square patch grid of a view that entered the encoder with ``n_patches`` patches
        (the actual resolution: DINOv2 runs at whatever size the processor chose)."""
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ValueError(f"the vision tower produced {n_patches} patch tokens, not a square grid")
        return side

    # ------------------------------------------------------------ positions and inputs
    def full_positions(self, kwargs, input_ids, mask):
        pos = kwargs.get("position_ids")
        if pos is not None:
            return pos
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)

    def renumber_positions(self, kwargs, new_mask: Tensor) -> Tensor | None:
        if kwargs.get("position_ids") is None:
            return None  # the model numbers the shortened sequence itself (arange)
        pos = new_mask.long().cumsum(-1) - 1
        return pos.masked_fill(new_mask == 0, 0)


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)

    def nominal_visual_tokens(self) -> int | None:
        return None

    def run_vision(self, kwargs, signals, vision_policies, ctx) -> VisionRun:
        """Every view (base + crops) through the tower; ``sources`` is None (``encode`` recovers the
        native layout), the schedule has one entry per view."""
        if vision_policies:
            raise ValueError("stage-V (in-encoder) policies are supported on LLaVA-1.5 only, not LLaVA-NeXT")
        ins, outs = self._signal_layers(signals)
        vkw = self._vision_kwargs(kwargs)
        pixel_values, image_sizes = kwargs["pixel_values"], kwargs["image_sizes"]
        with self._capture(ins, outs) as got:
            out = self.model.model.get_image_features(
                pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True, **vkw
            )
        view_sig = self._view_signals(signals, got)
        n_views, n_enc = out.last_hidden_state.shape[:2]
        sched = [[n_enc] * len(self.vit_layers()) for _ in range(n_views)]
        return VisionRun(list(out.pooler_output), view_sig, None, sched)

    def encode(self, kwargs, signals, vision_policies, ctx) -> Encoded:
        from transformers.models.llava_next import modeling_llava_next as mln

        feats, view_sig, _, enc_sched = self.run_vision(kwargs, signals, vision_policies, ctx)[:4]
        image_sizes, vkw = kwargs["image_sizes"], self._vision_kwargs(kwargs)
        n_enc = enc_sched[0][0]
        cfg = self.config
        off = 1 if vkw["vision_feature_select_strategy"] == "default" else 0
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        hw = side * side
        images, view0 = [], 0
        for i, f in enumerate(feats):
            n_views = mln.image_size_to_num_patches(
                image_size=image_sizes[i], grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size
            )
            # HF's own packing applied to index features gives the native layout
            idx = torch.arange(n_views * hw, dtype=torch.float32).view(n_views, hw, 1) + 1.0
            packed, _ = self.model.model.pack_image_features(
                [idx], image_sizes[i : i + 1], vkw["vision_feature_select_strategy"], image_newline=torch.zeros(1)
            )
            flat = packed[0][:, 0].round().long() - 1  # -1 marks newline tokens
            if flat.numel() != f.shape[0]:
                raise RuntimeError("LLaVA-NeXT layout recovery failed: feature count mismatch")
            is_nl = flat < 0
            view = torch.where(is_nl, -1, flat // hw)
            patch = torch.where(is_nl, 0, flat % hw)
            nph, npw = (1, 1)
            if n_views > 1:
                nph, npw = mln.get_anyres_image_grid_shape(
                    image_sizes[i].tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size
                )
            crop = (view - 1).clamp(min=0)
            row = torch.where(view == 0, patch // side, (crop // npw) * side + patch // side)
            col = torch.where(view == 0, patch % side, (crop % npw) * side + patch % side)
            grid = torch.stack([row, col], -1)
            grid[is_nl] = -1
            enc_src = (view0 + view.clamp(min=0)) * n_enc + patch + off  # flat index into (views, n_enc)
            sig = {}
            for name, t in view_sig.items():
                if not torch.is_tensor(t):  # the projector function
                    sig[name] = t
                elif t.dim() == 3:
                    sig[name] = t[view0 : view0 + n_views]
                else:
                    vals = t.reshape(-1)[enc_src.to(t.device)]
                    sig[name] = torch.where(is_nl.to(vals.device), torch.zeros_like(vals), vals)
            shapes = [(side, side)] + ([(nph * side, npw * side)] if n_views > 1 else [])
            images.append(
                ImageTokens(
                    features=f,
                    candidate=~is_nl,
                    view=view,
                    grid=grid,
                    grid_shapes=shapes,
                    signals=sig,
                    image_index=i,
                    source=torch.where(is_nl, -1, flat),
                    n_views=n_views,
                    projector_tokens=n_views * (n_enc - off),
                )
            )
            view0 += n_views
        if view0 != len(enc_sched):
            raise RuntimeError("LLaVA-NeXT layout recovery failed: view count mismatch")
        return Encoded(images, enc_sched)
