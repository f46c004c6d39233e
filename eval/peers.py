"""Reference-style peer pipelines: the same method, run the way its authors' code runs it.

The published implementations of HiPrune, VisionZip, FastV, PiToMe and TransPrune read attention the
simple way: the stage they score runs *eager* attention (``softmax(q k^T) v`` with the probabilities
materialised), and HiPrune / VisionZip / FastV ask the model for ``output_attentions=True``, so every
layer's maps are kept until the forward returns. vtprune keeps SDPA and reads only the rows / column
sums it needs from the layer's own q/k. A peer run here is vtprune's selection code under the
authors' regime, so the two differ only in how attention is computed and kept:

* ``stage="tower"`` (HiPrune, VisionZip, PiToMe): the vision tower's config switched to eager; a
  pre-hook asks the tower for ``output_attentions=True`` and a hook keeps its maps (all layers,
  (V, H, N, N) each) until the request ends. PiToMe runs the tower layer by layer (stage V): eager
  there, its maps are materialised layer by layer (its reference computes them explicitly).
* ``stage="llm"`` (FastV, TransPrune): the language model's config switched to eager (its masks
  too) and ``output_attentions=True`` on its forward at prefill: every decoder layer's maps kept.

:func:`verify_kept` checks that the peer run keeps the same tokens as vtprune's SDPA run; for HiPrune
and FastV it also recomputes the selection from the peer's *returned maps* with the method's kernels
(the functions the golden fixtures hold against the authors' code). :func:`run_pairs` times both side
by side (interleaved rounds): TTFT (vision + selection + LLM prefill + head) and LLM prefill on an
:class:`~eval.timing.Clock`, and peak memory (CUDA: ``max_memory_allocated``; CPU: the bytes the C
allocator has in use, sampled every millisecond, minus their value before the run).
"""
from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import vtprune

from .timing import Clock

__all__ = ["PEER_STAGE", "PeakMemory", "reference_style", "peer_run", "verify_kept", "run_pairs",
           "build_llava_next_shape", "next_batch_inputs"]

#: method name -> the stage whose attention its reference materialises
PEER_STAGE = {"hiprune": "tower", "visionzip": "tower", "pitome": "tower", "fastv": "llm", "transprune": "llm"}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def _malloc_in_use() -> Callable[[], int] | None:
    """Bytes the C allocator has handed out and not taken back (glibc ``mallinfo2``: ``uordblks`` over all
    arenas + ``hblkhd`` mmapped blocks); None without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def read() -> int:
        m = fn()
        return m.uordblks + m.hblkhd
    return read


class PeakMemory:
    """Peak memory of the block, MiB above its start. CUDA: ``max_memory_allocated``. CPU: the bytes the
    C allocator has in use (glibc ``mallinfo2``; the resident set where glibc is missing), sampled every
    ``interval`` s by a thread (torch ops release the GIL), so a peak that lasts only a few sampling intervals
    (or less than the time the sampler waits for the GIL) can be missed. Unlike the resident set, this falls when tensors are freed, so each
    run is measured alone even after a bigger one. ``kind`` names the measure."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.mib = 0.0
        self._read = _malloc_in_use() if self.device.type != "cuda" else None
        self.kind = ("cuda max_memory_allocated" if self.device.type == "cuda" else
                     "malloc in use (mallinfo2), sampled" if self._read else "resident set, sampled")

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _now(self) -> int:
        return self._read() if self._read is not None else self._rss()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._now()
        self._peak = self._base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, self._now())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return False
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._now())
        self.mib = (self._peak - self._base) / 2**20
        return False


