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

Position handling per pruning layer (``position_handling``). A policy may define
``position_handling(num_layers, family) -> {layer: "original" | "renumber"}`` for its pruning layers
(a policy without it, e.g. FastV or ToDRE stage 2, keeps the original positions at every layer it
prunes; policies pruning at the same layer must agree). At a ``"renumber"`` layer the surviving
tokens of each sample are numbered contiguously over its real tokens, starting at the position of
its first real token (0 for ``generate``'s numbering): that layer and every later one get the cos/sin
recomputed for those positions with the language model's own rotary module (``Adapter.rotary``) and
the same ``position_ids``. A later ``"original"`` prune keeps the (renumbered) positions of its
survivors. At decode, each such layer gets the cos/sin (and position ids) of ``P - shift`` for the
model's own position ``P`` of a new token, with ``shift`` (per sample) = the layer-0 next position
minus the layer's own next position after its prefill, i.e. the number of tokens removed before that
layer: ``L_full + t - (n_0 - n_{s+1})`` for TransPrune. Renumbering needs 1-D (B, L) positions; the
M-RoPE positions of Qwen cannot be renumbered (``ValueError``).

Signals (``DecoderPolicy.signal_layers`` maps a layer to one kind or a tuple of kinds) come from the
decoder signal registry (``vtprune/signals.py``: ``last_row``, ``post_visual_rows``,
``image_tokens_in``, ``key_l1``, ``final_norm``, the per-policy ``hidden_reduce`` / ``policy_rows``,
and the hooked ``attn_io``/``mlp_io`` reduced by the policy's ``reduce_io``); unknown kinds are a
``ValueError`` at ``patch()``. Attention-row kinds (``DecoderSignal.attention``) asked for layer ``l``
are computed at the input of ``Adapter.attention_layer_for(l)`` (hybrid LLMs: the last full-attention
layer at or before ``l``; none is a ``ValueError`` at ``patch()``) and stored under ``l``; read at an
earlier layer they are that layer's attention as it runs, i.e. after its own pruning (asked for the
layer itself, the kind's own timing below holds). Aligned kinds
are stored in LLM-input coordinates and gathered at each token's LLM-input index when a policy
selects, so the view always gets the values of its own tokens.
Signals are computed in the layer's pre-hook before its own pruning, except the ``after_prune`` kinds
(``policy_rows``), computed on the sequence the layer runs on. Attention kinds whose layer then runs on
that very sequence (no prune there, or ``after_prune``) are deferred to the layer's attention tap
(``Adapter.tap_llm_attention``): they read the q/k the layer computes instead of a second input norm,
projection and rotary pass (time in ``Patch.stats.tap_ms``); anything a tap did not take is computed
from the layer input before the next layer (``flush``). The budget of a sample is
``DecoderPolicy.budget_view(view, layer)``.

Key projections across a cut. A signal computed at a pruning layer before its cut (from the layer
input: TransPrune's and PyramidDrop's instruction rows) projects the uncut sequence with the layer's own
key projection; the layer's own call on the rows it keeps is then served those rows
(``vtprune/reuse.py``: only rows whose input is bitwise the projected one; the rest, e.g. padding,
projected by the module), so the kept rows are projected once. ``Patch.stats.reused_key_rows`` counts
them; ``patch(..., reuse_projections=False)`` projects them again.

Recycled tokens. ``select`` may return a :class:`~vtprune.policy.DecoderSelection`: besides the kept
positions, new hidden states, each taking the identity of one of the policy's dropped visual tokens
(its slot: LLM-input index, image, position unless renumbered). A recycled token sits at its slot, or
right after an anchor position the policy names (sequence order, then renumbering gives its position);
it is a visual token of the later layers like any other and its row of the shortened cache holds its
own keys and values.

Masks: each layer gets ``Adapter.layer_attention_mask(layer, key_mask, q, dtype)``: the 4-D mask of
the survivors, or for a Gated DeltaNet layer (Qwen3.5) its 2-D padding mask; such a layer's
convolution and recurrent states are then those of the shortened sequence, at prefill and decode. A
mask is built once per model forward for the layers of one token-mixer type that see the same keys
(the layers between two prunes), not once per layer.

State: the controller reads the patch's :class:`~vtprune.state.RequestState` (handed over at
construction) and writes only its :class:`~vtprune.state.DecoderState`.

``install()`` also installs the adapter's ``install_hooks(state)`` handles and removes them with its own:
the install/remove seam of adapters without an LLM (``clip_vit``: open_clip ViTs), whose work is done
by their own hooks rather than the VLM prefill path.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

from .attention import attention_probs
from .policy import DecoderPolicy, DecoderSelection, DecoderView
from .reuse import MIN_ROWS, ProjectionCapture, ServedProjection
from .rows import take_rows
from .signals import DECODER_SIGNALS, DecoderSignalInput
from .state import DecoderState, RequestState

POSITION_HANDLING = ("original", "renumber")


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


class DecoderController:
    """Owns the per-layer hooks of stage D and the per-layer token accounting."""

    def __init__(self, adapter, policies: list[DecoderPolicy], state: RequestState, *, reuse_projections: bool = True):
        self.adapter = adapter
        self.reuse_projections = reuse_projections
        self._served: ServedProjection | None = None
        self._forward = 0  # model forwards seen (layer 0 calls): masks are shared within one
        self._masks: dict[tuple, tuple] = {}
        self.policies = policies
        self.state = state
        self.config = adapter.language_model.config
        n = adapter.num_llm_layers()
        self.prune_at: dict[int, list[DecoderPolicy]] = {}
        # source layer -> [(kind, asked layer)]: attention rows may be read at an earlier layer (hybrid LLMs)
        self.signal_at: dict[int, list[tuple[str, int]]] = {}
        self.io_at: dict[tuple[int, str], DecoderPolicy] = {}
        self.signal_owner: dict[tuple[int, str], DecoderPolicy] = {}
        for p in policies:
            for l in p.pruning_layers(n):
                self.prune_at.setdefault(l, []).append(p)
            for l, kinds in p.signal_layers(n).items():
                for kind in (kinds,) if isinstance(kinds, str) else kinds:
                    sig = DECODER_SIGNALS.get(kind)
                    if sig is None:
                        raise ValueError(
                            f"{p.name}: unknown decoder signal {kind!r}; registered kinds: {', '.join(DECODER_SIGNALS)}"
                        )
                    if sig.module is not None:
                        other = self.io_at.setdefault((l, kind), p)
                        if other is not p:
                            raise ValueError(f"two policies request the {kind!r} signal of decoder layer {l}")
                    else:
                        if sig.per_policy:  # computed by the policy's own hooks: one owner per layer
                            other = self.signal_owner.setdefault((l, kind), p)
                            if other is not p:
                                raise ValueError(f"two policies request the {kind!r} signal of decoder layer {l}")
                        src = adapter.attention_layer_for(l) if sig.attention else l
                        if (kind, l) not in self.signal_at.setdefault(src, []):
                            self.signal_at[src].append((kind, l))
        self.first_prune = min(self.prune_at) if self.prune_at else None
        self.renumber_at = self._position_handling(n)
        self.handles = []
        self.tapped: set[int] = set()  # layers whose attention rows come from their own attention call

    @property
    def dec(self) -> DecoderState:
        return self.state.decoder

    def _position_handling(self, n_layers: int) -> set[int]:
        """The pruning layers after which positions are renumbered (see the module docstring)."""
        modes: dict[int, set[str]] = {}
        for p in self.policies:
            declared = dict(p.position_handling(n_layers, self.adapter.family))
            for l in p.pruning_layers(n_layers):
                mode = declared.get(l, "original")
                if mode not in POSITION_HANDLING:
                    raise ValueError(f"{p.name}: position handling {mode!r} at layer {l}; choose one of {POSITION_HANDLING}")
                modes.setdefault(l, set()).add(mode)
        for l, m in modes.items():
            if len(m) > 1:
                raise ValueError(f"policies pruning at decoder layer {l} disagree on positions: {sorted(m)}")
        return {l for l, m in modes.items() if m == {"renumber"}}

    def install(self) -> None:
        layers = self.adapter.llm_layers()
        for i, layer in enumerate(layers):
            self.handles.append(
                layer.register_forward_pre_hook(lambda m, a, k, i=i: self._pre(i, a, k), with_kwargs=True)
            )
        for (i, kind) in self.io_at:
            name = DECODER_SIGNALS[kind].module
            module = self.adapter.token_mixer(i) if name == "self_attn" else getattr(layers[i], name)
            self.handles.append(
                module.register_forward_hook(
                    lambda m, a, k, out, i=i, kind=kind: self._io(i, kind, a, k, out), with_kwargs=True
                )
            )
        self.handles.extend(self.adapter.install_hooks(self.state))  # clip_vit; Qwen3-VL DeepStack
        for src, items in self.signal_at.items():
            if any(DECODER_SIGNALS[kind].attention for kind, _ in items):
                h = self.adapter.tap_llm_attention(src, lambda m, q, k, lse, l=src: self._tapped(l, m, q, k))
                if h is not None:
                    self.handles.append(h)
                    self.tapped.add(src)

    def remove(self) -> None:
        self._end_serving()
        self._masks = {}
        for h in self.handles:
            h.remove()
        self.handles = []
        self.tapped = set()

    # -------------------------------------------------------------- key projections across a cut
    def _key_capture(self, layer: int, hidden: Tensor):
        """Records the layer's key projection of the uncut sequence while its signals are computed."""
        proj = self.adapter.llm_key_projection(layer) if self.reuse_projections else None
        return ProjectionCapture(proj, hidden.shape[:2]) if proj is not None else nullcontext()

    def _serve_keys(self, cap) -> None:
        """After the cut: serve the kept rows of the recorded projection to the layer's own call."""
        if not isinstance(cap, ProjectionCapture) or cap.outputs is None:
            return
        dec = self.dec
        rows = dec.last_rows
        if rows.numel() < MIN_ROWS or cap.inputs.shape[0] * cap.inputs.shape[1] < MIN_ROWS:
            return
        self._served = ServedProjection(cap.module, take_rows(cap.inputs, rows, 1), take_rows(cap.outputs, rows, 1),
                                        dec.cur_keymask).install()

    def _end_serving(self) -> None:
        """Take the served projection off its module (used or not) and count what it served."""
        served, self._served = self._served, None
        if served is not None:
            served.remove()
            self.dec.reused_key_rows += served.served_rows
            self.dec.reuse_ms += served.ms

    # -------------------------------------------------------------- the hook
    def _pre(self, layer: int, args: tuple, kwargs: dict):
        st = self.state
        if st.phase is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        self._end_serving()
        if layer == 0:
            self._forward += 1
        if st.phase == "prefill":
            self.flush(before=layer)
            return self._prefill(layer, hidden, args, kwargs)
        if st.phase == "decode" and self.first_prune is not None and layer >= self.first_prune:
            return self._decode(layer, hidden, args, kwargs)
        return None

    def _substitute(self, layer: int, kwargs: dict, *, mask: bool = True) -> None:
        """Replace the full-length tables of this layer by those of the surviving tokens (and its
        attention mask, unless ``mask`` is False)."""
        dec = self.dec
        idx = dec.cur_index
        if dec.cur_rope is not None:  # renumbered positions (recomputed tables)
            kwargs["position_embeddings"] = dec.cur_rope
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = dec.cur_pos
        else:
            cos, sin = dec.full_rope
            kwargs["position_embeddings"] = (take_rows(cos, idx, cos.dim() - 2), take_rows(sin, idx, sin.dim() - 2))
            pid = kwargs.get("position_ids")
            if pid is not None and pid.shape[-1] != dec.full_len:  # already gathered (pruning layer after a prune)
                pid = dec.full_pid
            if pid is not None and pid.shape[-1] == dec.full_len:
                kwargs["position_ids"] = take_rows(pid, idx, pid.dim() - 1)
        if mask:
            kwargs["attention_mask"] = self._mask(layer, dec.cur_keymask, idx.shape[1], dec.dtype, decode=False)

    def _mask(self, layer: int, keymask: Tensor, q: int, dtype: torch.dtype, *, decode: bool) -> Any:
        """The layer's attention mask for the keys ``keymask`` (B, L) bool (at decode followed by the new
        tokens): one build per model forward for the layers of one token-mixer type with these keys."""
        key = (type(self.adapter.token_mixer(layer)), q, dtype, decode)
        hit = self._masks.get(key)
        if hit is not None and hit[0] is keymask and hit[1] == self._forward:
            return hit[2]
        full = torch.cat([keymask, self.state.decode_tail(q).to(keymask.dtype)], dim=1) if decode else keymask
        mask = self.adapter.layer_attention_mask(layer, full, q, dtype)
        self._masks[key] = (keymask, self._forward, mask)
        return mask

    def _full_positions(self, hidden: Tensor, kwargs: dict) -> Tensor:
        """(B, L) positions of the layer-0 input (the model's own ``position_ids``, else arange)."""
        b, n = hidden.shape[:2]
        pid = kwargs.get("position_ids")
        if pid is None:
            pid = torch.arange(n, device=hidden.device)[None]
        if pid.dim() != 2:
            raise ValueError(
                "renumbering positions inside the decoder needs 1-D (batch, sequence) position ids; "
                f"this model uses {pid.dim()}-D positions (M-RoPE): use positions='original'"
            )
        return pid.to(hidden.device).long().expand(b, n)

    def _renumber(self, layer: int, hidden: Tensor, prev_pos: Tensor) -> None:
        """Positions (and rotary tables) of the sequence just pruned at ``layer``."""
        dec = self.dec
        km = dec.cur_keymask
        pos = torch.gather(prev_pos, 1, dec.last_rows)
        if layer in self.renumber_at:  # contiguous over the real tokens, from the first one's position
            base = pos.masked_fill(~km, torch.iinfo(pos.dtype).max).amin(-1, keepdim=True)
            pos = base + km.long().cumsum(-1) - 1
        pos = pos.masked_fill(~km, 0)
        dec.cur_pos = pos
        dec.cur_rope = self.adapter.rotary(hidden, pos)
        # decode shift: the model numbers new tokens after the layer-0 prefill; this layer after its own
        dec.pos_shift = dec.full_next - (pos.masked_fill(~km, -1).amax(-1) + 1)

    def _start_prefill(self, hidden: Tensor, kwargs: dict) -> None:
        """Layer 0 of a prefill: record the full-length tables the later layers gather from."""
        dec = self.dec
        dec.full_rope = kwargs["position_embeddings"]
        dec.full_pid = kwargs.get("position_ids")
        dec.full_len = hidden.shape[1]
        dec.dtype = hidden.dtype
        dec.budget_clamped = [False] * hidden.shape[0]
        if self.renumber_at:
            dec.full_pos = self._full_positions(hidden, kwargs)
            dec.full_next = dec.full_pos.masked_fill(~self.state.prefill.mask.bool(), -1).amax(-1) + 1

    def _prefill(self, layer: int, hidden: Tensor, args: tuple, kwargs: dict):
        dec = self.dec
        changed = False
        if layer == 0:
            self._start_prefill(hidden, kwargs)
        if dec.cur_index is not None:  # at a pruning layer the signals read these tables, not the mask
            self._substitute(layer, kwargs, mask=layer not in self.prune_at)
            changed = True
        with (self._key_capture(layer, hidden) if layer in self.prune_at else nullcontext()) as cap:
            self._signals(layer, hidden, kwargs, after_prune=False)
        if layer in self.prune_at:
            prev_pos = None
            if self.renumber_at:  # positions of the sequence entering this layer
                if dec.cur_pos is not None:
                    prev_pos = dec.cur_pos
                elif dec.cur_index is not None:
                    prev_pos = torch.gather(dec.full_pos, 1, dec.cur_index)
                else:
                    prev_pos = dec.full_pos
            hidden = self._prune(layer, hidden)
            self._serve_keys(cap)
            if prev_pos is not None and (layer in self.renumber_at or dec.cur_pos is not None):
                self._renumber(layer, hidden, prev_pos)
            self._substitute(layer, kwargs)
            changed = True
        self._signals(layer, hidden, kwargs, after_prune=True)
        if dec.cur_pos is not None:
            dec.layer_pos_shift[layer] = dec.pos_shift
        if dec.cur_index is not None:
            dec.layer_keymask[layer] = dec.cur_keymask
        self.state.record_layer()
        if not changed:
            return None
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _decode(self, layer: int, hidden: Tensor, args: tuple, kwargs: dict):
        dec = self.dec
        keymask = dec.layer_keymask.get(layer)
        if keymask is None:
            return None
        q = hidden.shape[1]
        kwargs["attention_mask"] = self._mask(layer, keymask, q, hidden.dtype, decode=True)
        shift = dec.layer_pos_shift.get(layer)
        if shift is not None:  # renumbered layer: the model's position minus the tokens removed before it
            pid = kwargs.get("position_ids")
            if pid is None:
                pid = (dec.full_next + self.state.decoded)[:, None] + torch.arange(q, device=hidden.device)[None]
            pos = pid.to(shift.device).long() - shift[:, None]
            kwargs["position_embeddings"] = self.adapter.rotary(hidden, pos)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = pos
        return args, kwargs

    # -------------------------------------------------------------- signals and pruning
    def _current_keymask(self) -> Tensor:
        dec = self.dec
        return dec.cur_keymask if dec.cur_index is not None else self.state.prefill.mask.bool()

    def _current_visual(self) -> Tensor:
        dec, pre = self.dec, self.state.prefill
        if dec.cur_index is None:
            return pre.visual & pre.mask.bool()
        return torch.gather(pre.visual, 1, dec.cur_index) & dec.cur_keymask

    def _to_input_coords(self, values: Tensor) -> Tensor:
        """(B, L_cur) values on the current sequence -> (B, L_in) at the LLM-input positions (0 elsewhere)."""
        dec = self.dec
        if dec.cur_index is None:
            return values
        b = values.shape[0]
        out = values.new_zeros((b, dec.full_len + 1))
        idx = torch.where(dec.cur_keymask, dec.cur_index, dec.full_len)  # padding -> a dummy column
        out.scatter_(1, idx, values)
        return out[:, :-1]

    def _signals(self, layer: int, hidden: Tensor, kwargs: dict, *, after_prune: bool) -> None:
        for kind, asked in self.signal_at.get(layer, []):
            sig = DECODER_SIGNALS[kind]
            # rows asked for a later layer stand for the attention this layer computes: after its own cut
            if (sig.after_prune or asked != layer) == after_prune:
                inp = self._signal_input(layer, hidden, kwargs, self.signal_owner.get((asked, kind)))
                # the layer's own attention runs on this very sequence unless it prunes before it:
                # then its tap hands over the q/k it computes instead of a second norm + projections
                if sig.attention and layer in self.tapped and (after_prune or layer not in self.prune_at):
                    self.dec.pending.setdefault(layer, []).append((kind, asked, inp))
                else:
                    self.dec.signals[(asked, kind)] = sig.fn(inp)

    def _tapped(self, layer: int, module, q: Tensor, k: Tensor) -> None:
        """The tap of ``layer``'s attention at prefill: its pending signals from the q (B, H, L, hd) and
        k (B, Hkv, L, hd) the layer computed (a cache holding earlier tokens: recomputed instead)."""
        jobs = self.dec.pending.pop(layer, None)
        if not jobs:
            return
        cuda = q.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(q.device)
        t0 = time.perf_counter()
        for kind, asked, inp in jobs:
            n = inp.hidden.shape[1]
            if q.shape[2] == n and k.shape[2] == n:
                inp.attention_rows = lambda rows, km=inp.key_mask: _rows_from(q, k, module.scaling, rows, km)
            self.dec.signals[(asked, kind)] = DECODER_SIGNALS[kind].fn(inp)
        if cuda:
            torch.cuda.synchronize(q.device)
        self.dec.tap_ms += (time.perf_counter() - t0) * 1e3

    def flush(self, before: int | None = None) -> None:
        """Compute (from the layer input) the pending signals of layers before ``before`` (all when
        None) whose attention call did not run; at the end of a prefill (``before`` None) also take off
        a served key projection."""
        if before is None:
            self._end_serving()
        for layer in [l for l in self.dec.pending if before is None or l < before]:
            for kind, asked, inp in self.dec.pending.pop(layer):
                self.dec.signals[(asked, kind)] = DECODER_SIGNALS[kind].fn(inp)

    def _aligned_current(self) -> dict[str, Tensor]:
        """The aligned signals computed so far, gathered to the current sequence (``"kind@layer"``)."""
        dec = self.dec
        km = self._current_keymask()
        idx = dec.cur_index if dec.cur_index is not None else torch.arange(km.shape[1], device=km.device)[None].expand_as(km)
        return {f"{k}@{l}": torch.gather(v, 1, idx) for (l, k), v in dec.signals.items() if DECODER_SIGNALS[k].aligned}

    def _signal_input(self, layer: int, hidden: Tensor, kwargs: dict, policy=None) -> DecoderSignalInput:
        pre = self.state.prefill
        keymask = self._current_keymask()
        pos_emb = kwargs["position_embeddings"]
        ad = self.adapter

        def keys() -> Tensor:
            rope = ad.sample_rotary(hidden, pos_emb, kwargs.get("position_ids"), keymask)
            return ad.llm_keys(layer, hidden, rope)

        return DecoderSignalInput(
            layer=layer,
            hidden=hidden,
            position_embeddings=pos_emb,
            key_mask=keymask,
            visual=self._current_visual(),
            input_visual=pre.visual & pre.mask.bool(),
            input_image_id=pre.image_id,
            attention_rows=lambda rows: self.adapter.llm_attention_rows(layer, hidden, pos_emb, rows, keymask),
            to_input_coords=self._to_input_coords,
            keys=keys,
            final_norm=lambda: ad.llm_final_norm(hidden),
            rope_scores=lambda rows: ad.llm_rope_scores(layer, hidden, pos_emb, rows),
            aligned=self._aligned_current,
            policy=policy,
        )

    def _io(self, layer: int, kind: str, args: tuple, kwargs: dict, output):
        """Forward hook of ``self_attn``/``mlp``: reduce (input, output) with the policy, at prefill."""
        if self.state.phase != "prefill":
            return None
        x_in = args[0] if args else kwargs["hidden_states"]
        x_out = output[0] if isinstance(output, tuple) else output
        p = self.io_at[(layer, kind)]
        val = p.reduce_io(layer, kind, x_in, x_out, self._current_keymask(), self._current_visual())
        self.dec.signals[(layer, kind)] = self._to_input_coords(val)
        return None

    def _prune(self, layer: int, hidden: Tensor) -> Tensor:
        dec, pre = self.dec, self.state.prefill
        ctx = self.state.context
        b = hidden.shape[0]
        keymask = self._current_keymask()
        cur = dec.cur_index if dec.cur_index is not None else torch.arange(hidden.shape[1], device=hidden.device)[None].expand(b, -1)
        rows, idx_lists, recycled = [], [], []
        for i in range(b):
            valid = torch.nonzero(keymask[i]).flatten()
            orig = cur[i, valid]
            visual = pre.visual[i, orig]
            keep = torch.ones(valid.numel(), dtype=torch.bool, device=hidden.device)
            extra = []  # recycled tokens: (feature (D,), slot row, order key)
            for p in self.prune_at[layer]:
                alive = torch.nonzero(keep).flatten()
                vis_alive = visual[alive]
                m = int(vis_alive.sum())
                if m == 0:
                    continue
                signals = {
                    f"{kind}@{l}": t[i, orig[alive]] if DECODER_SIGNALS[kind].aligned else t[i, valid[alive]]
                    for (l, kind), t in dec.signals.items()
                }
                view = DecoderView(
                    hidden=hidden[i].index_select(0, valid[alive]),  # row copies (faster than indexing)
                    visual=vis_alive,
                    image_id=pre.image_id[i, orig[alive]],
                    signals=signals,
                    original_index=pre.orig_index[i, orig[alive]],
                )
                dec.budget_clamped[i] |= p.budget_clamped(m)
                n_keep = p.budget_view(view, layer)
                sel = p.select(layer, view, ctx)
                chosen = torch.as_tensor(sel.keep if isinstance(sel, DecoderSelection) else sel, dtype=torch.long,
                                         device=hidden.device).flatten()
                _check(p.name, chosen, vis_alive, n_keep)
                drop = vis_alive.clone()
                drop[chosen] = False
                keep[alive[drop]] = False
                if isinstance(sel, DecoderSelection) and sel.recycled is not None:
                    extra.extend(_recycled(p.name, sel, drop, valid[alive]))
            kept_local = valid[keep]
            if extra:  # recycled tokens join at their slot, or right after their anchor (sequence order)
                keys = torch.cat([2 * kept_local, torch.tensor([k for _, _, k in extra], device=hidden.device)])
                order = torch.sort(keys, stable=True).indices
                slots = torch.tensor([r for _, r, _ in extra], dtype=torch.long, device=hidden.device)
                kept_local = torch.cat([kept_local, slots])[order]
                is_new = torch.cat([torch.zeros(keys.numel() - len(extra), dtype=torch.bool, device=hidden.device),
                                    torch.ones(len(extra), dtype=torch.bool, device=hidden.device)])[order]
                feats = torch.stack([f for f, _, _ in extra]).to(hidden.dtype)
                recycled.append((i, torch.nonzero(is_new).flatten(), feats[order[is_new] - (keys.numel() - len(extra))]))
            rows.append(kept_local)
            idx_lists.append(cur[i, kept_local])
        width = max(r.numel() for r in rows)
        if all(r.numel() == width for r in rows):  # no repacking: every row of the output is a kept row
            new_hidden = hidden.new_empty((b, width, hidden.shape[-1]))
        else:
            new_hidden = hidden.new_zeros((b, width, hidden.shape[-1]))
        new_index = torch.zeros((b, width), dtype=torch.long, device=hidden.device)
        new_keymask = torch.zeros((b, width), dtype=torch.bool, device=hidden.device)
        new_rows = torch.zeros((b, width), dtype=torch.long, device=hidden.device)
        for i, (r, o) in enumerate(zip(rows, idx_lists)):
            s = width - r.numel()  # left padding
            torch.index_select(hidden[i], 0, r, out=new_hidden[i, s:])
            new_index[i, s:] = o
            new_keymask[i, s:] = True
            new_rows[i, s:] = r
        for i, where, feats in recycled:  # recycled tokens: their own hidden states in their slots' rows
            new_hidden[i, width - rows[i].numel() + where] = feats
        dec.cur_index, dec.cur_keymask = new_index, new_keymask
        dec.last_rows = new_rows  # (B, L') rows of the previous sequence kept (0 on padding)
        return new_hidden


def _rows_from(q: Tensor, k: Tensor, scaling: float, rows: Tensor, key_mask: Tensor) -> Tensor:
    """(B, H, R, L) fp32 causal + padding-masked probabilities of query rows ``rows`` (B, R) from a
    layer's own q (B, H, L, hd) and k (B, Hkv, L, hd)."""
    qr = torch.gather(q, 2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
    return attention_probs(qr, k, scaling, key_mask=key_mask, query_index=rows, chunk_heads=4)


def _recycled(name: str, sel: DecoderSelection, dropped: Tensor, rows: Tensor) -> list:
    """(feature, slot row, order key) of each recycled token of ``sel``; ``dropped`` (n,) bool over the
    view, ``rows`` (n,) the view's rows in the current sequence."""
    slots = torch.as_tensor(sel.slots, dtype=torch.long, device=rows.device).flatten()
    feats = sel.recycled
    if feats.dim() != 2 or feats.shape[0] != slots.numel():
        raise RuntimeError(f"policy {name!r} returned {feats.shape[0]} recycled tokens for {slots.numel()} slots")
    if torch.unique(slots).numel() != slots.numel() or (slots.numel() and not bool(dropped[slots].all())):
        raise RuntimeError(f"policy {name!r}: recycled tokens need distinct slots among its dropped visual tokens")
    if sel.after is None:
        keys = 2 * rows[slots]
    else:
        after = torch.as_tensor(sel.after, dtype=torch.long, device=rows.device).flatten()
        keys = 2 * torch.where(after >= 0, rows[after.clamp(min=0)], torch.full_like(after, -1)) + 1
    return [(feats[j], int(rows[slots[j]]), int(keys[j])) for j in range(slots.numel())]


def _check(name: str, chosen: Tensor, visual: Tensor, n_keep: int) -> None:
    if chosen.numel() != n_keep:
        raise RuntimeError(f"policy {name!r} kept {chosen.numel()} visual tokens, expected exactly {n_keep}")
    if torch.unique(chosen).numel() != chosen.numel():
        raise RuntimeError(f"policy {name!r} returned duplicate positions")
    if chosen.numel() and not bool(visual[chosen].all()):
        raise RuntimeError(f"policy {name!r} selected a non-visual (text) position")


