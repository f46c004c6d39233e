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
from .decoder import DecoderController
from .policy import Context, DecoderPolicy, ImageTokens, Policy, TokenPolicy, VisionPolicy
from .quota import apply_with_quota
from .schedule import TokenSchedule

_ACTIVE_ATTR = "_vtprune_patch"
_NO_PREENCODE_ATTR = "_supports_mm_encoder_outputs"


def _no_pre_encoding() -> bool:
    return False


@dataclass
class PatchStats:
    """Stats of the last request. ``schedules`` has one :class:`TokenSchedule` per sample."""

    schedules: list[TokenSchedule] = field(default_factory=list)
    select_ms: float = 0.0
    vision_ms: float = 0.0
    visual_tokens_per_image: list[int] = field(default_factory=list)
    visual_tokens_in_per_image: list[int] = field(default_factory=list)
    vision_tokens_per_layer: list[list[int]] = field(default_factory=list)
    kept_index_per_image: list[Tensor] = field(default_factory=list)
    llm_kept_index: Tensor | None = None

    @property
    def llm_tokens_per_layer(self) -> list[list[int]]:
        return [s.llm_tokens_per_layer for s in self.schedules]


class _RequestState:
    """Bookkeeping of the current request (prefill selection, shortened coordinates)."""

    def __init__(self):
        self.phase: str | None = None
        self.reset()

    def reset(self) -> None:
        self.active = False
        self.phase = None
        self.full_len_in = 0  # padded length of the caller's prefill input
        self.mask: Tensor | None = None  # (B, L') 2-D mask of the LLM input
        self.mask_given = False
        self.visual: Tensor | None = None  # (B, L') bool
        self.image_id: Tensor | None = None
        self.orig_index: Tensor | None = None
        self.positions = None
        self.pos_offset: Tensor | None = None
        self.next_pos: Tensor | None = None
        self.renumber = False
        self.decode_mask: Tensor | None = None
        self.decoded = 0
        # decoder bookkeeping
        self.full_rope = None
        self.full_len = 0
        self.dtype = torch.float32
        self.cur_index: Tensor | None = None
        self.cur_keymask: Tensor | None = None
        self.layer_keymask: dict[int, Tensor] = {}
        self.signals: dict = {}
        self.layer_counts: list[tuple[Tensor, Tensor]] = []

    def record_layer(self, layer: int) -> None:
        if self.cur_index is None:
            km, vis = self.mask.bool(), self.visual
        else:
            km = self.cur_keymask
            vis = torch.gather(self.visual, 1, self.cur_index) & km
        self.layer_counts.append((km.sum(-1).cpu(), (vis & km).sum(-1).cpu()))

    def decode_tail(self, q: int) -> Tensor:
        """(B, t + q) validity of the tokens after the prefill, as seen by the current decode call."""
        if self.decode_mask is not None:
            return self.decode_mask[:, self.mask.shape[1] :].bool()
        b = self.mask.shape[0]
        return torch.ones((b, self.decoded + q), dtype=torch.bool, device=self.mask.device)