@contextmanager
def reference_style(model, stage: str):
    """Run ``stage`` (``"tower"`` / ``"llm"``) of ``model`` the authors' way (module doc); yields the
    list that collects the returned attention maps (tuples of (B, H, N, N), one per forward)."""
    if stage not in ("tower", "llm"):
        raise ValueError(f"stage={stage!r}; choose 'tower' or 'llm'")
    inner = model.model
    mod = inner.vision_tower if stage == "tower" else inner.language_model
    cfg = model.config.vision_config if stage == "tower" else model.config.text_config
    old = cfg._attn_implementation
    maps: list = []
    first = {"done": False}

    def pre(m, args, kwargs):
        if stage == "llm" and first["done"]:
            return None  # decode steps: the prefill's maps are the ones the method reads
        kwargs["output_attentions"] = True
        return args, kwargs

    def post(m, args, kwargs, out):
        if stage == "llm" and first["done"]:
            return None
        first["done"] = True
        maps.append(out.attentions)
        return None

    cfg._attn_implementation = "eager"
    hooks = [mod.register_forward_pre_hook(pre, with_kwargs=True),
             mod.register_forward_hook(post, with_kwargs=True)]
    try:
        yield maps
    finally:
        for h in hooks:
            h.remove()
        cfg._attn_implementation = old


def _method(spec: str) -> str:
    from vtprune.registry import parse_spec

    (name, _), = parse_spec(spec)
    if name not in PEER_STAGE:
        raise ValueError(f"no reference-style peer for {name!r}; peers: {', '.join(PEER_STAGE)}")
    return name


@dataclass
class Run:
    """One patched ``generate(max_new_tokens=1)``: timings (ms), peak memory (MiB), what it kept."""

    ttft_ms: float
    prefill_ms: float
    peak_mib: float
    kept: list[torch.Tensor]
    llm_kept: torch.Tensor | None
    maps: list = field(default_factory=list)
    policies: list = field(default_factory=list)

    @property
    def outside_llm_ms(self) -> float:
        """TTFT outside the LLM prefill: the vision tower, the selection, the projector and the head."""
        return self.ttft_ms - self.prefill_ms


def peer_run(model, inputs, spec: str, *, peer: bool, seed: int = 0, keep_maps: bool = False) -> Run:
    """One request under ``spec``: vtprune as is (``peer=False``) or reference-style (``peer=True``)."""
    name = _method(spec)
    dev = next(model.parameters()).device
    clock = Clock(dev)
    t: dict[str, float] = {}
    lm = model.model.language_model

    def mark(key):
        def hook(*_):
            t.setdefault(key, clock.now())
        return hook

    hooks = [model.register_forward_pre_hook(mark("fwd0"), prepend=True), model.register_forward_hook(mark("fwd1")),
             lm.register_forward_pre_hook(mark("lm0"), prepend=True), lm.register_forward_hook(mark("lm1"))]
    ctx = reference_style(model, PEER_STAGE[name]) if peer else nullcontext([])
    try:
        with ctx as maps, PeakMemory(dev) as mem, torch.no_grad():
            with vtprune.patch(model, spec, seed=seed) as h:
                model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False)
                stats, policies = h.stats, h.policies
            kept_maps = list(maps) if keep_maps else []
            maps.clear()  # the request is over: the maps go (after the memory peak was taken)
    finally:
        for hk in hooks:
            hk.remove()
    return Run(ttft_ms=t["fwd1"] - t["fwd0"], prefill_ms=t["lm1"] - t["lm0"], peak_mib=mem.mib,
               kept=[k.cpu() for k in stats.kept_index_per_image],
               llm_kept=None if stats.llm_kept_index is None else stats.llm_kept_index.cpu(),
               maps=kept_maps, policies=policies)


def _map_selection(name: str, run: Run, inputs, model) -> list[torch.Tensor] | None:
    """The selection recomputed from the peer's returned maps with the method's kernels (HiPrune:
    kept raster indices per image; FastV: kept LLM-input positions per sample); None for the others."""
    if name == "hiprune":
        from vtprune.methods.hiprune import attention_received, hiprune_select
        from vtprune.signals import parse_signal

        pol = run.policies[0]
        lo, ld = (parse_signal(s)[1] for s in pol._signal_names)  # object, deep layer (may coincide)
        att = run.maps[0]
        if att[0].shape[0] != len(run.kept):
            return None  # several views per image (NeXT): per-view budgets, checked through the peer run only
        depth = len(att)
        lo, ld = lo % depth, ld % depth
        s_o, s_d = attention_received(att[lo]), attention_received(att[ld])
        grid = int(round(s_o.shape[-1] ** 0.5))
        return [hiprune_select(s_o[i], s_d[i], len(run.kept[i]), pol.alpha, grid) for i in range(s_o.shape[0])]
    if name == "fastv":
        from vtprune.methods.fastv import topk_lowest_index

        pol = run.policies[0]
        att = run.maps[0][pol.layer - 1].float().mean(1)  # (B, L, L) head mean, layer K-1 (unpruned)
        mask = inputs["attention_mask"].bool()
        vis = (inputs["input_ids"] == model.config.image_token_id) & mask
        out = []
        for b in range(att.shape[0]):
            last = int(torch.nonzero(mask[b]).max())
            cols = torch.nonzero(vis[b]).flatten()
            n_keep = pol.budget(cols.numel(), pol.layer)
            out.append(cols[topk_lowest_index(att[b, last, cols].cpu(), n_keep).to(cols.device)].cpu())
        return out
    return None


