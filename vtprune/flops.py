"""Analytic FLOPs / KV-cache model of one request (overview: ``docs/architecture.md`` §9).

:func:`count_flops` turns a model config and the :class:`~vtprune.schedule.TokenSchedule` that actually
ran into a :class:`FlopsReport`. Every figure is per sample; ``1 TFLOPs = 1e12 FLOPs``.

Conventions (the report's ``convention`` string names the primary one):

* **Primary LLM prefill**: ``2 x MACs`` of all decoder-layer matmuls. For layer ``l`` with
  ``n_l`` tokens, hidden ``d``, ``d_q = heads*head_dim``, ``d_kv = kv_heads*head_dim``, FFN width ``m``::

      MAC_l = n_l*d*(d_q + 2*d_kv) + n_l*d_q*d + 2*n_l**2*d_q + 3*n_l*d*m

  (exact GQA projections, full-square attention, 3-matrix SwiGLU). Excluded: LM head (reported
  separately), embeddings, norms, RoPE, softmax, biases, selection overhead. Sliding-window layers are
  still counted as full squares (the convention does not follow kernels or masks).
* **fastv_ratio** (§3a): ``sum_l f(n_l) / (L*f(n_0))`` with ``f(n) = 4nd^2 + 2n^2 d + 2ndm`` (MHA form,
  2-matrix FFN, config d and m even for GQA); ``n_0`` is the unpruned prompt length.
* **pdrop_visual_mac** (§3b): MACs (not x2) ``sum_l 4nd^2 + 2n^2 d + 3ndm`` with ``n`` = visual tokens of
  layer l only. **llmviewer_visual** = 2 x pdrop_visual_mac.
* **Vision encoder** (§4): 2 x MACs of the encoder layers that ran (``vision_tokens_per_layer``) plus the
  patch embedding. CLIP/SigLIP/DINOv2: ``4NC^2 + 2N^2C + 2NC*m_v`` per layer (3-matrix MLP for DINOv2
  ``use_swiglu_ffn``; SigLIP's attention-pooling head when ``vision_use_head``). Qwen2-VL: same with
  full attention per view (a view is one image frame). Qwen2.5-VL: SwiGLU MLP ``3PC*m_v`` and attention
  ``sum_segments 2 s^2 C`` over ``schedule.vision_windows`` (else full attention per view); segment
  lengths given for Qwen2-VL are used the same way.
* **Projector** (§4): LLaVA 2-layer MLP on ``projector_tokens``; Qwen merger
  ``(4C*4C + 4C*d_out)`` per merged token (``projector_tokens`` = merger outputs).
* **Decode** (§5): one new token at decode step ``j >= 1`` sees a cache of ``c_l = n_l + j`` tokens
  (including itself): ``MAC_l = d(d_q+2d_kv) + d_q d + 2 c_l d_q + 3dm``; LM head ``2dV`` separate.
  ``generate`` producing ``T = new_tokens`` tokens runs ``T-1`` decode steps (the first token comes from
  prefill); the mean is over those steps (the first step when ``T <= 1``).
* **KV cache** (§5): ``sum_l 2*c_l*kv_heads*head_dim*dtype_bytes``; end of prefill ``c_l = n_l``, end of
  generation ``c_l = n_l + max(T-1, 0)`` (the last generated token is never fed back).

Qwen3 families (same conventions, layer by layer):

* **Qwen3-VL / Qwen3.5 attention**: Qwen3.5's ``q_proj`` also emits the output gate
  (``n*d*(2*d_q + 2*d_kv)``); q/k norms and the partial rotary are not matmuls.
* **MoE FFN** (``*_moe``): router ``n*d*E`` + ``top_k`` experts ``3*d*m_moe`` per token (+ Qwen3.5-MoE's
  shared expert ``3*d*m_shared`` and its gate ``d``); Qwen3-VL-MoE's ``mlp_only_layers`` are dense.
* **Gated DeltaNet layers** (Qwen3.5 ``linear_attention``), as transformers runs them at prefill:
  projections ``n*d*(2*d_k + 2*d_v + 2*H_v) + n*d_v*d`` (qkv, z, a, b, out), the depthwise causal
  convolution ``conv_dim*k*(n + k - 1)``, and the chunked gated delta rule with chunk ``C = 64`` on the
  sequence padded to a multiple of ``C``, per value head and chunk ``2*C^2*d_hk + C^2*d_hv +
  3*C*d_hk*d_hv`` (UT system, intra-chunk q.k, intra-chunk output, state read/write) plus the two
  unit-triangular solves ``C*(C-1)/2*(d_hk + d_hv)``. No key/value cache: decode costs the projections,
  ``conv_dim*k`` and the recurrent step ``3*d_hk*d_hv`` per value head, and the layer's state
  (``conv_dim*k + H_v*d_hk*d_hv`` elements, constant) is counted in the KV bytes.
* **Vision** (Qwen3-VL / Qwen3.5): Qwen2-VL-style blocks with a 2-matrix MLP, full attention per frame;
  **projector**: the merger plus Qwen3-VL's DeepStack mergers (same shape), on every merged token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from .schedule import TokenSchedule

__all__ = [
    "CONVENTION",
    "FlopsReport",
    "LLMDims",
    "count_flops",
    "llm_dims",
    "nominal_schedule",
    "prune_schedule",
    "qwen_vision_segments",
]

CONVENTION = (
    "vtprune-flops-v1 (FLOPS.md §2): 2xMACs of decoder-layer matmuls, exact GQA projection shapes, "
    "3-matrix SwiGLU, full-square attention, per-layer tokens actually present; LM head, embeddings, "
    "norms, RoPE, softmax, biases and selection overhead excluded; vision/projector separate (§4); "
    "decode per token at actual cache lengths, LM head separate (§5)"
)

_LLAVA_TYPES = ("llava", "llava_next", "llava_onevision")
_QWEN3_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
_QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision1_5") + _QWEN3_TYPES
GDN_CHUNK = 64  # chunk of transformers' (and FLA's) chunked gated delta rule


# ----------------------------------------------------------------------------------------- config access
@dataclass(frozen=True)
class LLMDims:
    """Decoder constants read from a text config.

    ``d`` hidden, ``d_q = heads*head_dim``, ``d_kv = kv_heads*head_dim``, ``m`` FFN width, ``vocab``.
    """

    layers: int
    d: int
    heads: int
    kv_heads: int
    head_dim: int
    m: int
    vocab: int

    @property
    def d_q(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim


def _config_of(model_or_config: Any) -> Any:
    """A model's ``.config`` (anything with ``parameters`` and ``config``), else the object itself."""
    if hasattr(model_or_config, "parameters") and hasattr(model_or_config, "config"):
        return model_or_config.config
    return model_or_config


