"""``vtprune.patch(model, method, **params) -> Patch``: the reversible one-line patch.

A :class:`Patch` installs forward pre-hooks only (no attribute of the model is replaced, no upstream
forward code is copied): one on the model itself, which at prefill encodes the images through the
adapter, lets stage-V/P policies choose, and hands the model a shortened ``input_ids`` with the
reduced precomputed features (``mm_encoder_outputs``), mask and positions; and, with stage-D
policies, one per decoder layer (see :mod:`vtprune.decoder`). At decode steps the model-level hook
translates ``generate``'s full-length mask and positions into the shortened coordinates.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import registry
from .adapters import get_adapter
from .adapters.base import ShortInputs
from .decoder import DecoderController
from .policy import Context, DecoderPolicy, ImageTokens, Policy, TokenPolicy, VisionPolicy
from .schedule import TokenSchedule
from .signals import TEXT_SIGNALS, SampleText
from .state import PrefillState, RequestState, SampleAccounting

_ACTIVE_ATTR = "_vtprune_patch"
_NO_PREENCODE_ATTR = "_supports_mm_encoder_outputs"


def _no_pre_encoding() -> bool:
    return False


def _now(like: Tensor) -> float:
    """``time.perf_counter()``, after the queued GPU work when ``like`` lives on CUDA."""
    if like.is_cuda:
        torch.cuda.synchronize(like.device)
    return time.perf_counter()


@dataclass
class PatchStats:
    """Stats of the last request. ``schedules`` has one :class:`TokenSchedule` per sample.

    Attributes:
        schedules: per sample, the tokens each stage processed (what ``count_flops`` reads).
        select_ms / vision_ms: wall time of the stage-P selection / of the vision side.
        visual_tokens_per_image / visual_tokens_in_per_image: per image, visual tokens at the LLM
            input with / without the patch (items in request order: the images, then the videos;
            ``modality_per_image`` says which).
        vision_tokens_per_layer: per encoder view, the tokens entering each encoder layer.
        kept_index_per_image: per image, the kept native token indices in emission order.
        llm_kept_index: (B, L_last) LLM-input index of the tokens in the last decoder layers (-1 on
            padding), when stage D pruned; else None.
        budget_clamped: per image, True when an int stage-P budget exceeded the image's candidate
            tokens (dynamic-resolution models), so the image kept all of them.
        decoder_budget_clamped: per sample, True when an int stage-D budget exceeded its visual tokens.
        modality_per_image: per item, ``"image"`` or ``"video"``.
        tap_ms: wall time of the decoder signals computed inside the layers' own (tapped) attention
            calls at prefill; part of the LLM prefill time, reported so that it counts as overhead.
        reused_key_rows / reuse_ms: key-projection rows the pruning layers were served from the
            projection their signals had already computed before the cut (``reuse_projections``;
            ``vtprune/decoder.py``), and the wall time of serving them (counted as overhead too).
    """

    schedules: list[TokenSchedule] = field(default_factory=list)
    select_ms: float = 0.0
    vision_ms: float = 0.0
    visual_tokens_per_image: list[int] = field(default_factory=list)
    visual_tokens_in_per_image: list[int] = field(default_factory=list)
    vision_tokens_per_layer: list[list[int]] = field(default_factory=list)
    kept_index_per_image: list[Tensor] = field(default_factory=list)
    llm_kept_index: Tensor | None = None
    budget_clamped: list[bool] = field(default_factory=list)
    decoder_budget_clamped: list[bool] = field(default_factory=list)
    modality_per_image: list[str] = field(default_factory=list)
    tap_ms: float = 0.0
    reused_key_rows: int = 0
    reuse_ms: float = 0.0

    @property
    def llm_tokens_per_layer(self) -> list[list[int]]:
        return [s.llm_tokens_per_layer for s in self.schedules]


@dataclass
class _Selection:
    """Stage V/P result of one prefill: per sample the kept placeholder columns, per image the rest."""

    kept_cols: list[list[Tensor]]  # per sample, per image: (n_out,) columns of the kept tokens, ascending
    features: list[Tensor]  # per image: (n_out, D) features in sequence order
    kept_index: list[Tensor]  # per image: native token index of each emitted token
    n_in: list[int]
    n_out: list[int]
    clamped: list[bool]


@dataclass
class _Packed:
    """The shortened LLM input: per sample the kept columns of the caller's input, repacked."""

    cols: Tensor  # (B, L') column in the caller's input, 0 on padding
    valid: Tensor  # (B, L') bool

    def gather(self, t: Tensor, pad) -> Tensor:
        """(…, B, L) -> (…, B, L') at the kept columns, ``pad`` elsewhere."""
        b, width = self.cols.shape
        lead = [1] * (t.dim() - 2)
        idx = self.cols.view(*lead, b, width).expand(*t.shape[:-1], width)
        out = torch.gather(t, -1, idx)
        return out.masked_fill(~self.valid.view(*lead, b, width), pad)


