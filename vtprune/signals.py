"""Signal registries: the evidence a policy may request, one function per kind, one signature each.

A policy names the signals it needs as ``"kind@layer"`` (``"vit_received@8"``, ``"vit_cls@-2"``,
``"last_row@1"``). Each registry maps a kind to one function with a fixed signature (in the manner of
transformers' ``AttentionInterface``): a new kind is one decorated function, not another branch.

* :data:`VIT_SIGNALS` -- plain ViT towers (CLIP, SigLIP, DINOv2 in LLaVA / LLaVA-NeXT). The adapter
  captures the requested layers during the tower's own forward and calls ``fn(layer: ViTLayer)``;
  the result is per view, indexed on encoder tokens: (V, N) or (V, N, C). Policies request them from
  :meth:`~vtprune.policy.Policy.required_signals`.
* :data:`PACKED_VIT_SIGNALS` -- packed, windowed towers (Qwen2-VL / Qwen2.5-VL): ``fn(block:
  PackedViTBlock)`` returns (n_units,) values per merge unit, raster order, images concatenated.
* :data:`DECODER_SIGNALS` -- inside the LLM at prefill (stage D). ``fn(inp: DecoderSignalInput)``
  returns (B, L) values; a policy requests them from
  :meth:`~vtprune.policy.DecoderPolicy.signal_layers` and reads ``view.signals["kind@layer"]``.
  ``aligned`` kinds are stored in LLM-input coordinates (so they stay aligned across earlier
  prunes); the others index the sequence entering the layer. Kinds with a ``module`` are produced by
  a forward hook on that sub-module of the layer (``"self_attn"``: the layer's token mixer,
  ``Adapter.token_mixer``; a Gated DeltaNet layer's ``linear_attn``) and reduced by the policy's
  :meth:`~vtprune.policy.DecoderPolicy.reduce_io`. ``attention`` kinds read attention rows: asked for
  layer ``l`` they are computed at ``Adapter.attention_layer_for(l)`` (``l`` itself, or on a hybrid
  LLM the last full-attention layer at or before it) and stored under ``l``; read at an earlier layer
  they are computed after that layer's own pruning (the attention it really computes).
* :data:`TEXT_SIGNALS` -- the sample's prompt, for stage-P policies conditioned on the instruction
  (CDPruner). Named without a layer (``"instruction_embeds"``) in ``required_signals``; the hook layer
  calls ``fn(text: SampleText)`` once per sample and puts the :class:`TextTokens` into
  ``ImageTokens.signals`` of every image of that sample. Adapters never see these names.

Every attention value is computed in fp32 from the layer's own q/k, so the model keeps SDPA
(``vtprune/attention.py``): taken from the layer's own attention call through an attention tap
(``vtprune/adapters/tap.py``) where the layer computes that very attention, recomputed from its norm
and projections otherwise (rows read before a prune at the same layer; untappable modules).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .attention import attention_probs, received_attention, received_from_lse

__all__ = [
    "DECODER_SIGNALS", "PACKED_VIT_SIGNALS", "TEXT_SIGNALS", "VIT_SIGNALS", "DecoderSignal",
    "DecoderSignalInput", "PackedViTBlock", "SampleText", "TextTokens", "ViTLayer", "ViTSignal",
    "parse_signal", "register_decoder_signal", "register_packed_vit_signal", "register_text_signal",
    "register_vit_signal",
]


def parse_signal(name: str) -> tuple[str, int]:
    """``"kind@layer"`` -> ``(kind, layer)``; ``ValueError`` naming the expected form otherwise."""
    kind, at, layer = name.partition("@")
    try:
        if not at or not kind:
            raise ValueError
        return kind, int(layer)
    except ValueError:
        raise ValueError(f"malformed signal name {name!r}: expected 'kind@layer', e.g. 'vit_received@8'") from None


# ------------------------------------------------------------------------------------ plain ViTs
@dataclass
class ViTLayer:
    """What a ViT signal reads of one encoder layer of one request (all views at once).

    Attributes:
        index: 0-based layer index.
        output: (V, N, C) output of the layer (captured when a kind reads ``"output"``).
        qk: a function returning ``(q, k, scale)`` with q, k (V, H, N, hd) of the layer (its own
            projections, captured during the forward; recomputed only when not captured).
        lse: (V, H, N) fp32 logsumexp of the layer's own softmax rows when its attention kernel
            returned it (the CPU flash kernel, through the adapter's attention tap), else None.
    """

    index: int
    output: Tensor | None
    qk: Callable[[], tuple[Tensor, Tensor, float]]
    lse: Tensor | None = None


@dataclass(frozen=True)
class ViTSignal:
    """A plain-ViT signal kind: ``fn(layer) -> (V, N) | (V, N, C)``; ``reads`` is ``"qk"`` (the layer's
    input projections) or ``"output"`` (the layer output); ``needs_cls``: the kind reads token 0 as the
    CLS token (a tower without one, SigLIP, refuses it)."""

    fn: Callable[[ViTLayer], Tensor]
    reads: str = "qk"
    needs_cls: bool = False


VIT_SIGNALS: dict[str, ViTSignal] = {}


def register_vit_signal(kind: str, *, reads: str = "qk", needs_cls: bool = False):
    """Decorator: register ``fn(layer: ViTLayer) -> Tensor`` as the plain-ViT signal ``kind``."""
    if reads not in ("qk", "output"):
        raise ValueError(f"reads={reads!r}; choose 'qk' or 'output'")

    def deco(fn):
        VIT_SIGNALS[kind] = ViTSignal(fn, reads, needs_cls)
        return fn
    return deco


@register_vit_signal("vit_received")
def _vit_received(layer: ViTLayer) -> Tensor:
    """(V, N) attention each token receives: head mean, mean over all query rows."""
    q, k, scale = layer.qk()
    if layer.lse is not None:
        return received_from_lse(q, k, scale, layer.lse, "mean")
    return received_attention(attention_probs(q, k, scale, chunk_heads=4), "mean")


@register_vit_signal("vit_received_sum")
def _vit_received_sum(layer: ViTLayer) -> Tensor:
    """(V, N) attention each token receives: head mean, sum over all query rows."""
    q, k, scale = layer.qk()
    if layer.lse is not None:
        return received_from_lse(q, k, scale, layer.lse, "sum")
    return received_attention(attention_probs(q, k, scale, chunk_heads=4), "sum")


@register_vit_signal("vit_cls", needs_cls=True)
def _vit_cls(layer: ViTLayer) -> Tensor:
    """(V, N) head-mean softmax row of the CLS query (token 0) over all keys."""
    q, k, scale = layer.qk()
    return attention_probs(q[:, :, :1], k, scale).mean(1)[:, 0]


@register_vit_signal("vit_cls_logits", needs_cls=True)
def _vit_cls_logits(layer: ViTLayer) -> Tensor:
    """(V, N) head-mean pre-softmax logits of the CLS query over all keys (fp32)."""
    q, k, scale = layer.qk()
    return (torch.matmul(q[:, :, :1].float(), k.float().transpose(-1, -2)) * scale).mean(1)[:, 0]


@register_vit_signal("vit_keys")
def _vit_keys(layer: ViTLayer) -> Tensor:
    """(V, N, hd) head-mean keys (fp32)."""
    _, k, _ = layer.qk()
    return k.float().mean(1)


@register_vit_signal("vit_hidden", reads="output")
def _vit_hidden(layer: ViTLayer) -> Tensor:
    """(V, N, C) the layer output."""
    return layer.output


# ------------------------------------------------------------------------------- packed ViTs
@dataclass
class PackedViTBlock:
    """One block of a packed, windowed ViT (Qwen2-VL / Qwen2.5-VL) as its signals read it.

    Attributes:
        q, k: (P, H, hd) queries and keys of all patches of the request (rotary applied), packed order.
        scale: the block's softmax scale.
        cu_seqlens: the attention segments (windows or whole images) as cumulative lengths.
        unit: patches per merge unit (``spatial_merge_size ** 2``).
        window_index: (P / unit,) the tower's window permutation of merge units, or None (raster).
        prefix: tokens at the start of every segment that are not patches (LLaVA-OneVision-1.5: the
            frame's CLS token); they attend and are attended to, and get no value of their own.
    """

    q: Tensor
    k: Tensor
    scale: float
    cu_seqlens: list[int]
    unit: int
    window_index: Tensor | None
    prefix: int = 0


PACKED_VIT_SIGNALS: dict[str, Callable[[PackedViTBlock], Tensor]] = {}


def register_packed_vit_signal(kind: str):
    """Decorator: register ``fn(block: PackedViTBlock) -> (n_units,)`` as a packed-ViT signal."""
    def deco(fn):
        PACKED_VIT_SIGNALS[kind] = fn
        return fn
    return deco


@register_packed_vit_signal("vit_received")
def _packed_received(block: PackedViTBlock) -> Tensor:
    """(n_units,) attention received per merge unit, raster order: per attention segment head mean,
    sum over query rows (prefix rows included, prefix keys dropped); mean over the unit's patches;
    un-permuted from window order."""
    scores = []
    cu = block.cu_seqlens
    for s, e in zip(cu[:-1], cu[1:]):  # the segments cover the packed sequence in order
        if e - s <= block.prefix:
            continue
        qs = block.q[s:e].transpose(0, 1)[None]  # (1, H, T, hd)
        ks = block.k[s:e].transpose(0, 1)[None]
        probs = attention_probs(qs, ks, block.scale, chunk_heads=4)
        scores.append(probs[0].mean(0).sum(0)[block.prefix :])
    unit = torch.cat(scores).view(-1, block.unit).mean(-1)
    if block.window_index is not None:
        unit = unit[torch.argsort(block.window_index.to(unit.device))]
    return unit


# -------------------------------------------------------------------------------- decoder (stage D)
@dataclass
class DecoderSignalInput:
    """What a decoder signal may read in the pre-hook of decoder layer ``layer`` at prefill.

    Attributes:
        layer: 0-based decoder layer.
        hidden: (B, L, D) hidden states entering the layer (the current, possibly shortened sequence).
        position_embeddings: (cos, sin) of the current sequence (the layer's own rotary tables).
        key_mask: (B, L) bool, real (non-padding) tokens of the current sequence.
        visual: (B, L) bool, visual tokens of the current sequence.
        input_visual: (B, L_in) bool, visual tokens of the LLM input (padding excluded).
        input_image_id: (B, L_in) long, image index within the sample at the LLM input, -1 elsewhere.
        attention_rows: ``rows (B, R) long -> (B, H, R, L)`` fp32 probabilities of this layer for those
            query rows of the current sequence (causal + padding mask).
        to_input_coords: ``(B, L) values -> (B, L_in)`` at the tokens' LLM-input positions (0 elsewhere).
        keys: ``() -> (B, Hkv, L, hd)`` the layer's keys as its KV cache stores them (input norm,
            ``k_proj``, rotary), rotated at the positions each sample has when run alone.
        final_norm: ``() -> (B, L, D)`` the layer input through the LLM's final norm.
        rope_scores: ``rows (B, R) -> (B, R, L)``: ``q.k / sqrt(hd)`` the layer's rotary tables alone give
            all-ones queries and keys.
        aligned: ``() -> {"kind@layer": (B, L)}`` the aligned signals computed so far, gathered to the
            current sequence.
        policy: the requesting policy (kinds registered ``per_policy``; None otherwise).
    """

    layer: int
    hidden: Tensor
    position_embeddings: Any
    key_mask: Tensor
    visual: Tensor
    input_visual: Tensor
    input_image_id: Tensor
    attention_rows: Callable[[Tensor], Tensor]
    to_input_coords: Callable[[Tensor], Tensor]
    keys: Callable[[], Tensor] | None = None
    final_norm: Callable[[], Tensor] | None = None
    rope_scores: Callable[[Tensor], Tensor] | None = None
    aligned: Callable[[], dict] | None = None
    policy: Any = None


@dataclass(frozen=True)
class DecoderSignal:
    """A decoder signal kind. ``fn(inp) -> (B, L_cur)`` or, when ``aligned``, (B, L_in) in LLM-input
    coordinates. ``module`` (``"self_attn"``/``"mlp"``): produced by a forward hook on that
    sub-module and the requesting policy's ``reduce_io`` instead of ``fn``. ``per_policy``: computed
    by hooks of the requesting policy (``inp.policy``; one requesting policy per layer).
    ``after_prune``: computed after the layer's own pruning, on the sequence the layer runs on (the
    others are computed before it: a policy pruning at that layer selects with them). ``attention``:
    reads the layer's attention rows or keys, so on a hybrid LLM it is computed at
    ``Adapter.attention_layer_for(layer)``."""

    fn: Callable[[DecoderSignalInput], Tensor] | None
    aligned: bool = False
    module: str | None = None
    per_policy: bool = False
    after_prune: bool = False
    attention: bool = False


DECODER_SIGNALS: dict[str, DecoderSignal] = {
    "attn_io": DecoderSignal(None, aligned=True, module="self_attn"),
    "mlp_io": DecoderSignal(None, aligned=True, module="mlp"),
}


def register_decoder_signal(kind: str, *, aligned: bool = False, per_policy: bool = False,
                            after_prune: bool = False, attention: bool = False):
    """Decorator: register ``fn(inp: DecoderSignalInput) -> Tensor`` as the decoder signal ``kind``
    (``attention=True``: it reads the layer's attention rows or keys)."""
    def deco(fn):
        DECODER_SIGNALS[kind] = DecoderSignal(fn, aligned, per_policy=per_policy, after_prune=after_prune,
                                              attention=attention)
        return fn
    return deco


@register_decoder_signal("last_row", aligned=True, attention=True)
def _last_row(inp: DecoderSignalInput) -> Tensor:
    """Head-mean attention row of each sample's last real token over the current keys, in LLM-input
    coordinates (aligned: it may be read at a later layer after a prune)."""
    km = inp.key_mask
    n = km.shape[1]
    last = (km.long() * torch.arange(n, device=km.device)).argmax(-1)  # last valid token
    return inp.to_input_coords(inp.attention_rows(last[:, None]).mean(1)[:, 0])


@register_decoder_signal("post_visual_rows", aligned=True, attention=True)
def _post_visual_rows(inp: DecoderSignalInput) -> Tensor:
    """Head-mean attention of every prompt row after the sample's last visual token, averaged over
    those rows (zeros when there is none); LLM-input coordinates."""
    keymask, visual = inp.key_mask, inp.visual
    n = keymask.shape[1]
    ar = torch.arange(n, device=keymask.device)
    last_vis = torch.where(visual, ar, -1).amax(-1)
    rows_mask = keymask & (ar[None] > last_vis[:, None])
    r = max(int(rows_mask.sum(-1).max()), 1)
    rows = torch.argsort(torch.where(rows_mask, ar, n + ar), dim=-1)[:, :r]  # row positions first
    row_ok = torch.gather(rows_mask, 1, rows).float()
    head_mean = inp.attention_rows(rows).mean(1)  # (B, R, n)
    out = (head_mean * row_ok[..., None]).sum(1) / row_ok.sum(1).clamp(min=1.0)[:, None]
    return inp.to_input_coords(out)


@register_decoder_signal("image_tokens_in", aligned=True)
def _image_tokens_in(inp: DecoderSignalInput) -> Tensor:
    """For a visual token, the number of visual tokens its image has at the LLM input (0 for text)."""
    vis, iid = inp.input_visual, inp.input_image_id
    out = torch.zeros(vis.shape, dtype=torch.float32, device=vis.device)
    for k in range(int(iid.max()) + 1 if iid.numel() else 0):
        member = vis & (iid == k)
        out = torch.where(member, member.sum(-1, keepdim=True).float(), out)
    return out


# ------------------------------------------------------------------------------------ the prompt
@dataclass
class SampleText:
    """What a text signal reads of one sample of a request.

    Attributes:
        ids: (L,) the prefill's ``input_ids`` of the sample (padding included).
        valid: (L,) bool, False on padding.
        image_token_id: the image placeholder token.
        embed: (M,) token ids -> (M, D), the LLM's own input embeddings (``Adapter.text_embeddings``).
    """

    ids: Tensor
    valid: Tensor
    image_token_id: int
    embed: Callable[[Tensor], Tensor]

    def tokens(self, cols: Tensor) -> "TextTokens":
        sel = self.ids[cols]
        return TextTokens(ids=sel, embeds=self.embed(sel))


@dataclass(frozen=True)
class TextTokens:
    """Text tokens of one sample: ``ids`` (M,) and their LLM input embeddings ``embeds`` (M, D); M may
    be 0. Not a tensor, so selecting an image's tokens (``ImageTokens.subset``) never touches it."""

    ids: Tensor
    embeds: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())


TEXT_SIGNALS: dict[str, Callable[[SampleText], TextTokens]] = {}


def register_text_signal(kind: str):
    """Decorator: register ``fn(text: SampleText) -> TextTokens`` as the text signal ``kind``."""
    def deco(fn):
        TEXT_SIGNALS[kind] = fn
        return fn
    return deco


@register_text_signal("instruction_embeds")
def _instruction_embeds(text: SampleText) -> TextTokens:
    """The tokens after the sample's last image placeholder (the question and the chat template's
    tail); all its text when it has no image."""
    image = text.ids == text.image_token_id
    cols = torch.nonzero(text.valid & ~image).flatten()
    img_cols = torch.nonzero(text.valid & image).flatten()
    if img_cols.numel():
        cols = cols[cols > img_cols.max()]
    return text.tokens(cols)


@register_text_signal("text_embeds")
def _text_embeds(text: SampleText) -> TextTokens:
    """Every valid non-image token of the sample (system prompt and template included)."""
    return text.tokens(torch.nonzero(text.valid & (text.ids != text.image_token_id)).flatten())
@register_decoder_signal("key_l1", aligned=True, attention=True)
def _key_l1(inp: DecoderSignalInput) -> Tensor:
    """L1 norm, in fp32, of each token's key in the layer (rotary applied, all KV heads: what the
    layer's cache holds), 0 on padding; LLM-input coordinates. The L1 norm is not rotation invariant,
    so the keys are rotated at each sample's own (unpadded) positions (DART)."""
    norm = inp.keys().float().abs().sum(dim=(1, 3))
    return inp.to_input_coords(norm.masked_fill(~inp.key_mask, 0.0))


@register_decoder_signal("final_norm")
def _final_norm(inp: DecoderSignalInput) -> Tensor:
    """(B, L, D) the layer input through the LLM's final norm (model dtype), current sequence (DART)."""
    return inp.final_norm()


@register_decoder_signal("hidden_reduce", aligned=True, per_policy=True)
def _hidden_reduce(inp: DecoderSignalInput) -> Tensor:
    """The requesting policy's ``reduce_hidden(layer, hidden, key_mask, visual) -> (B, L)`` of the
    layer input; LLM-input coordinates (SparseVLM's text raters)."""
    return inp.to_input_coords(inp.policy.reduce_hidden(inp.layer, inp.hidden, inp.key_mask, inp.visual))


@register_decoder_signal("policy_rows", aligned=True, per_policy=True, after_prune=True, attention=True)
def _policy_rows(inp: DecoderSignalInput) -> Tensor:
    """The requesting policy's ``reduce_rows(layer, RowAttention)`` of the head-wise attention of the
    rows its ``query_rows(layer, aligned signals so far, key_mask, visual)`` picks; LLM-input
    coordinates. Computed after any pruning at this layer: it is the attention the layer itself
    computes (SparseVLM's relation)."""
    from .policy import RowAttention

    keymask = inp.key_mask
    n = keymask.shape[1]
    want = inp.policy.query_rows(inp.layer, inp.aligned(), keymask, inp.visual).bool() & keymask
    ar = torch.arange(n, device=keymask.device)
    r = max(int(want.sum(-1).max()), 1)
    rows = torch.argsort(torch.where(want, ar, n + ar), dim=-1)[:, :r]  # chosen rows first, in order
    row_ok = torch.gather(want, 1, rows)
    rows = rows.masked_fill(~row_ok, 0)
    att = RowAttention(probs=inp.attention_rows(rows), rows=rows, row_ok=row_ok, key_mask=keymask,
                       visual=inp.visual, rope_scores=lambda: inp.rope_scores(rows))
    return inp.to_input_coords(inp.policy.reduce_rows(inp.layer, att))