def _text_config(config: Any) -> Any:
    tc = getattr(config, "text_config", None)
    return tc if tc is not None else config


def llm_dims(model_or_config: Any) -> LLMDims:
    """Decoder constants of a model / VLM config / bare text config (llama, qwen2, ...)."""
    tc = _text_config(_config_of(model_or_config))
    heads = int(tc.num_attention_heads)
    kv = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return LLMDims(
        layers=int(tc.num_hidden_layers),
        d=int(tc.hidden_size),
        heads=heads,
        kv_heads=int(kv),
        head_dim=int(head_dim),
        m=int(tc.intermediate_size),
        vocab=int(tc.vocab_size),
    )


# ------------------------------------------------------------------------------------------------ report
@dataclass
class FlopsReport:
    """FLOPs / KV figures of one sample. Raw counts (FLOPs, MACs, bytes); ``as_dict`` scales them.

    Attributes:
        llm_prefill_flops: primary figure, 2 x MACs summed over decoder layers (module docstring).
        llm_prefill_per_layer: the same per decoder layer (len = num layers).
        fastv_ratio: FastV Eq. 5 MAC ratio vs the unpruned schedule (§3a).
        pdrop_visual_mac: PyramidDrop/TransPrune convention, MACs of visual tokens only (§3b).
        llmviewer_visual: GlobalCom²/LLM-Viewer convention, 2 x pdrop_visual_mac (§3b).
        vision_flops: vision encoder, all views, layers that ran + patch embedding (§4).
        projector_flops: LLaVA projector / Qwen merger (§4).
        decode_flops_first: first decode step, per new token, LM head excluded (§5).
        decode_flops_mean: mean over the ``new_tokens - 1`` decode steps (= first when <= 1).
        lm_head_flops_per_token: ``2*d*V`` per position whose logits are computed.
        lm_head_prefill_flops: LM head at prefill (``lm_head_positions`` positions); not in the primary.
        kv_bytes_prefill: KV cache at the end of prefill.
        kv_bytes_end: KV cache at the end of generation (``n_l + max(new_tokens - 1, 0)`` per layer).
        eq_visual_tokens: ``sum_l n_vis,l / L``.
        convention: names the definitions above.
    """

    llm_prefill_flops: float
    llm_prefill_per_layer: list[float]
    fastv_ratio: float
    pdrop_visual_mac: float
    llmviewer_visual: float
    vision_flops: float
    projector_flops: float
    decode_flops_first: float
    decode_flops_mean: float
    lm_head_flops_per_token: float
    lm_head_prefill_flops: float
    kv_bytes_prefill: float
    kv_bytes_end: float
    eq_visual_tokens: float
    convention: str = CONVENTION

    @property
    def total_prefill_flops(self) -> float:
        """Vision + projector + LLM prefill (primary), LM head and selection overhead excluded."""
        return self.vision_flops + self.projector_flops + self.llm_prefill_flops

    def as_dict(self) -> dict[str, Any]:
        """Flat record with the harness's names (TFLOPs, GFLOPs, MiB) plus ``convention``."""
        return {
            "llm_prefill_tflops": self.llm_prefill_flops / 1e12,
            "llm_prefill_gflops_per_layer": [x / 1e9 for x in self.llm_prefill_per_layer],
            "fastv_ratio": self.fastv_ratio,
            "paper_tflops": {
                "pdrop_visual_mac": self.pdrop_visual_mac / 1e12,
                "llmviewer_visual": self.llmviewer_visual / 1e12,
            },
            "vision_tflops": self.vision_flops / 1e12,
            "projector_tflops": self.projector_flops / 1e12,
            "total_prefill_tflops": self.total_prefill_flops / 1e12,
            "decode_gflops_per_token": self.decode_flops_first / 1e9,
            "decode_gflops_per_token_mean": self.decode_flops_mean / 1e9,
            "lm_head_gflops_per_token": self.lm_head_flops_per_token / 1e9,
            "lm_head_prefill_gflops": self.lm_head_prefill_flops / 1e9,
            "kv_mib": self.kv_bytes_prefill / 2**20,
            "kv_mib_end": self.kv_bytes_end / 2**20,
            "eq_visual_tokens": self.eq_visual_tokens,
            "convention": self.convention,
        }


