"""Partial attention: ``softmax(q k^T * scale)`` for chosen query rows only.

Methods need a few attention rows (FastV: the last prompt token of one decoder layer; VisionZip: the
CLS row of one ViT layer; HiPrune: the attention each patch receives). Under SDPA/FlashAttention the
model returns no attention maps, so vtprune computes exactly those rows from the layer's own q/k (taken
from its attention call, ``adapters/tap.py``, or recomputed), in fp32, and the model keeps its fast
attention. Column sums over all rows (:func:`received_from_lse`) use the rows' logsumexp when the
attention kernel returned it: no max / normalise pass and no probability tensor. The model-specific part (which norm,
which projections, which rotary function) lives in the adapters; this module is the shared maths.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def repeat_kv(k: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, N, hd) -> (B, Hkv * n_rep, N, hd) (grouped-query attention)."""
    if n_rep == 1:
        return k
    b, h, n, d = k.shape
    return k[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def attention_probs(
    q: Tensor,
    k: Tensor,
    scaling: float,
    *,
    key_mask: Tensor | None = None,
    query_index: Tensor | None = None,
    key_index: Tensor | None = None,
    chunk_heads: int | None = None,
) -> Tensor:
    """Attention probabilities of the given query rows, in fp32.

    Args:
        q: (B, H, R, hd) queries of the chosen rows (rotary already applied).
        k: (B, Hkv, N, hd) keys (rotary applied); Hkv divides H (GQA keys are repeated).
        scaling: the layer's softmax scale (usually ``hd ** -0.5``).
        key_mask: optional (B, N) bool, False for keys that must be ignored (padding).
        query_index: optional (B, R) or (R,) long, the sequence index of each query row; with
            ``key_index`` enables the causal mask (key index <= query index).
        key_index: optional (B, N) or (N,) long, the sequence index of each key (default arange(N)).
        chunk_heads: compute this many heads at a time to bound memory.

    Returns:
        (B, H, R, N) fp32 probabilities; each row sums to 1 over its visible keys.
    """
    b, h, r, _ = q.shape
    k = repeat_kv(k, h // k.shape[1])  # converted to fp32 a chunk of heads at a time (small buffers)
    n = k.shape[2]
    mask = None
    if key_mask is not None:
        mask = key_mask.bool()[:, None, None, :].expand(b, 1, r, n)
    if query_index is not None:
        qi = query_index if query_index.dim() == 2 else query_index[None].expand(b, -1)
        if key_index is None:
            ki = torch.arange(n, device=k.device)[None].expand(b, -1)
        else:
            ki = key_index if key_index.dim() == 2 else key_index[None].expand(b, -1)
        causal = ki[:, None, None, :] <= qi[:, None, :, None]
        mask = causal if mask is None else mask & causal
    step = chunk_heads or h
    out = []
    for s in range(0, h, step):
        logits = torch.matmul(q[:, s : s + step].float(), k[:, s : s + step].float().transpose(-1, -2)) * scaling
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        out.append(torch.softmax(logits, dim=-1))
    probs = torch.cat(out, dim=1) if len(out) > 1 else out[0]
    return torch.nan_to_num(probs, nan=0.0)


def received_attention(probs: Tensor, reduce_queries: str = "mean") -> Tensor:
    """Attention each key receives: mean over heads, then mean or sum over query rows.

    Args:
        probs: (B, H, R, N) probabilities.
        reduce_queries: ``"mean"`` or ``"sum"``.
    Returns:
        (B, N).
    """
    head_mean = probs.mean(dim=1)
    return head_mean.mean(dim=1) if reduce_queries == "mean" else head_mean.sum(dim=1)


def received_from_lse(q: Tensor, k: Tensor, scaling: float, lse: Tensor, reduce_queries: str = "mean") -> Tensor:
    """:func:`received_attention` of all query rows, given each row's softmax normaliser.

    ``p_ij = 2 ** (q_i.k_j * scaling * log2(e) - lse_i * log2(e))``, summed over rows and heads one
    (view, head) at a time: one fp32 ``addmm`` with the bias folded in, into one reused (R, N) buffer,
    then ``exp2_`` (several times cheaper than ``exp`` on CPU) and a column sum; no max, normalise or
    probability tensor. Relative difference from the ``exp`` form: a few 1e-7 (fp32 rounding).

    Args:
        q: (B, H, R, hd); k: (B, Hkv, N, hd); lse: (B, H, R) fp32 ``logsumexp`` of each row's logits
            (as the attention kernel computed it).
    Returns:
        (B, N) fp32: head mean, then mean (or sum) over the R rows (no autograd graph).
    """
    b, h, r, d = q.shape
    k = repeat_kv(k, h // k.shape[1])
    n = k.shape[2]
    log2e = 1.0 / math.log(2.0)
    acc = torch.zeros((b, n), dtype=torch.float32, device=q.device)
    buf = torch.empty((r, n), dtype=torch.float32, device=q.device)
    bias = lse.float() * -log2e  # (B, H, R)
    with torch.no_grad():  # scores for a selection: no graph (and out= takes no autograd inputs)
        for i in range(b):
            for j in range(h):
                torch.addmm(bias[i, j, :, None], q[i, j].float(), k[i, j].float().T, alpha=scaling * log2e, out=buf)
                acc[i] += buf.exp2_().sum(dim=0)
    acc /= h
    return acc / r if reduce_queries == "mean" else acc
