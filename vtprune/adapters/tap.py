"""Reversible attention taps: read a layer's own q / k (and softmax normalisers) while it runs.

transformers' attention modules look their attention function up as
``ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)``.
:func:`tap` gives one attention module a shallow copy of its config whose implementation is the
registered name ``"vtprune_tap"``; that function runs the module's original implementation unchanged
(same kernel, same output) and hands ``(module, q, k, lse)`` to the tap's callback: q (B, H, Lq, hd) and
k (B, Hkv, Lk, hd) exactly as the layer computed them (norms, rotary applied), and ``lse`` (B, H, Lq)
fp32 ``logsumexp`` of each softmax row when the CPU flash kernel (the one SDPA itself dispatches to)
returned it, else None. The model-level config (masks, cache) is untouched; :meth:`Tap.remove` puts
the module's own config back. Signals then need no second norm / projection / rotary pass.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable

import torch
from torch import Tensor, nn

TAP_NAME = "vtprune_tap"
_REGISTERED = False


class Tap:
    """One tapped attention module; ``callback(module, q, k, lse)`` runs after every attention call."""

    def __init__(self, module: nn.Module, callback: Callable, *, want_lse: bool = False):
        self.module = module
        self.callback = callback
        self.want_lse = want_lse
        self.config = module.config
        self.impl = self.config._attn_implementation
        if self.impl == TAP_NAME:
            raise ValueError(f"{type(module).__name__} is already tapped (a patch was not removed)")
        cfg = copy.copy(self.config)
        cfg.__dict__["_attn_implementation_internal"] = TAP_NAME  # this module only; no sub-config walk
        module.config = cfg
        module._vtprune_tap = self

    def remove(self) -> None:
        if getattr(self.module, "_vtprune_tap", None) is self:
            self.module.config = self.config
            del self.module._vtprune_tap


def can_tap(module: nn.Module) -> bool:
    """True for an attention module that dispatches through transformers' attention interface with
    the SDPA or eager implementation (others keep their kernels and the signals recompute)."""
    cfg = getattr(module, "config", None)
    return (cfg is not None and hasattr(module, "k_proj")
            and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager"))


def tap(module: nn.Module, callback: Callable, *, want_lse: bool = False) -> Tap:
    """Tap ``module`` (a transformers attention module with a ``config``); returns a removable handle."""
    _register()
    return Tap(module, callback, want_lse=want_lse)


def _original(module: nn.Module, impl: str | None) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl in (None, "eager"):
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__}: no eager_attention_forward next to it; use attn_implementation='sdpa'")
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _flash_with_lse(module, q, k, v, mask, kwargs) -> tuple[Tensor, Tensor] | None:
    """(output (B, L, H, hd), lse (B, H, L)) from the CPU flash kernel when SDPA would run that very
    kernel on these inputs (no mask, not causal, no dropout, equal heads); None otherwise."""
    if (q.device.type != "cpu" or mask is not None or kwargs.get("dropout", 0.0) or getattr(module, "is_causal", False)
            or kwargs.get("is_causal") or q.shape[1] != k.shape[1] or module.training):
        return None
    scale = kwargs.get("scaling")
    from torch.nn.attention import SDPBackend

    if torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale) != SDPBackend.FLASH_ATTENTION.value:
        return None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    return out.transpose(1, 2).contiguous(), lse


def _tap_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    t = getattr(module, "_vtprune_tap", None)
    if t is None:  # a copied config outlived its tap: cannot happen through Tap.remove()
        raise RuntimeError(f"{type(module).__name__} uses {TAP_NAME!r} but is not tapped")
    lse = None
    got = None
    if t.want_lse and t.impl == "sdpa":
        got = _flash_with_lse(module, query, key, value, attention_mask, kwargs)
    if got is not None:
        out, lse = got
        weights = None
    else:
        out, weights = _original(module, t.impl)(module, query, key, value, attention_mask, **kwargs)
    t.callback(module, query, key, lse)
    return out, weights


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(TAP_NAME, _tap_forward)
    _REGISTERED = True