class Patch:
    """Handle of an installed patch: a context manager; :meth:`remove` restores the model exactly."""

    def __init__(self, model: nn.Module, policies: list[Policy], adapter, *, seed: int = 0,
                 reuse_projections: bool = True):
        self.model = model
        self.policies = policies
        self.adapter = adapter
        self.seed = seed
        self.vision_policies = [p for p in policies if isinstance(p, VisionPolicy)]
        self.token_policies = [p for p in policies if isinstance(p, TokenPolicy)]
        self.decoder_policies = [p for p in policies if isinstance(p, DecoderPolicy)]
        self.stats = PatchStats()
        self._state = RequestState()
        self._handles: list = []
        # built here, installed by _install: a policy's bad decoder signal fails before any hook exists
        self._decoder: DecoderController | None = DecoderController(adapter, self.decoder_policies, self._state,
                                                                    reuse_projections=reuse_projections)
        self._signals: dict[str, Any] = {}
        for p in self.vision_policies + self.token_policies:
            self._signals.update(p.required_signals(adapter))
        self._forward_params = list(inspect.signature(model.forward).parameters)

    # ---------------------------------------------------------------- lifecycle
    def _install(self) -> None:
        if getattr(self.model, _ACTIVE_ATTR, None) is not None:
            raise ValueError("this model is already patched by vtprune; call .remove() on the existing patch first")
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._model_post_hook, with_kwargs=True))
        self._decoder.install()
        object.__setattr__(self.model, _ACTIVE_ATTR, self)
        # transformers >= 5 pre-encodes images in generate() and hands the forward only the features;
        # vtprune must see the pixels (it encodes them itself, with signals), so while patched the
        # model reports that it does not take pre-encoded features. Removed by remove().
        if hasattr(self.model, "_supports_mm_encoder_outputs"):
            object.__setattr__(self.model, _NO_PREENCODE_ATTR, _no_pre_encoding)

    def remove(self) -> None:
        """Remove every hook and attribute; the model is then identical to a never-patched one."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._decoder is not None:
            self._decoder.remove()
            self._decoder = None
        if getattr(self.model, _ACTIVE_ATTR, None) is self:
            object.__delattr__(self.model, _ACTIVE_ATTR)
            if self.model.__dict__.get(_NO_PREENCODE_ATTR) is _no_pre_encoding:
                object.__delattr__(self.model, _NO_PREENCODE_ATTR)
        self._state.reset()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        spec = " + ".join(p.spec() for p in self.policies)
        return f"Patch({type(self.model).__name__}, {spec!r}, active={self.active})"

    def new_context(self) -> Context:
        """A fresh :class:`Context` for one request (family and seed of this patch)."""
        return Context(family=self.adapter.family, seed=self.seed)

    # ---------------------------------------------------------------- the model-level hook
    def _model_pre_hook(self, module, args, kwargs):
        if args:  # positional call: bind to names
            kwargs = dict(kwargs)
            for name, value in zip(self._forward_params, args):
                kwargs[name] = value
            args = ()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None else 0  # hybrid caches return a 0-d tensor
        st = self._state
        if past == 0:
            st.reset()
            if not self.adapter.has_images(kwargs):
                mm = kwargs.get("mm_encoder_outputs") or {}
                if mm.get("image") is not None or mm.get("video") is not None:
                    raise ValueError(
                        "a vtprune-patched model needs the raw image inputs (pixel_values), not pre-encoded "
                        "`mm_encoder_outputs`: pass the processor output to the model / generate()"
                    )
                return args, kwargs
            kwargs = self._prefill(kwargs)
            st.phase = "prefill"
            return args, kwargs
        if not st.active:
            return args, kwargs
        return args, self._decode(kwargs, past)

    def _model_post_hook(self, module, args, kwargs, output):
        st = self._state
        if st.phase == "prefill":
            self._finish_stats()
        elif st.phase == "decode":
            ids = kwargs.get("input_ids")
            st.decoded += ids.shape[1] if ids is not None else 1
            for sched in self.stats.schedules:  # the prefill's token + one per decode step so far
                sched.new_tokens = st.decoded + 1
        if st.active:
            st.phase = "between"
        return output

    # ---------------------------------------------------------------- prefill
    def _prefill(self, kwargs: dict) -> dict:
        """Encode, select, repack and hand the model the shortened inputs (the steps below)."""
        ids, mask_in, mask = self._prefill_inputs(kwargs)
        ad = self.adapter
        pos_full = ad.full_positions(kwargs, ids, mask_in)
        ctx = self._request_context(ids, mask)
        t0 = _now(ids)
        vision_signals = {k: v for k, v in self._signals.items() if k not in TEXT_SIGNALS}
        images, vision_sched = ad.encode(kwargs, vision_signals, self.vision_policies, ctx)
        t1 = _now(ids)
        spans = self._image_spans(ids, mask, images)
        self._attach_text_signals(images, spans, ids, mask)
        sel = self._select(images, spans, ids.shape[0], ctx)
        t2 = _now(ids)
        packed = self._pack(ids, mask, sel.kept_cols)
        new_ids = packed.gather(ids, self._pad_id(ids, mask))
        new_mask = packed.valid.to(mask.dtype)
        mode = self._position_mode()
        if mode == "renumber":
            new_pos = ad.renumber_positions(kwargs, new_mask)
        else:
            new_pos = packed.gather(pos_full, 0) if pos_full is not None else None
        need_mask = mask_in is not None or not bool(packed.valid.all())
        out = ad.build_inputs(kwargs, ShortInputs(
            input_ids=new_ids,
            attention_mask=new_mask if need_mask else None,
            position_ids=new_pos,
            features=sel.features,
            gather=packed.gather,
            modalities=[img.modality for img in images],
            items=images,
            kept_index=sel.kept_index,
        ))
        self._record_prefill(ids, mask, pos_full, packed, new_ids, new_mask, new_pos, mode, sel, ctx)
        self._record_accounting(images, spans, vision_sched, ids.shape[0])
        self.stats = PatchStats(
            select_ms=(t2 - t1) * 1e3,
            vision_ms=(t1 - t0) * 1e3,
            visual_tokens_per_image=sel.n_out,
            visual_tokens_in_per_image=sel.n_in,
            kept_index_per_image=sel.kept_index,
            budget_clamped=sel.clamped,
            modality_per_image=[img.modality for img in images],
        )
        return out

    @staticmethod
    def _prefill_inputs(kwargs: dict) -> tuple[Tensor, Tensor | None, Tensor]:
        """``(input_ids, the caller's mask or None, a 2-D mask)``; ``ValueError`` on unusable inputs."""
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("vtprune needs `input_ids` (with the image placeholder tokens), not `inputs_embeds`")
        mask_in = kwargs.get("attention_mask")
        mask = mask_in if mask_in is not None else torch.ones_like(ids)
        if mask.dim() != 2:
            raise ValueError("vtprune needs a 2-D attention_mask (batch, sequence) at prefill")
        return ids, mask_in, mask

    def _request_context(self, ids: Tensor, mask: Tensor) -> Context:
        """The request's Context; with a fixed token count per view, the per-view random keys."""
        ctx = self.new_context()
        n_nom = self.adapter.nominal_visual_tokens()
        if n_nom:  # image index within its sample, for per-view seeding of stage-V policies
            counts = ((ids == self.adapter.image_token_id) & mask.bool()).sum(1) // n_nom
            ctx.view_keys = [k for c in counts.tolist() for k in range(c)]
        self._state.context = ctx
        return ctx

    def _attach_text_signals(self, images: list[ImageTokens], spans: list[tuple[int, Tensor]], ids: Tensor,
                             mask: Tensor) -> None:
        """Hand every image the text signals the policies requested, computed once per sample."""
        kinds = [k for k in self._signals if k in TEXT_SIGNALS]
        if not kinds:
            return
        per_sample: dict[int, dict[str, Any]] = {}
        for img, (sample, _) in zip(images, spans):
            if sample not in per_sample:
                text = SampleText(ids[sample], mask[sample].bool(), self.adapter.image_token_id,
                                  self.adapter.text_embeddings)
                per_sample[sample] = {k: TEXT_SIGNALS[k](text) for k in kinds}
            img.signals.update(per_sample[sample])

    def _select(self, images: list[ImageTokens], spans: list[tuple[int, Tensor]], b: int, ctx: Context) -> _Selection:
        """Run the stage-P policies on every image and place the kept tokens at placeholder columns."""
        sel = _Selection(kept_cols=[[] for _ in range(b)], features=[], kept_index=[], n_in=[], n_out=[], clamped=[])
        emit_in_order = not all(p.sorted_output for p in self.vision_policies + self.token_policies)
        per_sample = [0] * b
        for img, (sample, cols) in zip(images, spans):
            img.sample_index = sample
            img.index_in_sample = per_sample[sample]
            per_sample[sample] += 1
            order = torch.arange(img.num_tokens)
            cur = img
            clamped = False
            for p in self.token_policies:
                clamped |= p.budget_clamped(cur, ctx.family)
                o, feats = p.run(cur, ctx)  # per frame of a video with quota="frame"
                cur = cur.subset(o, feats)
                order = order[o]
            slot = img.placeholder_index  # stage V: which placeholder each token fills
            slot = order if slot is None else slot[order]
            img_cols = cols[slot.to(cols.device)]
            if emit_in_order:  # the policies' order is the sequence order; slots stay sorted
                perm = torch.arange(img_cols.numel(), device=img_cols.device)
                sel.kept_cols[sample].append(torch.sort(img_cols).values)
            else:
                perm = torch.argsort(img_cols)
                sel.kept_cols[sample].append(img_cols[perm])
            sel.features.append(cur.features[perm.to(cur.features.device)])
            sel.kept_index.append(order[perm.cpu()])
            sel.n_in.append(int(cols.numel()))
            sel.n_out.append(cur.num_tokens)
            sel.clamped.append(clamped)
        return sel

    def _pack(self, ids: Tensor, mask: Tensor, kept_cols: list[list[Tensor]]) -> _Packed:
        """Text columns + kept image columns per sample, repacked with the caller's padding side."""
        b = ids.shape[0]
        is_img = _visual_mask(ids, self.adapter)
        seqs = []
        for i in range(b):
            base = torch.nonzero(mask[i].bool() & ~is_img[i]).flatten()
            cols = torch.cat([base] + kept_cols[i]) if kept_cols[i] else base
            seqs.append(torch.sort(cols).values)
        left = bool((mask[:, 0] == 0).any()) or not bool((mask[:, -1] == 0).any())
        width = max(s.numel() for s in seqs)
        cols = torch.zeros((b, width), dtype=torch.long, device=ids.device)
        valid = torch.zeros((b, width), dtype=torch.bool, device=ids.device)
        for i, s in enumerate(seqs):
            sl = slice(width - s.numel(), width) if left else slice(0, s.numel())
            cols[i, sl] = s
            valid[i, sl] = True
        return _Packed(cols, valid)

    def _pad_id(self, ids: Tensor, mask: Tensor) -> int:
        pads = ids[mask == 0]
        return int(pads[0]) if pads.numel() else _config_pad_id(self.model.config)

    def _record_prefill(self, ids, mask, pos_full, packed: _Packed, new_ids, new_mask, new_pos, mode: str,
                        sel: _Selection, ctx: Context) -> None:
        """Write the request's :class:`PrefillState` (read by stage D and the decode steps)."""
        b, width = packed.cols.shape
        img_id = torch.full((b, width), -1, dtype=torch.long, device=ids.device)
        for i in range(b):
            for k, c in enumerate(sel.kept_cols[i]):
                img_id[i, torch.isin(packed.cols[i], c) & packed.valid[i]] = k
        full_next = _next_position(pos_full, mask)
        if new_pos is not None:
            next_pos = _next_position(new_pos, new_mask)
            pos_offset = full_next - next_pos
        else:
            next_pos = new_mask.long().sum(-1) if mode == "renumber" else full_next
            pos_offset = torch.zeros(b, dtype=torch.long, device=ids.device)
        st = self._state
        st.prefill = PrefillState(
            full_len_in=ids.shape[1],
            mask=new_mask,
            visual=_visual_mask(new_ids, self.adapter) & packed.valid,
            image_id=img_id,
            orig_index=packed.cols,
            positions=new_pos,
            renumber=mode == "renumber",
            next_pos=next_pos,
            pos_offset=pos_offset,
        )
        if new_pos is not None:
            self.adapter.after_prefill(st.prefill)

    def _record_accounting(self, images: list[ImageTokens], spans, vision_sched: list[list[int]], b: int) -> None:
        """Per sample: the encoder schedule of each of its views, projector tokens, attention windows."""
        acc = SampleAccounting(
            image_samples=[s for s, _ in spans],
            vision_schedule=vision_sched,
            views=[[] for _ in range(b)],
            projector_tokens=[0] * b,
            windows=[[] for _ in range(b)],
        )
        v0 = 0
        for img, (sample, _) in zip(images, spans):
            acc.views[sample].extend(vision_sched[v0 : v0 + img.n_views])
            v0 += img.n_views
            acc.projector_tokens[sample] += img.projector_tokens if img.projector_tokens is not None else img.num_tokens
            if img.vision_windows is not None:  # per vision block, segment lengths (Qwen)
                win = acc.windows[sample]
                win.extend([[] for _ in range(len(img.vision_windows) - len(win))])
                for blk, segs in enumerate(img.vision_windows):
                    win[blk].extend(segs)
        self._state.accounting = acc

    def _position_mode(self) -> str:
        modes = {p.positions for p in self.token_policies} - {"auto"}
        if len(modes) > 1:
            raise ValueError(f"composed policies disagree on positions: {sorted(modes)}")
        mode = modes.pop() if modes else self.adapter.default_positions
        if not self.token_policies and not self.vision_policies:
            mode = "original"  # nothing shortened before the LLM
        return mode

    def _image_spans(self, ids: Tensor, mask: Tensor, images: list[ImageTokens]) -> list[tuple[int, Tensor]]:
        """Assign each image (or video) its placeholder columns: (sample index, (n_i,) columns).

        Each modality fills its own placeholder token in order, as the model scatters its features:
        the k-th image of the request takes the next image placeholders, videos likewise
        (``Adapter.visual_token_ids``).
        """
        spans: list = [None] * len(images)
        for modality, token_id in self.adapter.visual_token_ids().items():
            queue = [k for k, img in enumerate(images) if img.modality == modality]
            n_items = len(queue)
            is_tok = (ids == token_id) & mask.bool()
            for i in range(ids.shape[0]):
                cols = torch.nonzero(is_tok[i]).flatten()
                start = 0
                while start < cols.numel():
                    if not queue:
                        raise ValueError(f"more {modality} placeholder tokens than {modality} features; "
                                         "check the processor output")
                    k = queue.pop(0)
                    n = images[k].n_placeholders if images[k].n_placeholders is not None else images[k].num_tokens
                    if start + n > cols.numel():
                        raise ValueError(
                            f"{modality} {k} has {n} features but sample {i} has only {cols.numel() - start} "
                            "placeholders left; check the processor output"
                        )
                    spans[k] = (i, cols[start : start + n])
                    start += n
            if queue:
                raise ValueError(f"{n_items} {modality}s but placeholders for {n_items - len(queue)}; "
                                 "check the processor output")
        if any(s is None for s in spans):
            raise ValueError("an encoded item has a modality without placeholders; check the adapter")
        return spans

    def _finish_stats(self) -> None:
        st = self._state
        if self._decoder is not None:
            self._decoder.flush()
        self.stats.tap_ms = st.decoder.tap_ms
        self.stats.reused_key_rows = st.decoder.reused_key_rows
        self.stats.reuse_ms = st.decoder.reuse_ms
        dec, acc = st.decoder, st.accounting
        counts = dec.layer_counts
        b = st.prefill.mask.shape[0]
        per_sample_imgs: dict[int, list[int]] = {}
        for s, n in zip(acc.image_samples, self.stats.visual_tokens_per_image):
            per_sample_imgs.setdefault(s, []).append(n)
        in_per_sample: dict[int, int] = {}
        for s, n in zip(acc.image_samples, self.stats.visual_tokens_in_per_image):
            in_per_sample[s] = in_per_sample.get(s, 0) + n
        self.stats.schedules = [
            TokenSchedule(
                llm_tokens_per_layer=[int(c[0][i]) for c in counts],
                visual_tokens_per_layer=[int(c[1][i]) for c in counts],
                visual_tokens_in=in_per_sample.get(i, 0),
                visual_tokens_per_image=per_sample_imgs.get(i, []),
                vision_tokens_per_layer=acc.views[i],
                projector_tokens=acc.projector_tokens[i],
                vision_windows=acc.windows[i],
                new_tokens=0,
            )
            for i in range(b)
        ]
        if dec.cur_index is not None:
            # (B, L_last) indices into the LLM input of the tokens in the last layers, -1 on padding
            self.stats.llm_kept_index = dec.cur_index.masked_fill(~dec.cur_keymask, -1).cpu()
        self.stats.vision_tokens_per_layer = acc.vision_schedule
        self.stats.decoder_budget_clamped = list(dec.budget_clamped) or [False] * b

    # ---------------------------------------------------------------- decode
    def _decode(self, kwargs: dict, past: int) -> dict:
        """Translate ``generate``'s full-length mask and positions into the shortened coordinates."""
        st = self._state
        pre = st.prefill
        st.phase = "decode"
        ids = kwargs.get("input_ids")
        q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            if mask.shape[1] < pre.full_len_in:
                raise ValueError(
                    "attention_mask at decode is shorter than the prefill input; pass the full mask "
                    "(prompt + generated tokens) as generate() does"
                )
            mask = torch.cat([pre.mask.to(mask.dtype), mask[:, pre.full_len_in :]], dim=1)
            kwargs["attention_mask"] = mask
            st.decode_mask = mask
        else:
            st.decode_mask = None
        st.decoded = past - pre.mask.shape[1]
        pos = kwargs.get("position_ids")
        if pos is not None:
            if pre.renumber:
                kwargs["position_ids"] = pos - pre.pos_offset.view(*([1] * (pos.dim() - 2)), -1, 1).to(pos.device)
        elif not pre.renumber:
            # the unpruned numbering continues after the prefill (the model alone would count the
            # shorter cache); Qwen gets its 3 M-RoPE rows, equal for text tokens
            step = torch.arange(q, device=pre.next_pos.device) + st.decoded
            kwargs["position_ids"] = self.adapter.decode_positions(pre.next_pos[:, None] + step[None])
        return kwargs


def _visual_mask(ids: Tensor, adapter) -> Tensor:
    """(B, L) bool: placeholder tokens of any visual modality."""
    vis = torch.tensor(list(adapter.visual_token_ids().values()), dtype=ids.dtype, device=ids.device)
    return torch.isin(ids, vis)


def _config_pad_id(config) -> int:
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(config, "text_config", None), "pad_token_id", None)
    return int(pad or 0)