class Patch:
    """Handle of an installed patch: a context manager; :meth:`remove` restores the model exactly."""

    def __init__(self, model: nn.Module, policies: list[Policy], adapter, *, seed: int = 0):
        self.model = model
        self.policies = policies
        self.adapter = adapter
        self.seed = seed
        self.vision_policies = [p for p in policies if isinstance(p, VisionPolicy)]
        self.token_policies = [p for p in policies if isinstance(p, TokenPolicy)]
        self.decoder_policies = [p for p in policies if isinstance(p, DecoderPolicy)]
        self.stats = PatchStats()
        self._state = _RequestState()
        self._handles: list = []
        self._decoder: DecoderController | None = None
        self._signals: dict[str, Any] = {}
        for p in self.vision_policies + self.token_policies:
            self._signals.update(p.required_signals(adapter))
        self._forward_params = list(inspect.signature(model.forward).parameters)

    # ---------------------------------------------------------------- lifecycle
    def _install(self) -> None:
        if getattr(self.model, _ACTIVE_ATTR, None) is not None:
            raise ValueError("this model is already patched by vtprune; call .remove() on the existing patch first")
        decoder = DecoderController(self.adapter, self.decoder_policies, self._context())  # may refuse: nothing installed yet
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._model_post_hook, with_kwargs=True))
        self._decoder = decoder
        self._decoder.state = self._state
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

    def _context(self) -> Context:
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
                if mm.get("image") is not None:
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
        st = self._state
        ad = self.adapter
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("vtprune needs `input_ids` (with the image placeholder tokens), not `inputs_embeds`")
        b, n = ids.shape
        mask_in = kwargs.get("attention_mask")
        mask = mask_in if mask_in is not None else torch.ones_like(ids)
        if mask.dim() != 2:
            raise ValueError("vtprune needs a 2-D attention_mask (batch, sequence) at prefill")
        pos_full = ad.full_positions(kwargs, ids, mask_in)
        ctx = self._context()
        n_nom = ad.nominal_visual_tokens()
        if n_nom:  # image index within its sample, for per-view seeding of stage-V policies
            counts = ((ids == ad.image_token_id) & mask.bool()).sum(1) // n_nom
            ctx.extra["view_keys"] = [k for c in counts.tolist() for k in range(c)]

        t0 = time.perf_counter()
        images, vision_sched = ad.encode(kwargs, self._signals, self.vision_policies, ctx)
        t1 = time.perf_counter()
        spans = self._image_spans(ids, mask, images)
        kept_cols: list[list[Tensor]] = [[] for _ in range(b)]
        features: list[Tensor] = []
        n_out, n_in, kept_idx = [], [], []
        emit_in_order = not all(getattr(p, "sorted_output", True) for p in self.vision_policies + self.token_policies)
        per_sample = [0] * b
        for img, (sample, cols) in zip(images, spans):
            img.sample_index = sample
            img.extra["index_in_sample"] = per_sample[sample]
            per_sample[sample] += 1
            order = torch.arange(img.num_tokens)
            cur = img
            for p in self.token_policies:
                o, feats = apply_with_quota(p, cur, ctx)
                cur = _subset(cur, o, feats)
                order = order[o]
            slot = img.extra.get("placeholder_index")  # stage V: which placeholder each token fills
            slot = order if slot is None else slot[order]
            img_cols = cols[slot.to(cols.device)]
            if emit_in_order:  # the policies' order is the sequence order; slots stay sorted
                perm = torch.arange(img_cols.numel(), device=img_cols.device)
                kept_cols[sample].append(torch.sort(img_cols).values)
            else:
                perm = torch.argsort(img_cols)
                kept_cols[sample].append(img_cols[perm])
            features.append(cur.features[perm.to(cur.features.device)])
            kept_idx.append(order[perm.cpu()])
            n_in.append(int(cols.numel()))
            n_out.append(cur.num_tokens)
        t2 = time.perf_counter()

        is_img = _visual_mask(ids, ad)
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

        def gather(t: Tensor, pad) -> Tensor:
            """(…, B, L) -> (…, B, L') at the kept columns, ``pad`` elsewhere."""
            idx = cols.view(*([1] * (t.dim() - 2)), b, width).expand(*t.shape[:-1], width)
            out = torch.gather(t, -1, idx)
            return out.masked_fill(~valid.view(*([1] * (t.dim() - 2)), b, width), pad)

        pads = ids[mask == 0]
        pad_id = int(pads[0]) if pads.numel() else _config_pad_id(self.model.config)
        new_ids = gather(ids, pad_id)
        new_mask = valid.to(mask.dtype)
        mode = self._position_mode()
        if mode == "renumber":
            new_pos = ad.renumber_positions(kwargs, new_mask)
        else:
            new_pos = gather(pos_full, 0) if pos_full is not None else None
        need_mask = mask_in is not None or not bool(valid.all())
        new = {
            "input_ids": new_ids,
            "attention_mask": new_mask if need_mask else None,
            "position_ids": new_pos,
            "features": features,
            "items": images,  # the encoded items (aligned with features)
            "kept_index": kept_idx,  # per item, indices into its encoded tokens (output order)
            "gather": gather,
        }
        out = ad.build_inputs(kwargs, new)

        # request state
        st.active = True
        st.full_len_in = n
        st.mask = new_mask
        st.mask_given = need_mask
        st.visual = _visual_mask(new_ids, ad) & valid
        img_id = torch.full((b, width), -1, dtype=torch.long, device=ids.device)
        for i in range(b):
            k = 0
            for c in kept_cols[i]:
                where = torch.isin(cols[i], c) & valid[i]
                img_id[i, where] = k
                k += 1
        st.image_id = img_id
        st.orig_index = cols
        st.positions = new_pos if new_pos is not None else None
        st.renumber = mode == "renumber"
        full_next = _next_position(pos_full, mask)
        if new_pos is not None:
            st.next_pos = _next_position(new_pos, new_mask)
            st.pos_offset = full_next - st.next_pos
        else:
            st.next_pos = new_mask.long().sum(-1) if mode == "renumber" else full_next
            st.pos_offset = torch.zeros(b, dtype=torch.long, device=ids.device)
        if new_pos is not None:
            ad.after_prefill(st)

        self.stats = PatchStats(
            select_ms=(t2 - t1) * 1e3,
            vision_ms=(t1 - t0) * 1e3,
            visual_tokens_per_image=n_out,
            visual_tokens_in_per_image=n_in,
            kept_index_per_image=kept_idx,
        )
        # per sample: the vision encoder's token schedule of each of its views, and projector tokens
        views_per_sample: list[list[list[int]]] = [[] for _ in range(b)]
        windows_per_sample: list[list[list[int]]] = [[] for _ in range(b)]
        proj_per_sample = [0] * b
        v0 = 0
        for img, (sample, _) in zip(images, spans):
            nv = int(img.extra.get("n_views", 1))
            views_per_sample[sample].extend(vision_sched[v0 : v0 + nv])
            v0 += nv
            proj_per_sample[sample] += int(img.extra.get("projector_tokens", img.num_tokens))
            win = img.extra.get("vision_windows")  # per vision block, segment lengths (Qwen)
            if win is not None:
                acc = windows_per_sample[sample]
                acc.extend([[] for _ in range(len(win) - len(acc))])
                for blk, segs in enumerate(win):
                    acc[blk].extend(segs)
        self._vision_sched = vision_sched
        self._views_per_sample = views_per_sample
        self._proj_per_sample = proj_per_sample
        self._windows_per_sample = windows_per_sample
        self._spans_samples = [s for s, _ in spans]
        return out

    def _position_mode(self) -> str:
        modes = {getattr(p, "positions", "auto") for p in self.token_policies} - {"auto"}
        if len(modes) > 1:
            raise ValueError(f"composed policies disagree on positions: {sorted(modes)}")
        mode = modes.pop() if modes else self.adapter.default_positions
        if not self.token_policies and not self.vision_policies:
            mode = "original"  # nothing shortened before the LLM
        return mode

    def _image_spans(self, ids: Tensor, mask: Tensor, images: list[ImageTokens]) -> list[tuple[int, Tensor]]:
        """Assign each item its placeholder columns: (sample index, (n_i,) columns), aligned with ``images``.

        Each modality (``extra["modality"]``: image, video) fills its own placeholder token, in request
        order: an item takes the next ``n`` placeholders of its modality in its sample, contiguous or
        not (Qwen3-VL puts a timestamp between the frames of a video).
        """
        token_ids = self.adapter.visual_token_ids()
        spans: list = [None] * len(images)
        for modality, tok in token_ids.items():
            queue = [k for k, img in enumerate(images) if img.extra.get("modality", "image") == modality]
            is_tok = (ids == tok) & mask.bool()
            q = 0
            for i in range(ids.shape[0]):
                cols = torch.nonzero(is_tok[i]).flatten()
                start = 0
                while start < cols.numel():
                    if q >= len(queue):
                        raise ValueError(f"more {modality} placeholder tokens than {modality} features; "
                                         "check the processor output")
                    k = queue[q]
                    n = images[k].extra.get("n_placeholders", images[k].num_tokens)
                    if start + n > cols.numel():
                        raise ValueError(
                            f"{modality} {q} has {n} features but sample {i} has only {cols.numel() - start} "
                            "placeholders left; check the processor output"
                        )
                    spans[k] = (i, cols[start : start + n])
                    start += n
                    q += 1
            if q != len(queue):
                raise ValueError(f"{len(queue)} {modality} inputs but placeholders for {q}; check the processor output")
        return spans

    def _finish_stats(self) -> None:
        st = self._state
        counts = st.layer_counts
        b = st.mask.shape[0]
        scheds = []
        per_sample_imgs: dict[int, list[int]] = {}
        for s, n in zip(self._spans_samples, self.stats.visual_tokens_per_image):
            per_sample_imgs.setdefault(s, []).append(n)
        in_per_sample: dict[int, int] = {}
        for s, n in zip(self._spans_samples, self.stats.visual_tokens_in_per_image):
            in_per_sample[s] = in_per_sample.get(s, 0) + n
        for i in range(b):
            scheds.append(
                TokenSchedule(
                    llm_tokens_per_layer=[int(c[0][i]) for c in counts],
                    visual_tokens_per_layer=[int(c[1][i]) for c in counts],
                    visual_tokens_in=in_per_sample.get(i, 0),
                    visual_tokens_per_image=per_sample_imgs.get(i, []),
                    vision_tokens_per_layer=self._views_per_sample[i],
                    projector_tokens=self._proj_per_sample[i],
                    vision_windows=self._windows_per_sample[i],
                    new_tokens=0,
                )
            )
        self.stats.schedules = scheds
        if st.cur_index is not None:
            # (B, L_last) indices into the LLM input of the tokens in the last layers, -1 on padding
            self.stats.llm_kept_index = st.cur_index.masked_fill(~st.cur_keymask, -1).cpu()
        self.stats.vision_tokens_per_layer = self._vision_sched

    # ---------------------------------------------------------------- decode
    def _decode(self, kwargs: dict, past: int) -> dict:
        st = self._state
        st.phase = "decode"
        ids = kwargs.get("input_ids")
        q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            if mask.shape[1] < st.full_len_in:
                raise ValueError(
                    "attention_mask at decode is shorter than the prefill input; pass the full mask "
                    "(prompt + generated tokens) as generate() does"
                )
            mask = torch.cat([st.mask.to(mask.dtype), mask[:, st.full_len_in :]], dim=1)
            kwargs["attention_mask"] = mask
            st.decode_mask = mask
        else:
            st.decode_mask = None
        st.decoded = past - st.mask.shape[1]
        pos = kwargs.get("position_ids")
        if pos is not None:
            if st.renumber:
                kwargs["position_ids"] = pos - st.pos_offset.view(*([1] * (pos.dim() - 2)), -1, 1).to(pos.device)
        elif not st.renumber:
            # the unpruned numbering continues after the prefill (the model alone would count the
            # shorter cache); Qwen gets its 3 M-RoPE rows, equal for text tokens
            step = torch.arange(q, device=st.next_pos.device) + st.decoded
            kwargs["position_ids"] = self.adapter.decode_positions(st.next_pos[:, None] + step[None])
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