def verify_kept(model, inputs, spec: str, *, seed: int = 0) -> dict[str, Any]:
    """Kept tokens of vtprune (SDPA) vs the peer (eager, maps kept) and, for HiPrune / FastV, vs the
    selection recomputed from the peer's returned maps. ``{"equal": bool, "checks": [(what, ok)]}``."""
    ours = peer_run(model, inputs, spec, peer=False, seed=seed)
    peer = peer_run(model, inputs, spec, peer=True, seed=seed, keep_maps=True)
    return _checks(_method(spec), ours, peer, inputs, model)


def _checks(name: str, ours: Run, peer: Run, inputs, model) -> dict[str, Any]:
    checks = []
    same = len(ours.kept) == len(peer.kept) and all(torch.equal(a, b) for a, b in zip(ours.kept, peer.kept))
    if ours.llm_kept is not None or peer.llm_kept is not None:
        same = same and ours.llm_kept is not None and peer.llm_kept is not None and torch.equal(ours.llm_kept, peer.llm_kept)
    checks.append(("vtprune SDPA == peer eager run", same))
    ref = _map_selection(name, peer, inputs, model)
    if ref is not None:
        checks.append(("vtprune SDPA == kernel on the peer's returned maps", _same_selection(name, ours, ref, inputs, model)))
        checks.append(("peer eager run == kernel on its own returned maps", _same_selection(name, peer, ref, inputs, model)))
    a = torch.cat([k.flatten() for k in ours.kept] + ([ours.llm_kept.flatten()] if ours.llm_kept is not None else []))
    b = torch.cat([k.flatten() for k in peer.kept] + ([peer.llm_kept.flatten()] if peer.llm_kept is not None else []))
    return {"equal": all(ok for _, ok in checks[:2]), "checks": checks,
            # [kept entries that differ, kept entries] between vtprune SDPA and the peer (-1: different counts)
            "kept_diff": [int((a != b).sum()) if a.shape == b.shape else -1, int(a.numel())]}


def _same_selection(name: str, run: Run, ref: list[torch.Tensor], inputs, model) -> bool:
    """``run`` kept what ``ref`` (selection from maps) says: HiPrune raster indices per image; FastV the
    visual LLM-input positions among the tokens kept after layer K."""
    if name == "hiprune":
        return all(torch.equal(a, b) for a, b in zip(run.kept, ref))
    vis = (inputs["input_ids"] == model.config.image_token_id).cpu()
    ok = True
    for b, cols in enumerate(ref):
        row = run.llm_kept[b]
        row = row[row >= 0]
        ok &= torch.equal(row[vis[b, row]], cols)
    return ok


