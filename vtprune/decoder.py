"""Stage D: physically dropping visual tokens inside the LLM decoder, with a consistent KV cache.

One forward pre-hook per decoder layer. At prefill, a layer where a policy prunes gathers the kept
rows of its input hidden states; every later layer then receives, instead of the model's full-length
tables, the cos/sin gathered at the surviving tokens (original positions), the position ids gathered
the same way, and an attention mask built by transformers' own mask function for the current
attention implementation from the surviving tokens' padding mask. Samples of a batch are repacked
with left padding when their kept counts differ.

At decode, the layers whose cache was shortened get a mask over their own cache length (their
prefill key mask + the new tokens); layers before the first pruning layer are untouched.
The model's own positions for new tokens (from the layer-0 cache / generate's position ids) are the
unpruned numbering, which is what "original positions" means.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from .policy import DecoderPolicy, DecoderView


def build_mask(config, key_mask: Tensor, q_len: int, dtype: torch.dtype) -> Any:
    """4-D mask in the format of ``config._attn_implementation`` for queries at the end of the keys.

    Args:
        key_mask: (B, kv) bool, False on padding keys.
        q_len: number of queries; they sit at key positions ``kv - q_len .. kv - 1``.
    """
    impl = config._attn_implementation
    if impl not in ("sdpa", "eager"):
        raise ValueError(
            f"stage-D pruning supports attn_implementation 'sdpa' and 'eager', not {impl!r}; "
            "load the model with attn_implementation='sdpa'"
        )
    b, kv = key_mask.shape
    fn = ALL_MASK_ATTENTION_FUNCTIONS[impl]
    return fn(
        batch_size=b,
        q_length=q_len,
        kv_length=kv,
        q_offset=kv - q_len,
        kv_offset=0,
        mask_function=causal_mask_function,
        attention_mask=key_mask.bool(),
        allow_is_causal_skip=False,
        dtype=dtype,
        config=config,
        device=key_mask.device,
    )


def gather_seq(t: Tensor, index: Tensor, dim: int) -> Tensor:
    """Gather ``t`` along its sequence axis ``dim`` with a per-sample index.

    ``t`` has its batch axis at ``dim - 1`` (size B or 1, broadcast); ``index`` is (B, L').
    Returns ``t`` with the batch axis expanded to B and the sequence axis of length L'.
    """
    b, n = index.shape
    shape = list(t.shape)
    shape[dim - 1] = b
    t = t.expand(*shape)
    idx = index.view(*([1] * (dim - 1)), b, n, *([1] * (t.dim() - dim - 1)))
    shape[dim] = n
    return torch.gather(t, dim, idx.expand(*shape))


class DecoderController:
    """Owns the per-layer hooks of stage D and the per-layer token accounting."""

    def __init__(self, adapter, policies: list[DecoderPolicy], ctx):
        self.adapter = adapter
        self.policies = policies
        self.ctx = ctx
        self.config = adapter.language_model.config
        n = adapter.num_llm_layers()
        self.prune_at: dict[int, list[DecoderPolicy]] = {}
        self.signal_at: dict[int, list[tuple[DecoderPolicy, str]]] = {}
        for p in policies:
            for l in p.prune_layers(n):
                self.prune_at.setdefault(l, []).append(p)
            for l, kind in p.signal_layers(n).items():
                self.signal_at.setdefault(l, []).append((p, kind))
        self.first_prune = min(self.prune_at) if self.prune_at else None
        self.handles = []
        self.state = None

    def install(self) -> None:
        for i, layer in enumerate(self.adapter.llm_layers()):
            self.handles.append(
                layer.register_forward_pre_hook(lambda m, a, k, i=i: self._pre(i, a, k), with_kwargs=True)
            )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # -------------------------------------------------------------- the hook
    def _pre(self, layer: int, args: tuple, kwargs: dict):
        st = self.state
        if st is None or st.phase is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if st.phase == "prefill":
            return self._prefill(layer, hidden, args, kwargs)
        if st.phase == "decode" and self.first_prune is not None and layer >= self.first_prune:
            return self._decode(layer, hidden, args, kwargs)
        return None

    def _substitute(self, kwargs: dict, st) -> None:
        """Replace the full-length tables of this layer by those of the surviving tokens."""
        cos, sin = st.full_rope
        idx = st.cur_index
        kwargs["position_embeddings"] = (gather_seq(cos, idx, cos.dim() - 2), gather_seq(sin, idx, sin.dim() - 2))
        pid = kwargs.get("position_ids")
        if pid is not None and pid.shape[-1] == st.full_len:
            kwargs["position_ids"] = gather_seq(pid, idx, pid.dim() - 1)
        kwargs["attention_mask"] = build_mask(self.config, st.cur_keymask, idx.shape[1], st.dtype)

    def _prefill(self, layer: int, hidden: Tensor, args: tuple, kwargs: dict):
        st = self.state
        changed = False
        if layer == 0:
            st.full_rope = kwargs["position_embeddings"]
            st.full_len = hidden.shape[1]
            st.dtype = hidden.dtype
            st.cur_index = None
        if st.cur_index is not None:
            self._substitute(kwargs, st)
            changed = True
        for p, kind in self.signal_at.get(layer, []):
            st.signals[(layer, kind)] = self._signal(layer, kind, hidden, kwargs, st)
        if layer in self.prune_at:
            hidden = self._prune(layer, hidden, st)
            self._substitute(kwargs, st)
            changed = True
        if st.cur_index is not None:
            st.layer_keymask[layer] = st.cur_keymask
        st.record_layer(layer)
        if not changed:
            return None
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _decode(self, layer: int, hidden: Tensor, args: tuple, kwargs: dict):
        st = self.state
        keymask = st.layer_keymask.get(layer)
        if keymask is None:
            return None
        q = hidden.shape[1]
        tail = st.decode_tail(q)
        full = torch.cat([keymask, tail.to(keymask.dtype)], dim=1)
        kwargs["attention_mask"] = build_mask(self.config, full, q, hidden.dtype)
        return args, kwargs

    # -------------------------------------------------------------- signals and pruning
    def _current_keymask(self, st) -> Tensor:
        return st.cur_keymask if st.cur_index is not None else st.mask.bool()

    def _signal(self, layer: int, kind: str, hidden: Tensor, kwargs: dict, st) -> Tensor:
        if kind != "last_row":
            raise ValueError(f"unknown decoder signal {kind!r}")
        keymask = self._current_keymask(st)
        n = keymask.shape[1]
        last = (keymask.long() * torch.arange(n, device=keymask.device)).argmax(-1)  # last valid token
        probs = self.adapter.llm_attention_rows(
            layer, hidden, kwargs["position_embeddings"], last[:, None], keymask
        )
        return probs.mean(1)[:, 0]  # (B, n) head mean of the last prompt token's row

    def _prune(self, layer: int, hidden: Tensor, st) -> Tensor:
        b = hidden.shape[0]
        keymask = self._current_keymask(st)
        cur = st.cur_index if st.cur_index is not None else torch.arange(hidden.shape[1], device=hidden.device)[None].expand(b, -1)
        rows, idx_lists = [], []
        for i in range(b):
            valid = torch.nonzero(keymask[i]).flatten()
            orig = cur[i, valid]
            visual = st.visual[i, orig]
            keep = torch.ones(valid.numel(), dtype=torch.bool, device=hidden.device)
            for p in self.prune_at[layer]:
                alive = torch.nonzero(keep).flatten()
                vis_alive = visual[alive]
                m = int(vis_alive.sum())
                if m == 0:
                    continue
                signals = {f"{kind}@{l}": st.signals[(l, kind)][i, valid[alive]] for (l, kind) in st.signals}
                view = DecoderView(
                    hidden=hidden[i, valid[alive]],
                    visual=vis_alive,
                    image_id=st.image_id[i, orig[alive]],
                    signals=signals,
                    original_index=st.orig_index[i, orig[alive]],
                )
                n_keep = p.budget(m, layer)
                chosen = torch.as_tensor(p.select(layer, view, self.ctx), dtype=torch.long, device=hidden.device).flatten()
                _check(p.name, chosen, vis_alive, n_keep)
                drop = vis_alive.clone()
                drop[chosen] = False
                keep[alive[drop]] = False
            kept_local = valid[keep]
            rows.append(kept_local)
            idx_lists.append(cur[i, kept_local])
        width = max(r.numel() for r in rows)
        new_hidden = hidden.new_zeros((b, width, hidden.shape[-1]))
        new_index = torch.zeros((b, width), dtype=torch.long, device=hidden.device)
        new_keymask = torch.zeros((b, width), dtype=torch.bool, device=hidden.device)
        for i, (r, o) in enumerate(zip(rows, idx_lists)):
            s = width - r.numel()  # left padding
            new_hidden[i, s:] = hidden[i, r]
            new_index[i, s:] = o
            new_keymask[i, s:] = True
        st.cur_index, st.cur_keymask = new_index, new_keymask
        return new_hidden


def _check(name: str, chosen: Tensor, visual: Tensor, n_keep: int) -> None:
    if chosen.numel() != n_keep:
        raise RuntimeError(f"policy {name!r} kept {chosen.numel()} visual tokens, expected exactly {n_keep}")
    if torch.unique(chosen).numel() != chosen.numel():
        raise RuntimeError(f"policy {name!r} returned duplicate positions")
    if chosen.numel() and not bool(visual[chosen].all()):
        raise RuntimeError(f"policy {name!r} selected a non-visual (text) position")