def _next_position(pos: Tensor, mask: Tensor) -> Tensor:
    """(B,) the position the first generated token gets: max over valid columns (all rows) + 1."""
    m = mask.bool()
    p = pos if pos.dim() == 2 else pos.amax(0)
    return p.masked_fill(~m, -1).amax(-1) + 1


def _as_policies(method, params: dict) -> list[Policy]:
    if isinstance(method, Policy):
        if params:
            raise ValueError("pass parameters either in the policy object or as keyword arguments, not both")
        return method.parts()
    if isinstance(method, (list, tuple)):
        if params:
            raise ValueError("keyword parameters apply to a single method; put them in each spec of the list")
        out = []
        for m in method:
            out.extend(_as_policies(m, {}))
        return out
    if not isinstance(method, str):
        raise ValueError(f"method must be a name, a spec string, a Policy or a list of them; got {type(method).__name__}")
    parsed = registry.parse_spec(method)
    if params and len(parsed) > 1:
        raise ValueError("keyword parameters apply to a single method; put them in each part of the spec string")
    out = []
    for name, p in parsed:
        merged = {**p, **params} if len(parsed) == 1 else p
        out.extend(registry.build(name, merged).parts())
    return out


def patch(model: nn.Module, method="none", *, seed: int = 0, reuse_projections: bool = True, **params) -> Patch:
    """Patch ``model`` in place with one or more policies and return the :class:`Patch` handle.

    Args:
        model: a stock ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
            ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``.
        method: a registered name (``"fastv"``), a spec string (``"fastv:layer=2,keep=0.5"``,
            policies composed with ``+``), a policy object, or a list of these.
        seed: seed of the per-image generators (``Context.rng``) of stochastic policies (``random``).
        reuse_projections: serve a stage-D pruning layer the key projection of its kept rows from the
            one its signals computed before the cut (default; identical outputs, tested). False projects
            them again (for timing comparisons).
        **params: parameters of a single method (override the spec string's).

    Selection happens at prefill. ``generate()`` with the KV cache (the default) selects once and
    decodes on the shortened per-layer cache; ``generate(use_cache=False)`` re-runs the whole sequence
    at every step, so every step is a prefill and the policies select again (for FastV, from that
    step's last token, as in its reference without cache). An int ``keep`` above a dynamic-resolution
    image's tokens keeps them all (``PatchStats.budget_clamped``); see ``docs/architecture.md``.

    Raises:
        ValueError: unknown method or parameter, impossible budget, unsupported model family or
            stage; the model is left unpatched.
    """
    adapter = get_adapter(model)
    policies = _as_policies(method, params)
    stage_rank = {"V": 0, "P": 1, "D": 2}
    policies = sorted(policies, key=lambda p: stage_rank[p.stage])  # stable: keeps the order within a stage
    for p in policies:
        p.validate(adapter.family, adapter)
    h = Patch(model, policies, adapter, seed=seed, reuse_projections=reuse_projections)
    h._install()
    return h
