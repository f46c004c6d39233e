"""What a sweep measures: prefill time, generated tokens, FLOPs of the schedules that ran, memory,
environment; and the per-cell record computed from the predictions file."""
from __future__ import annotations

import dataclasses
import math
import platform
import statistics
from typing import Any, Callable, Mapping, Sequence

from ..store import ResultsStore
from ..timing import Clock
from .config import Cell

#: Record fields that depend on the machine and the moment (excluded by :func:`comparable`).
VOLATILE_FIELDS = ("prefill_ms", "total_ms", "select_ms", "vision_ms", "peak_mem_mib", "peak_mem_kind", "env")

#: Per-sample FLOPs fields taken from ``count_flops(model, schedule).as_dict()`` (means in the record).
FLOPS_FIELDS = ("llm_prefill_tflops", "vision_tflops", "projector_tflops", "total_prefill_tflops", "fastv_ratio",
                "kv_mib", "kv_mib_end", "decode_gflops_per_token", "eq_visual_tokens")


def comparable(record: Mapping) -> dict:
    """``record`` without the timing, memory and environment fields (:data:`VOLATILE_FIELDS`)."""
    return {k: v for k, v in record.items() if k not in VOLATILE_FIELDS}


# ----------------------------------------------------------------------------------------------------
# Measurement helpers


class PrefillTimer:
    """Times the first forward of each ``generate`` (the prefill, including vtprune's selection) on a
    :class:`~eval.timing.Clock` (CUDA events, synchronised, on a CUDA device; ``time.perf_counter`` on CPU)."""

    def __init__(self, model, clock: Clock):
        self.clock = clock
        self.calls = 0
        self.t0 = self.t1 = None
        self._h = [model.register_forward_pre_hook(self._pre, prepend=True), model.register_forward_hook(self._post)]

    def reset(self) -> None:
        self.calls, self.t0, self.t1 = 0, None, None

    def _pre(self, module, args):
        if self.calls == 0:
            self.t0 = self.clock.now()

    def _post(self, module, args, output):
        if self.calls == 0:
            self.t1 = self.clock.now()
        self.calls += 1

    @property
    def ms(self) -> float | None:
        return None if self.t0 is None or self.t1 is None else self.t1 - self.t0

    def remove(self) -> None:
        for h in self._h:
            h.remove()
        self._h = []


def count_new_tokens(gen, eos: set[int], pad: int | None) -> list[int]:
    out = []
    for row in gen.tolist():
        n = len(row)
        for j, t in enumerate(row):
            if t in eos:
                n = j + 1
                break
        else:
            while n > 0 and pad is not None and row[n - 1] == pad and pad not in eos:
                n -= 1
        out.append(n)
    return out