def run_pairs(model, inputs, specs: list[str], *, rounds: int = 2, warmup: int = 0, seed: int = 0,
              progress=None, skipped: dict | None = None) -> dict[str, dict[str, Any]]:
    """Side-by-side timings: per spec, interleaved rounds of (vtprune, peer) with the order alternated;
    medians of TTFT, LLM prefill and peak memory, and the per-round paired ratios peer / vtprune. The
    first round's two runs also verify the kept tokens (:func:`verify_kept`). With a ``skipped`` dict,
    a spec that raises ``ValueError`` (the method refuses this model or budget) is recorded there."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if skipped is None:
            out[spec] = _pair(model, inputs, spec, rounds, warmup, seed, progress)
            continue
        try:
            out[spec] = _pair(model, inputs, spec, rounds, warmup, seed, progress)
        except ValueError as e:
            skipped[spec] = str(e)
    return out


def _pair(model, inputs, spec, rounds, warmup, seed, progress) -> dict[str, Any]:
    name = _method(spec)
    rec = {"vtprune": [], "peer": []}
    for r in range(warmup + rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        runs = {p: peer_run(model, inputs, spec, peer=p, seed=seed, keep_maps=p and r == 0) for p in order}
        if r == 0:
            v = _checks(name, runs[False], runs[True], inputs, model)
            rec["kept_equal"], rec["checks"], rec["kept_diff"] = v["equal"], v["checks"], v["kept_diff"]
            runs[True].maps = []
        if r >= warmup:
            rec["vtprune"].append(runs[False])
            rec["peer"].append(runs[True])
        if progress is not None:
            progress(f"{spec} round {r}: TTFT vtprune {runs[False].ttft_ms:.0f} ms, peer {runs[True].ttft_ms:.0f} ms; "
                     f"peak vtprune {runs[False].peak_mib:.0f} MiB, peer {runs[True].peak_mib:.0f} MiB")
    return _summary(rec)


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _summary(rec) -> dict[str, Any]:
    ours, peer = rec["vtprune"], rec["peer"]
    s = {"kept_equal": rec["kept_equal"], "checks": [[c, ok] for c, ok in rec["checks"]], "rounds": len(ours),
         "kept_diff": rec.get("kept_diff")}
    for key in ("ttft_ms", "prefill_ms", "outside_llm_ms", "peak_mib"):
        a, b = [getattr(x, key) for x in ours], [getattr(x, key) for x in peer]
        s[f"vtprune_{key}"], s[f"peer_{key}"] = _median(a), _median(b)
        if key != "peak_mib":
            s[f"{key}_ratio"] = _median([y / x for x, y in zip(a, b) if x > 0])  # peer / vtprune, paired
    return s


# ------------------------------------------------------------------------------------ LLaVA-NeXT batch
def build_llava_next_shape(*, llm_layers: int = 2, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                           tiny: bool = False, device="cpu"):
    """LLaVA-NeXT with random weights: CLIP ViT-L/14-336 and AnyRes pinpoint 672 x 672 (a base view +
    2 x 2 tiles = 5 views of 577 tokens) + a 2048-wide Llama with ``llm_layers`` layers (the LLM is the
    same for both pipelines; few layers keep a batch of 8 affordable on a CPU). ``tiny``: a 2-layer
    32-wide CLIP at 56 px per view (tests)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    from vtprune.testing import byte_tokenizer

    tok = byte_tokenizer(["<image>"])
    if tiny:
        size, vcfg = 56, CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=56, patch_size=14, projection_dim=32)
        width, dtype = 64, torch.float32
    else:
        size, vcfg = 336, CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                            num_attention_heads=16, image_size=336, patch_size=14,
                                            projection_dim=768, hidden_act="quick_gelu")
        width = 2048
    tcfg = LlamaConfig(hidden_size=width, intermediate_size=width * 11 // 4, num_hidden_layers=llm_layers,
                       num_attention_heads=16 if not tiny else 4, num_key_value_heads=16 if not tiny else 4,
                       vocab_size=max(len(tok), 512), max_position_embeddings=32768, pad_token_id=0)
    pins = [[2 * size, 2 * size]]
    cfg = LlavaNextConfig(vision_config=vcfg, text_config=tcfg, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=pins, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    model = model.to(dtype)
    model.set_attn_implementation("sdpa")
    ip = LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 image_grid_pinpoints=pins)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)
    return model, proc


def next_batch_inputs(model, proc, n: int = 8, *, seed: int = 0):
    """``n`` left-padded requests, one square image each (5 views: base + 2 x 2 tiles)."""
    import numpy as np
    from PIL import Image

    size = 2 * proc.image_processor.crop_size["height"]
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    texts = [f"USER: <image>\nDescribe picture {i}{' in detail' * (i % 3)}. ASSISTANT:" for i in range(n)]
    proc.tokenizer.padding_side = "left"
    inputs = proc(text=texts, images=imgs, return_tensors="pt", padding=True)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs.to(next(model.parameters()).device)