# -------------------------------------------------------------------------------------------------- LLM
def _layer_types(tc: Any) -> list[str]:
    """Per decoder layer ``"full_attention"`` or ``"linear_attention"`` (Gated DeltaNet)."""
    types = getattr(tc, "layer_types", None)
    n = int(tc.num_hidden_layers)
    return ["linear_attention" if t == "linear_attention" else "full_attention" for t in types] if types else \
        ["full_attention"] * n


def _ffn_mac_per_token(tc: Any, dims: LLMDims, layer: int) -> int:
    """FFN MACs of one token in decoder layer ``layer`` (dense SwiGLU or the routed MoE block)."""
    experts = int(getattr(tc, "num_experts", 0) or 0)
    if experts:
        dense = layer in (getattr(tc, "mlp_only_layers", None) or [])
        step = int(getattr(tc, "decoder_sparse_step", 1) or 1)
        if not dense and (layer + 1) % step == 0:
            d = dims.d
            mac = d * experts + int(tc.num_experts_per_tok) * 3 * d * int(tc.moe_intermediate_size)
            shared = int(getattr(tc, "shared_expert_intermediate_size", 0) or 0)
            if shared:
                mac += 3 * d * shared + d
            return mac
    return 3 * dims.d * dims.m


def _attn_proj_mac_per_token(tc: Any, dims: LLMDims) -> int:
    """q/k/v/o projection MACs of one token (Qwen3.5's q_proj also emits the output gate)."""
    gated = getattr(tc, "model_type", "").startswith("qwen3_5")
    return dims.d * ((2 if gated else 1) * dims.d_q + 2 * dims.d_kv) + dims.d_q * dims.d


