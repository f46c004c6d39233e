"""Plain ViTs outside a VLM: open_clip ``VisionTransformer`` (stage-V in-encoder merging).

``vtprune.patch(open_clip_model.visual, "pitome", ratio=0.95)`` runs the tower's residual blocks as
usual and lets the stage-V policies shrink the token sequence after each block (no open_clip code is
copied or replaced). The patch's model-level hook sees no images here (``has_images`` is False), so
the VLM prefill path never runs; this adapter's own hooks do the work. They are installed and removed
together with the patch (through the decoder controller's ``install_hooks`` seam):

* a forward pre-hook on the visual module starts a request: a fresh :class:`~vtprune.policy.Context`
  (family ``"clip_vit"``, the patch's seed) whose ``vit`` gives the tower depth, the last block, the
  token count (CLS included) and ``drop_cls`` (the output tokens exclude the CLS token);
* a forward pre-hook on every block adds the proportional-attention bias ``log(size)`` over the keys
  when a policy published it (``ctx.attn_log_size``; ``nn.MultiheadAttention`` blocks only);
* a forward hook on every block hands its output ``(B, N, C)`` to the policies' ``after_layer`` and
  returns the shortened tokens, tracking each token's representative (original token index);
* after the last block the tokens are sorted by their representative's original index (unless the
  policy declares its own order, ``sorted_output = False``, e.g. PiToMe ``order="reference"``), as the LLaVA
  path does when it places stage-V tokens at their placeholders (the CLS token stays first);
* a forward hook on the visual module records the per-block token counts in the patch's
  ``stats.vision_tokens_per_layer`` and ends the request.

Pooling then runs on the merged tokens (``pool_type="tok"``: the CLS token; ``"avg"``: the mean of the
merged patch tokens). ``forward_intermediates`` is not patched (no request is started there).
Only stage-V policies that support the ``"clip_vit"`` family apply (PiToMe, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..policy import Context, ViTInfo, VisionPolicy
from ..rows import take_rows
from .base import Adapter


@dataclass
class _ViTRequest:
    """One forward of the tower: its Context, the policies, each token's source, the schedule."""

    ctx: Context
    policies: list[VisionPolicy]
    src: Tensor | None = None  # (B, N) original index of each token's representative
    sched: list[int] = field(default_factory=list)  # tokens entering each block


def is_open_clip_vit(model: Any) -> bool:
    cls = type(model)
    return cls.__name__ == "VisionTransformer" and cls.__module__.startswith("open_clip")


class OpenClipViTAdapter(Adapter):
    family = "clip_vit"
    model_types = ()
    default_positions = "original"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = None
        self._req: _ViTRequest | None = None

    # ---------------------------------------------------------------- structure
    @property
    def language_model(self):
        return SimpleNamespace(config=None)  # no LLM: the decoder controller installs no layer hooks

    def llm_layers(self) -> nn.ModuleList:
        return nn.ModuleList()

    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    def vit_layers(self) -> nn.ModuleList:
        return self.blocks()

    @property
    def image_token_id(self) -> int:
        return -1

    def has_images(self, kwargs: dict[str, Any]) -> bool:
        return False  # the VLM prefill path of the patch never runs on a plain ViT

    def _patch(self):
        return getattr(self.model, "_vtprune_patch", None)

    # ---------------------------------------------------------------- hooks
    def install_hooks(self, state) -> list:
        handles = [
            self.model.register_forward_pre_hook(self._start),
            self.model.register_forward_hook(self._finish),
        ]
        for l, block in enumerate(self.blocks()):
            handles.append(block.register_forward_pre_hook(lambda m, a, k, l=l: self._bias(l, m, a, k), with_kwargs=True))
            handles.append(block.register_forward_hook(lambda m, a, out, l=l: self._after(l, out)))
        return handles

    def _start(self, module, args):
        patch = self._patch()
        policies = patch.vision_policies if patch is not None else []
        if not policies:
            self._req = None
            return None
        n_blocks = len(self.blocks())
        gh, gw = self.model.grid_size
        ctx = patch.new_context()
        ctx.vit = ViTInfo(layers=n_blocks, last_layer=n_blocks - 1, tokens=gh * gw + 1, drop_cls=True)
        self._req = _ViTRequest(ctx, policies)
        return None

    def _bias(self, layer: int, module, args, kwargs):
        req = self._req
        if req is None:
            return None
        x = args[0] if args else kwargs.get("q_x", kwargs.get("x"))
        n = x.shape[1] if self.model.transformer.batch_first else x.shape[0]
        req.sched.append(n)
        log_size = req.ctx.attn_log_size
        if log_size is None:
            return None
        attn = getattr(module, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention):
            raise ValueError("prop_attn on open_clip needs blocks with nn.MultiheadAttention (ResidualAttentionBlock)")
        b = log_size.shape[0]
        bias = log_size.to(x.dtype)[:, None, None, :].expand(b, attn.num_heads, n, n).reshape(b * attn.num_heads, n, n)
        kwargs = dict(kwargs)
        kwargs["attn_mask"] = bias
        return args, kwargs

    def _after(self, layer: int, out: Tensor):
        req = self._req
        if req is None:
            return None
        batch_first = self.model.transformer.batch_first
        x = out if batch_first else out.transpose(0, 1)
        if req.src is None:
            req.src = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        x, req.src, changed = self.run_vision_policies(layer, len(self.blocks()), x, req.src, req.policies, req.ctx)
        keep_order = not all(p.sorted_output for p in req.policies)
        if layer == len(self.blocks()) - 1 and not keep_order:
            perm = torch.argsort(req.src, dim=1, stable=True)  # CLS (source 0) stays first
            if not torch.equal(perm, torch.arange(perm.shape[1], device=perm.device).expand_as(perm)):
                x = take_rows(x, perm, 1)
                req.src = torch.gather(req.src, 1, perm)
                changed = True
        if not changed:
            return None
        return x if batch_first else x.transpose(0, 1)

    def _finish(self, module, args, output):
        req, self._req = self._req, None
        patch = self._patch()
        if req is not None and patch is not None:
            b = int(req.src.shape[0]) if req.src is not None else 0
            patch.stats.vision_tokens_per_layer = [list(req.sched) for _ in range(b)]
            patch.stats.visual_tokens_per_image = [int(req.src.shape[1]) - 1] * b if b else []
        return None