def _subset(img: ImageTokens, order: Tensor, feats: Tensor | None) -> ImageTokens:
    n = img.num_tokens
    sig = {k: (v[order.to(v.device)] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n else v)
           for k, v in img.signals.items()}
    extra = {k: (v[order] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n else v)
             for k, v in img.extra.items()}
    return ImageTokens(
        features=feats if feats is not None else img.features[order.to(img.features.device)],
        candidate=img.candidate[order],
        view=img.view[order],
        grid=img.grid[order],
        grid_shapes=img.grid_shapes,
        signals=sig,
        image_index=img.image_index,
        sample_index=img.sample_index,
        extra=extra,
    )


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


def patch(model: nn.Module, method="none", *, seed: int = 0, **params) -> Patch:
    """Patch ``model`` in place with one or more policies and return the :class:`Patch` handle.

    Args:
        model: a stock ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
            ``Qwen2VLForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``.
        method: a registered name (``"fastv"``), a spec string (``"fastv:layer=2,keep=0.5"``,
            policies composed with ``+``), a policy object, or a list of these.
        seed: seed of the per-image generators (``Context.rng``) of stochastic policies (``random``).
        **params: parameters of a single method (override the spec string's).

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
    h = Patch(model, policies, adapter, seed=seed)
    h._install()
    return h