def eos_ids(model, tok) -> set[int]:
    ids = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), getattr(tok, "eos_token_id", None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return ids


def sample_flops(model, patch, inputs, new_tokens: list[int]) -> list[dict]:
    """Per-sample ``count_flops`` fields of the schedules that actually ran.

    The patch records the LLM side per sample; when a schedule lacks the vision side (empty
    ``vision_tokens_per_layer``), it is filled from ``patch.stats.vision_tokens_per_layer`` (one entry
    per encoded view): view ``i`` belongs to sample ``i`` when there is one view per sample (LLaVA,
    Qwen2(.5)-VL with one image per sample); otherwise (LLaVA-NeXT AnyRes views) the batch's vision
    and projector FLOPs are split evenly, which leaves the cell's mean exact. Projector tokens: the
    patches of each view (Qwen: merged tokens); with a stage-V method, the visual tokens it handed on
    (exact for stage V alone, a lower bound when a stage-P method follows).
    """
    from vtprune.flops import count_flops, qwen_vision_segments
    from vtprune.schedule import TokenSchedule

    cfg = model.config
    mt = getattr(cfg, "model_type", "")
    st = patch.stats
    b = len(st.schedules)
    scheds = [dataclasses.replace(s, new_tokens=int(n)) for s, n in zip(st.schedules, new_tokens)]
    views = [list(v) for v in (st.vision_tokens_per_layer or [])]
    extra_v = extra_p = 0.0
    if views and all(not s.vision_tokens_per_layer for s in scheds):
        stage_v = bool(patch.vision_policies)
        grid = inputs.get("image_grid_thw")
        grid = grid.tolist() if grid is not None else None

        def proj_tokens(vs: list[list[int]], sched) -> int:
            if stage_v:
                return int(sum(sched.visual_tokens_per_image)) if sched is not None else 0
            if mt in ("qwen2_vl", "qwen2_5_vl"):
                ms = int(cfg.vision_config.spatial_merge_size)
                return sum(v[0] // (ms * ms) for v in vs if v)
            full = getattr(cfg, "vision_feature_select_strategy", "default") == "full"
            prefix = 0 if full else _vit_prefix(cfg)
            return sum(max(v[0] - prefix, 0) for v in vs if v)

        def windows(i: int | None, vs) -> list[list[int]]:
            if mt != "qwen2_5_vl" or grid is None or any(len(set(v)) > 1 for v in vs):
                return []
            g = grid if i is None else [grid[i]]
            return qwen_vision_segments(cfg, g)

        if len(views) == b:
            for i, s in enumerate(scheds):
                s.vision_tokens_per_layer = [views[i]]
                s.vision_windows = windows(i, [views[i]])
                s.projector_tokens = proj_tokens([views[i]], s)
        else:
            agg = TokenSchedule(vision_tokens_per_layer=views, vision_windows=windows(None, views),
                                projector_tokens=sum(proj_tokens([], s) for s in scheds) if stage_v else proj_tokens(views, None))
            rep = count_flops(model, agg)
            extra_v, extra_p = rep.vision_flops / b / 1e12, rep.projector_flops / b / 1e12
    out = []
    for s in scheds:
        d = count_flops(model, s).as_dict()
        row = {k: d[k] for k in FLOPS_FIELDS}
        if extra_v or extra_p:
            row["vision_tflops"] += extra_v
            row["projector_tflops"] += extra_p
            row["total_prefill_tflops"] += extra_v + extra_p
        row["visual_tokens"] = (sum(s.visual_tokens_per_image) / len(s.visual_tokens_per_image)
                                if s.visual_tokens_per_image else 0.0)
        row["visual_tokens_in"] = s.visual_tokens_in
        row["llm_tokens_per_layer"] = list(s.llm_tokens_per_layer)
        row["visual_tokens_per_layer"] = list(s.visual_tokens_per_layer)
        row["prompt_tokens"] = s.prompt_tokens
        row["new_tokens"] = s.new_tokens
        out.append(row)
    return out


def budget_clamped_per_sample(stats, b: int) -> list[bool]:
    """Per sample of a batch of ``b`` one-image samples (a sweep's), whether an int budget exceeded its
    visual tokens: ``PatchStats.budget_clamped`` (stage P, per image) or ``decoder_budget_clamped`` (stage D,
    per sample)."""
    per_image = list(stats.budget_clamped) or [False] * b
    per_sample = list(stats.decoder_budget_clamped) or [False] * b
    if len(per_image) != b or len(per_sample) != b:
        raise RuntimeError(f"patch stats of a batch of {b} one-image samples list {len(per_image)} images and "
                           f"{len(per_sample)} samples")
    return [bool(p or d) for p, d in zip(per_image, per_sample)]


def _vit_prefix(cfg) -> int:
    vc = cfg.vision_config
    if getattr(vc, "model_type", "").startswith("siglip"):
        return 0
    return 1 + int(getattr(vc, "num_register_tokens", 0) or 0)


def peak_memory(device) -> tuple[float | None, str | None]:
    """(MiB, kind): CUDA max allocated, else the process max RSS (None where the OS does not report it)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None, None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def environment(device, world_size: int = 1) -> dict:
    """Versions and hardware of this run (a volatile record field)."""
    import torch
    import transformers

    import vtprune

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "vtprune": vtprune.__version__, "platform": platform.platform(), "device": str(device),
           "threads": torch.get_num_threads(), "world_size": world_size}
    try:
        import accelerate

        env["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def relative_fields(rec: Mapping, cell: Cell, store: ResultsStore) -> dict:
    """``rel_accuracy``, ``flops_ratio`` and ``llm_flops_ratio`` of ``rec`` against the vanilla (``none``)
    record of the same model x benchmark (``None`` where it is missing or zero)."""
    ref = rec if cell.key == cell.ref_key else (store.get(cell.ref_key) if cell.ref_key else None)
    if ref is None or ref.get("status") != "ok":
        return {"rel_accuracy": None, "flops_ratio": None, "llm_flops_ratio": None}
    racc, rflops, rllm = ref.get("accuracy"), ref.get("total_prefill_tflops"), ref.get("llm_prefill_tflops")
    flops, llm = rec.get("total_prefill_tflops"), rec.get("llm_prefill_tflops")
    return {"rel_accuracy": 1.0 if ref is rec else (rec["accuracy"] / racc if racc else None),
            "flops_ratio": flops / rflops if rflops and flops is not None else None,
            "llm_flops_ratio": llm / rllm if rllm and llm is not None else None}


def cell_record(cell: Cell, bench, writer, store: ResultsStore, env: dict) -> dict:
    """The record of a finished cell, from its predictions file alone (benchmark order), and the
    ``none`` record of the same model x benchmark for the relative fields."""
    ident = cell.identity
    rec: dict[str, Any] = {k: ident[k] for k in ("model", "benchmark", "benchmark_loader", "method", "method_name",
                                                 "params", "budget_param", "budget")}
    rec["spec"] = cell.method.spec
    rec["n"] = len(bench.samples)
    rows = writer.records()
    preds = {s.id: rows[s.id]["prediction"] for s in bench.samples if s.id in rows}
    extras = [rows[s.id].get("extra", {}) for s in bench.samples if s.id in rows]  # benchmark order: reproducible means
    score = bench.score(preds)
    rec["status"] = "ok"
    rec["accuracy"] = score["primary"]
    rec["score"] = score
    for k in FLOPS_FIELDS + ("visual_tokens", "visual_tokens_in", "prompt_tokens", "new_tokens"):
        rec[k] = _mean([e.get(k) for e in extras])
    clamped = [e.get("budget_clamped") for e in extras]
    # samples whose int budget exceeded their visual tokens (they kept them all); None: predictions of an
    # older vtprune that did not record it
    rec["budget_clamped"] = None if any(c is None for c in clamped) else sum(bool(c) for c in clamped)
    for k in ("llm_tokens_per_layer", "visual_tokens_per_layer"):
        lists = [e.get(k) for e in extras if e.get(k)]
        rec[k] = [sum(col) / len(col) for col in zip(*lists)] if lists else []
    rec.update(relative_fields(rec, cell, store))
    rec["prefill_ms"] = _median([e.get("prefill_ms") for e in extras])
    rec["total_ms"] = _median([e.get("total_ms") for e in extras])
    rec["select_ms"] = _mean([e.get("select_ms") for e in extras])
    rec["vision_ms"] = _mean([e.get("vision_ms") for e in extras])
    peaks = [e.get("peak_mem_mib") for e in extras if e.get("peak_mem_mib") is not None]
    rec["peak_mem_mib"] = max(peaks) if peaks else None
    rec["peak_mem_kind"] = next((e.get("peak_mem_kind") for e in extras if e.get("peak_mem_kind")), None)
    rec["env"] = env
    return rec
