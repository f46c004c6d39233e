"""Timestamps that mean the same on CPU and CUDA.

:class:`Clock` gives milliseconds since its start. On CPU it reads ``time.perf_counter``. On CUDA it
records a ``torch.cuda.Event`` on the current stream, waits for it (``Event.synchronize``: the
timestamp is taken when the GPU has finished all work queued before it) and reads
``start.elapsed_time(event)``, so host-side launch latency is not mistaken for GPU time. The profiler
(:mod:`eval.profile`), the sweep's prefill timer and the peer pipelines (:mod:`eval.peers`) use it.
"""
from __future__ import annotations

import time

import torch


class Clock:
    """``now()`` -> ms since the clock was (re)started; CUDA events on a CUDA device (see module doc)."""

    def __init__(self, device: torch.device | str | None = None):
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = dev.type == "cuda"
        self.device = dev
        self.restart()

    def restart(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
            self._start.synchronize()
        else:
            self._t0 = time.perf_counter()

    def now(self) -> float:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            ev.synchronize()
            return float(self._start.elapsed_time(ev))
        return (time.perf_counter() - self._t0) * 1e3

    @property
    def kind(self) -> str:
        return "torch.cuda.Event (synchronised)" if self.cuda else "time.perf_counter"