def _gdn_dims(tc: Any) -> tuple[int, int, int, int, int, int]:
    """(value heads, key head dim, value head dim, key dim, value dim, conv kernel) of a Gated DeltaNet."""
    hv, dk, dv = int(tc.linear_num_value_heads), int(tc.linear_key_head_dim), int(tc.linear_value_head_dim)
    return hv, dk, dv, int(tc.linear_num_key_heads) * dk, hv * dv, int(tc.linear_conv_kernel_dim)


def _gdn_proj_mac_per_token(tc: Any, d: int) -> int:
    hv, _, _, kd, vd, _ = _gdn_dims(tc)
    return d * (2 * kd + 2 * vd + 2 * hv) + vd * d


def _gdn_prefill_mac(tc: Any, d: int, n: int) -> int:
    """MACs of a Gated DeltaNet layer's token mixer on ``n`` tokens at prefill (module docstring)."""
    if n <= 0:
        return 0
    hv, dk, dv, kd, vd, k = _gdn_dims(tc)
    c = GDN_CHUNK
    chunks = -(-n // c)
    core = 2 * c * c * dk + c * c * dv + 3 * c * dk * dv + c * (c - 1) // 2 * (dk + dv)
    return n * _gdn_proj_mac_per_token(tc, d) + (2 * kd + vd) * k * (n + k - 1) + hv * chunks * core


def _layer_prefill_mac(tc: Any, dims: LLMDims, kind: str, layer: int, n: int) -> int:
    """Primary MACs of decoder layer ``layer`` of kind ``kind`` with ``n`` tokens."""
    ffn = n * _ffn_mac_per_token(tc, dims, layer)
    if kind == "linear_attention":
        return _gdn_prefill_mac(tc, dims.d, n) + ffn
    return n * _attn_proj_mac_per_token(tc, dims) + 2 * n * n * dims.d_q + ffn


def _layer_decode_mac(tc: Any, dims: LLMDims, kind: str, layer: int, c: int) -> int:
    """MACs of decoder layer ``layer`` for one new token with cache length ``c`` (new token included)."""
    ffn = _ffn_mac_per_token(tc, dims, layer)
    if kind == "linear_attention":
        hv, dk, dv, kd, vd, k = _gdn_dims(tc)
        return _gdn_proj_mac_per_token(tc, dims.d) + (2 * kd + vd) * k + 3 * hv * dk * dv + ffn
    return _attn_proj_mac_per_token(tc, dims) + 2 * c * dims.d_q + ffn


def _layer_state_elements(tc: Any, dims: LLMDims, kind: str, c: int) -> int:
    """Cached elements of one layer: K and V of ``c`` tokens, or a Gated DeltaNet's fixed state."""
    if kind == "linear_attention":
        hv, dk, dv, kd, vd, k = _gdn_dims(tc)
        return (2 * kd + vd) * k + hv * dk * dv
    return 2 * c * dims.kv_heads * dims.head_dim


def _fastv_f(dims: LLMDims, n: int) -> int:
    """FastV Eq. 5 per-layer MACs ``4nd^2 + 2n^2 d + 2ndm``."""
    d, m = dims.d, dims.m
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def _pdrop_mac(dims: LLMDims, n: int) -> int:
    """PyramidDrop per-layer MACs ``4nd^2 + 2n^2 d + 3ndm``."""
    d, m = dims.d, dims.m
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


# ----------------------------------------------------------------------------------------------- vision
def _vit_mlp_mac_per_token(vc: Any) -> int:
    """MLP MACs per token of a CLIP / SigLIP / DINOv2 layer."""
    c = int(vc.hidden_size)
    if getattr(vc, "use_swiglu_ffn", False):  # DINOv2-giant: gate+up fused, down
        h = int(c * vc.mlp_ratio)
        h = (int(h * 2 / 3) + 7) // 8 * 8
        return 3 * c * h
    m = getattr(vc, "intermediate_size", None) or int(c * vc.mlp_ratio)
    return 2 * c * int(m)


def _vit_prefix_tokens(vc: Any) -> int:
    """Non-patch tokens (CLS, registers) of a plain ViT sequence."""
    mt = getattr(vc, "model_type", "")
    if mt.startswith("siglip"):
        return 0
    return 1 + int(getattr(vc, "num_register_tokens", 0) or 0)


def _vit_flops(vc: Any, views: Sequence[Sequence[int]]) -> float:
    """2 x MACs of a CLIP/SigLIP/DINOv2 tower; ``views[v][l]`` = tokens entering layer l of view v."""
    c = int(vc.hidden_size)
    mlp = _vit_mlp_mac_per_token(vc)
    patch_in = int(getattr(vc, "num_channels", 3)) * int(vc.patch_size) ** 2
    prefix = _vit_prefix_tokens(vc)
    mac = 0
    for layers in views:
        if not layers:
            continue
        mac += max(layers[0] - prefix, 0) * patch_in * c  # patch embedding (conv)
        for n in layers:
            mac += 4 * n * c * c + 2 * n * n * c + n * mlp
        if getattr(vc, "model_type", "").startswith("siglip") and getattr(vc, "vision_use_head", False):
            n = layers[-1]  # attention-pooling head: 1 probe query over the final sequence
            mac += 2 * c * c + 2 * n * c * c + 2 * n * c + mlp
    return 2.0 * mac


def qwen_vision_segments(model_or_config: Any, grid_thw: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per vision block, the attention segment lengths of Qwen2-VL / Qwen2.5-VL for ``grid_thw``.

    ``grid_thw`` is ``[(t, h, w), ...]`` in patches per image/video. Full-attention blocks (all of
    Qwen2-VL, ``fullatt_block_indexes`` of Qwen2.5-VL) attend within each frame (``h*w``); the other
    Qwen2.5-VL blocks use windows of ``window_size // spatial_merge_size // patch_size`` merged tokens a
    side (8 x 8 patches for 112 px), smaller at the bottom/right edges — as transformers'
    ``get_vision_window_index``. Returns ``depth`` lists, usable as ``TokenSchedule.vision_windows``.
    """
    config = _config_of(model_or_config)
    vc = config.vision_config
    depth = int(vc.depth)
    full = [h * w for t, h, w in grid_thw for _ in range(t)]
    if config.model_type != "qwen2_5_vl":
        return [list(full) for _ in range(depth)]
    ms = int(vc.spatial_merge_size)
    ws = int(vc.window_size) // ms // int(vc.patch_size)
    windows: list[int] = []
    for t, h, w in grid_thw:
        lh, lw = h // ms, w // ms
        rows = [min(ws, lh - i) for i in range(0, lh, ws)]
        cols = [min(ws, lw - j) for j in range(0, lw, ws)]
        for _ in range(t):
            windows += [r * c * ms * ms for r in rows for c in cols]
    fullatt = set(getattr(vc, "fullatt_block_indexes", []) or [])
    return [list(full) if b in fullatt else list(windows) for b in range(depth)]


def _packed_vit_dims(config: Any) -> tuple[int, int, int, int]:
    """(width, MLP MACs per token, patch-embedding inputs per patch, CLS tokens per frame) of a packed ViT."""
    vc = config.vision_config
    mt = config.model_type
    if mt == "llava_onevision1_5":  # RICE-ViT: GELU MLP, Conv2d patches, one CLS token per frame
        c = int(vc.hidden_size)
        return c, 2 * c * int(vc.intermediate_size), int(vc.in_channels) * int(vc.patch_size) ** 2, 1
    if mt in _QWEN3_TYPES:  # Qwen3-VL / Qwen3.5: 2-matrix MLP, Conv3d patches
        c = int(vc.hidden_size)
        return c, 2 * c * int(vc.intermediate_size), int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2, 0
    qwen25 = mt == "qwen2_5_vl"
    c = int(vc.hidden_size if qwen25 else vc.embed_dim)
    mlp = 3 * c * int(vc.intermediate_size) if qwen25 else 2 * c * int(c * vc.mlp_ratio)
    return c, mlp, int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2, 0


def _qwen_vision_flops(config: Any, schedule: TokenSchedule) -> float:
    """2 x MACs of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 (LLaVA-OneVision-1.5) ViT blocks that
    ran plus the patch embedding."""
    c, mlp, patch_in, cls = _packed_vit_dims(config)
    views = schedule.vision_tokens_per_layer
    mac = 0
    for layers in views:
        if layers:
            mac += (layers[0] - cls) * patch_in * c
        for p in layers:
            mac += 4 * p * c * c + p * mlp
    segs = schedule.vision_windows
    if segs:
        for block in segs:
            mac += sum(2 * s * s * c for s in block)
    else:  # full attention within each view
        for layers in views:
            mac += sum(2 * p * p * c for p in layers)
    return 2.0 * mac


def _projector_flops(config: Any, tokens: int) -> float:
    mt = config.model_type
    if tokens <= 0:
        return 0.0
    if mt in _LLAVA_TYPES:
        d = int(config.text_config.hidden_size)
        fl = config.vision_feature_layer
        n_feat = 1 if isinstance(fl, int) else len(fl)
        return 2.0 * tokens * (int(config.vision_config.hidden_size) * n_feat * d + d * d)
    if mt in _QWEN_TYPES:
        vc = config.vision_config
        c = _packed_vit_dims(config)[0]
        out = int(vc.hidden_size if mt == "qwen2_vl" else vc.out_hidden_size)
        h = c * int(vc.spatial_merge_size) ** 2
        mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", None) or [])  # Qwen3-VL DeepStack mergers
        return 2.0 * tokens * mergers * (h * h + h * out)
    return 0.0


def _vision_flops(config: Any, schedule: TokenSchedule) -> float:
    mt = getattr(config, "model_type", "")
    if not schedule.vision_tokens_per_layer:
        return 0.0
    if mt in _LLAVA_TYPES:
        return _vit_flops(config.vision_config, schedule.vision_tokens_per_layer)
    if mt in _QWEN_TYPES:
        return _qwen_vision_flops(config, schedule)
    if mt.startswith(("clip", "siglip", "dinov2")):  # a bare vision config
        return _vit_flops(config, schedule.vision_tokens_per_layer)
    raise ValueError(f"count_flops: no vision-encoder model for model_type {mt!r}")


# ------------------------------------------------------------------------------------------- count_flops
def count_flops(
    model_or_config: Any,
    schedule: TokenSchedule,
    *,
    dtype_bytes: int = 2,
    lm_head_positions: int = 1,
) -> FlopsReport:
    """FLOPs / KV figures of one sample (see the module docstring).

    Args:
        model_or_config: a model (its ``.config`` is used) or a config with ``model_type`` in
            ``llava``, ``llava_next``, ``qwen2_vl``, ``qwen2_5_vl``, or a bare text config (llama, qwen2,
            ...) for LLM-only counting.
        schedule: the tokens that actually ran; ``llm_tokens_per_layer`` must have one entry per decoder
            layer (or be empty when the LLM did not run); ``visual_tokens_per_layer`` the same or empty.
        dtype_bytes: bytes per KV element (2 for fp16/bf16).
        lm_head_positions: positions whose logits are computed at prefill (``lm_head_prefill_flops``).
    """
    config = _config_of(model_or_config)
    dims = llm_dims(config)
    n = [int(x) for x in schedule.llm_tokens_per_layer]
    if n and len(n) != dims.layers:
        raise ValueError(f"llm_tokens_per_layer has {len(n)} entries, the model has {dims.layers} layers")
    vis = [int(x) for x in schedule.visual_tokens_per_layer] or [0] * len(n)
    if len(vis) != len(n):
        raise ValueError("visual_tokens_per_layer and llm_tokens_per_layer differ in length")

    tc = _text_config(config)
    kinds = _layer_types(tc)
    per_layer = [2.0 * _layer_prefill_mac(tc, dims, kinds[l], l, x) for l, x in enumerate(n)]

    if n:
        n0 = n[0] - vis[0] + int(schedule.visual_tokens_in)  # unpruned prompt length
        ref = dims.layers * _fastv_f(dims, n0)
        fastv_ratio = sum(_fastv_f(dims, x) for x in n) / ref if ref else float("nan")
    else:
        fastv_ratio = float("nan")
    pdrop = float(sum(_pdrop_mac(dims, v) for v in vis))

    steps = max(int(schedule.new_tokens) - 1, 0)
    decode_first = 2.0 * sum(_layer_decode_mac(tc, dims, kinds[l], l, x + 1) for l, x in enumerate(n))
    if steps >= 1:
        decode_mean = 2.0 * sum(_layer_decode_mac(tc, dims, kinds[l], l, x + j)
                                for l, x in enumerate(n) for j in range(1, steps + 1)) / steps
    else:
        decode_mean = decode_first
    lm_head = 2.0 * dims.d * dims.vocab

    kv_prefill = float(sum(_layer_state_elements(tc, dims, kinds[l], x) for l, x in enumerate(n)) * dtype_bytes)
    kv_end = float(sum(_layer_state_elements(tc, dims, kinds[l], x + steps) for l, x in enumerate(n)) * dtype_bytes)

    return FlopsReport(
        llm_prefill_flops=sum(per_layer),
        llm_prefill_per_layer=per_layer,
        fastv_ratio=fastv_ratio,
        pdrop_visual_mac=pdrop,
        llmviewer_visual=2.0 * pdrop,
        vision_flops=_vision_flops(config, schedule),
        projector_flops=_projector_flops(config, int(schedule.projector_tokens)),
        decode_flops_first=decode_first,
        decode_flops_mean=decode_mean,
        lm_head_flops_per_token=lm_head,
        lm_head_prefill_flops=lm_head * lm_head_positions if n else 0.0,
        kv_bytes_prefill=kv_prefill,
        kv_bytes_end=kv_end,
        eq_visual_tokens=schedule.eq_visual_tokens,
    )


# ---------------------------------------------------------------------------------------------- helpers
def _llava_next_max_views(config: Any) -> int:
    size = int(config.vision_config.image_size)
    crops = max((h // size) * (w // size) for h, w in config.image_grid_pinpoints)
    return 1 + crops


def nominal_schedule(
    model_or_config: Any,
    visual_tokens: int,
    text_tokens: int,
    system_tokens: int = 0,
    *,
    views: int | None = None,
    image_grid_thw: Sequence[Sequence[int]] | None = None,
    vision_layers: int | None = None,
    new_tokens: int = 0,
) -> TokenSchedule:
    """An unpruned :class:`TokenSchedule`: ``system + visual + text`` tokens in every decoder layer.

    Vision side (empty for a bare text config):

    * LLaVA / LLaVA-NeXT: ``views`` views (default 1 for LLaVA, ``1 + max crops`` of
      ``image_grid_pinpoints`` for NeXT, i.e. 5 for the 336-px 2x2 grids), each of
      ``(image_size/patch_size)^2 + prefix`` tokens (CLS/registers; none for SigLIP) through
      ``vision_layers`` layers (default: all ``num_hidden_layers``, as HF runs them);
      ``projector_tokens = views * patches`` (+1 per view with ``vision_feature_select_strategy='full'``).
    * Qwen2(.5)-VL: ``image_grid_thw`` (patches; default one square image with
      ``4 * visual_tokens`` patches); one view per frame (``t = 1`` for images) of ``h*w`` patches
      through all ``depth`` blocks; for Qwen2.5-VL ``vision_windows`` from
      :func:`qwen_vision_segments`; ``projector_tokens`` = merged tokens ``sum t*h*w / merge^2``.

    ``visual_tokens`` is what the LLM sees and is not derived from the vision side (NeXT's unpadding
    and newline tokens make it image dependent).
    """
    config = _config_of(model_or_config)
    dims = llm_dims(config)
    total = system_tokens + visual_tokens + text_tokens
    s = TokenSchedule(
        llm_tokens_per_layer=[total] * dims.layers,
        visual_tokens_per_layer=[visual_tokens] * dims.layers,
        visual_tokens_in=visual_tokens,
        visual_tokens_per_image=[visual_tokens] if visual_tokens else [],
        new_tokens=new_tokens,
    )
    mt = getattr(config, "model_type", "")
    if mt in _LLAVA_TYPES:
        vc = config.vision_config
        if views is None:
            views = 1 if mt == "llava" else _llava_next_max_views(config)
        patches = (int(vc.image_size) // int(vc.patch_size)) ** 2
        seq = patches + _vit_prefix_tokens(vc)
        nl = vision_layers if vision_layers is not None else int(vc.num_hidden_layers)
        s.vision_tokens_per_layer = [[seq] * nl for _ in range(views)]
        full = getattr(config, "vision_feature_select_strategy", "default") == "full"
        s.projector_tokens = views * (seq if full else patches)
    elif mt in _QWEN_TYPES:
        vc = config.vision_config
        ms = int(vc.spatial_merge_size)
        if image_grid_thw is None:
            side = math.isqrt(visual_tokens)
            if side * side != visual_tokens:
                raise ValueError("pass image_grid_thw: visual_tokens is not a square number")
            image_grid_thw = [(1, side * ms, side * ms)]
        grid = [tuple(int(x) for x in g) for g in image_grid_thw]
        nl = vision_layers if vision_layers is not None else int(vc.depth)
        # one view per frame: full attention and the Conv3d patch embedding act per frame
        cls = _packed_vit_dims(config)[3]  # LLaVA-OneVision-1.5: a CLS token per frame
        s.vision_tokens_per_layer = [[h * w + cls] * nl for t, h, w in grid for _ in range(t)]
        if mt == "qwen2_5_vl":
            s.vision_windows = qwen_vision_segments(config, grid)[:nl]
        merged = [t * h * w // (ms * ms) for t, h, w in grid]
        s.projector_tokens = sum(merged)
        if sum(merged) == visual_tokens:
            s.visual_tokens_per_image = merged
    return s


def prune_schedule(schedule: TokenSchedule, steps: Mapping[int, int]) -> TokenSchedule:
    """A copy of ``schedule`` whose visual tokens drop to ``steps[k]`` from decoder layer ``k`` on.

    ``steps`` maps a layer index to the visual tokens kept from that layer onward, e.g. ``{0: 192}``
    (pre-LLM keep 192), ``{2: 288}`` (FastV K=2, R=50 %), ``{7: 504, 9: 360, 12: 72}`` (TransPrune-High).
    Non-visual tokens are unchanged; ``visual_tokens_in`` and the vision/projector fields are kept (a
    method that projects only the kept tokens must set ``projector_tokens`` itself). A step at layer 0
    with a single image also sets ``visual_tokens_per_image``.
    """
    vis = list(schedule.visual_tokens_per_layer)
    llm = list(schedule.llm_tokens_per_layer)
    cur: int | None = None
    for l in range(len(vis)):
        if l in steps:
            cur = int(steps[l])
        if cur is not None:
            llm[l] -= vis[l] - cur
            vis[l] = cur
    out = replace(schedule, llm_tokens_per_layer=llm, visual_tokens_per_layer=vis)
    out.visual_tokens_per_image = list(schedule.visual_tokens_per_image)
    if 0 in steps and len(out.visual_tokens_per_image) == 1:
        out.visual_tokens_per_image = [int(steps[0])]
    out.vision_tokens_per_layer = [list(v) for v in schedule.vision_tokens_per_layer]
    out.vision_windows = [list(v) for v in schedule.vision_windows]
    return out
