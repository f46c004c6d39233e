"""Typed per-request state shared by the patch (``vtprune/api.py``) and stage D (``vtprune/decoder.py``).

A :class:`RequestState` is created by :class:`~vtprune.api.Patch` and handed to the
:class:`~vtprune.decoder.DecoderController` at install time. The patch writes the
:class:`PrefillState` (the shortened LLM input) once per prefill; the controller fills the
:class:`DecoderState` (per-layer bookkeeping of stage D) during that prefill and reads it at decode.
Every field is declared here: nothing is attached by attribute assignment elsewhere.

Coordinates: ``L`` = the caller's padded prefill length, ``L'`` = the LLM input after stage V/P
(``PrefillState``), ``L_cur`` = the sequence entering a decoder layer after stage-D prunes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .policy import Context

#: request phases: no request yet, the prefill forward, between forwards, a decode forward
PHASES = (None, "prefill", "between", "decode")


@dataclass
class PrefillState:
    """The LLM input of the current request after stage V/P (written once by the patch at prefill).

    Attributes:
        full_len_in: padded length ``L`` of the caller's prefill input.
        mask: (B, L') 2-D attention mask of the LLM input (1 on real tokens).
        visual: (B, L') bool, visual tokens of the LLM input.
        image_id: (B, L') long, image index within the sample for visual tokens, -1 elsewhere.
        orig_index: (B, L') long, column of each LLM-input token in the caller's input.
        positions: the LLM-input positions handed to the model in its native format, or None when the
            model numbers the shortened sequence itself.
        renumber: True when positions were renumbered contiguously (stage P), False when the original
            positions were kept.
        next_pos: (B,) position of the first generated token in the LLM's numbering.
        pos_offset: (B,) original next position minus ``next_pos`` (what a renumbered decode subtracts).
    """

    full_len_in: int
    mask: Tensor
    visual: Tensor
    image_id: Tensor
    orig_index: Tensor
    positions: Any
    renumber: bool
    next_pos: Tensor
    pos_offset: Tensor


@dataclass
class SampleAccounting:
    """Per-sample token accounting of the vision side, turned into ``TokenSchedule`` after prefill.

    Attributes:
        image_samples: per image, the sample it belongs to.
        vision_schedule: per encoder view of the request, the tokens entering each encoder layer.
        views: per sample, the schedules of its views.
        projector_tokens: per sample, tokens through the projector / merger.
        windows: per sample, per vision block, attention segment lengths (Qwen2.5-VL).
    """

    image_samples: list[int] = field(default_factory=list)
    vision_schedule: list[list[int]] = field(default_factory=list)
    views: list[list[list[int]]] = field(default_factory=list)
    projector_tokens: list[int] = field(default_factory=list)
    windows: list[list[list[int]]] = field(default_factory=list)


@dataclass
class DecoderState:
    """Per-layer bookkeeping of stage D during one prefill, read again at decode.

    Set at layer 0 of the prefill:
        full_rope: (cos, sin) tables of the LLM input; full_pid: its ``position_ids`` (or None);
        full_len: ``L'``; dtype: the hidden-state dtype.
        full_pos: (B, L') 1-D positions of the LLM input (only when a layer renumbers);
        full_next: (B,) their next position (the model's numbering of new tokens).
    Updated at each pruning layer:
        cur_index: (B, L_cur) LLM-input index of each token of the current sequence (None before the
            first prune); cur_keymask: (B, L_cur) bool, real tokens; last_rows: (B, L_cur) rows of the
            previous sequence kept.
        cur_pos / cur_rope: renumbered positions and their rotary tables (None: original positions);
        pos_shift: (B,) what a renumbered layer subtracts from the model's decode positions.
    Per layer:
        layer_keymask: ``{layer: (B, L_cur) key mask}`` of every layer after a prune (decode masks);
        layer_pos_shift: ``{layer: (B,) shift}`` of every renumbered layer;
        signals: ``{(layer, kind): (B, L)}`` requested decoder signals;
        layer_counts: per layer, ((B,) tokens, (B,) visual tokens) entering it;
        budget_clamped: (B,) bool, a stage-D int budget exceeded the visual tokens of the sample.
        counted: the (prefill, cur_index, cur_keymask) objects the last ``layer_counts`` entry was
            counted from (layers between two prunes repeat it without recounting).
        pending: ``{layer: [(kind, asked layer, DecoderSignalInput)]}`` attention signals waiting for
            the layer's own attention call (its tap computes them from the q/k in hand);
        tap_ms: wall time spent computing signals inside tapped attention calls at this prefill.
        reused_key_rows / reuse_ms: rows of pruning layers' key projections served from a signal's
            projection, and the wall time of serving them (inside the layers' own calls).
    """

    full_rope: Any = None
    full_pid: Tensor | None = None
    full_len: int = 0
    dtype: torch.dtype = torch.float32
    full_pos: Tensor | None = None
    full_next: Tensor | None = None
    cur_index: Tensor | None = None
    cur_keymask: Tensor | None = None
    last_rows: Tensor | None = None
    cur_pos: Tensor | None = None
    cur_rope: Any = None
    pos_shift: Tensor | None = None
    layer_keymask: dict[int, Tensor] = field(default_factory=dict)
    layer_pos_shift: dict[int, Tensor] = field(default_factory=dict)
    signals: dict[tuple[int, str], Tensor] = field(default_factory=dict)
    layer_counts: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    counted: tuple | None = None
    budget_clamped: list[bool] = field(default_factory=list)
    pending: dict[int, list] = field(default_factory=dict)
    tap_ms: float = 0.0
    reused_key_rows: int = 0
    reuse_ms: float = 0.0


@dataclass
class RequestState:
    """The current request: its phase, the prefill's LLM input, stage-D bookkeeping, decode counters.

    Attributes:
        phase: one of :data:`PHASES`.
        prefill: the LLM input of the current request; None when no patched prefill ran (text-only
            requests go through unchanged).
        accounting: per-sample vision accounting of the prefill.
        decoder: stage-D bookkeeping of the prefill.
        decode_mask: (B, L' + t) the mask of the current decode call in shortened coordinates, or None.
        decoded: tokens fed after the prefill before the current decode call.
        context: the request's :class:`~vtprune.policy.Context` (handed to every policy call).
    """

    phase: str | None = None
    prefill: PrefillState | None = None
    accounting: SampleAccounting = field(default_factory=SampleAccounting)
    decoder: DecoderState = field(default_factory=DecoderState)
    decode_mask: Tensor | None = None
    decoded: int = 0
    context: Context | None = None

    @property
    def active(self) -> bool:
        """True between a patched prefill and the next request."""
        return self.prefill is not None

    def reset(self) -> None:
        """Forget the previous request (a new prefill, or the patch removed)."""
        self.phase = None
        self.prefill = None
        self.accounting = SampleAccounting()
        self.decoder = DecoderState()
        self.decode_mask = None
        self.decoded = 0
        self.context = None

    def record_layer(self) -> None:
        """Append the (tokens, visual tokens) per sample entering the current decoder layer."""
        pre, dec = self.prefill, self.decoder
        key = (pre, dec.cur_index, dec.cur_keymask)
        if dec.counted is not None and all(a is b for a, b in zip(key, dec.counted)):  # set only with an entry
            dec.layer_counts.append(dec.layer_counts[-1])  # nothing was cut since the last layer
            return
        dec.counted = key
        if dec.cur_index is None:
            km, vis = pre.mask.bool(), pre.visual
        else:
            km = dec.cur_keymask
            vis = torch.gather(pre.visual, 1, dec.cur_index) & km
        dec.layer_counts.append((km.sum(-1).cpu(), (vis & km).sum(-1).cpu()))

    def decode_tail(self, q: int) -> Tensor:
        """(B, t + q) validity of the tokens after the prefill, as seen by the current decode call."""
        mask = self.prefill.mask
        if self.decode_mask is not None:
            return self.decode_mask[:, mask.shape[1] :].bool()
        return torch.ones((mask.shape[0], self.decoded + q), dtype=torch.bool, device=mask.device)
