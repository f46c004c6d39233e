"""Latency / memory / FLOPs profile of patched ``generate()`` calls (FLOPS.md §7 protocol).

    result = vtprune.profile(model, inputs, ["none", "fastv:layer=2,keep=64", "random:keep=64"])
    print(result.to_table())

One *run* is one greedy ``model.generate(**inputs, max_new_tokens=T, min_new_tokens=T)`` with
``use_cache=True`` under one method's patch. Phases are timed by forward hooks installed around the
patch's own hooks (:class:`eval.timing.Clock`: ``time.perf_counter`` on CPU; on CUDA a recorded
``torch.cuda.Event``, synchronised, read with ``elapsed_time``):

* ``vision_ms``: the vision tower's forward (or, for stage-V policies that run the encoder layer by
  layer, its embeddings (CLIP: and ``pre_layrnorm``) + encoder layers) + the first projector call after
  it, i.e. what the unpruned model's vision side costs for the tokens that actually went through it.
* ``select_ms``: ``Patch.stats.select_ms`` (stage-P policies' ``apply`` over all images).
* ``signal_ms``: the rest of the adapter's encode (``Patch.stats.vision_ms - vision_ms``): recomputed
  ViT attention rows for signals, stage-V merging between encoder layers, bookkeeping.
* ``llm_hooks_ms``: time spent inside vtprune's decoder-layer hooks at prefill (stage-D scoring and
  gathering, TransPrune's attention/MLP reductions; per-layer token bookkeeping for every method)
  plus ``Patch.stats.tap_ms``, the signals computed inside the layers' own (tapped) attention calls,
  and ``Patch.stats.reuse_ms``, serving a pruning layer the key rows its signals projected.
  Part of ``prefill_ms``.
* ``overhead_ms`` = ``select_ms + signal_ms + llm_hooks_ms``: the method's own work (selection
  overhead).
* ``prefill_ms``: ``model.model.language_model`` forward at prefill (decoder layers incl. the hooks;
  LM head excluded).
* ``ttft_ms``: the whole first model forward (vision + selection + prefill + LM head on the last
  position), i.e. time to first token without generate()'s own setup.
* ``decode_ms_per_token``: mean model-forward time of decode steps 2..T (the first token comes from
  prefill).
* ``generate_ms``: end-to-end ``generate()``.
* ``key_proj_ms``: the decoder layers' own key projections (``self_attn.k_proj``) at prefill, i.e. the
  calls outside vtprune's hooks (a signal's projection inside them is overhead); a pruning layer served
  its kept rows (``reuse_projections``) spends only the serving here.
* ``peak_mem_mib``: on CUDA ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats()``; on CPU the growth of the process's max RSS (``resource.getrusage``
  ``ru_maxrss``) during the call: a high-water mark, so 0 once an earlier call went higher.

Methods are interleaved: every round runs each method once, round-robin, with the starting method
rotated per round; the first ``warmup`` rounds are discarded. Statistics: median, p10 and p90
(linear interpolation) over the timed rounds. FLOPs / KV: :func:`vtprune.count_flops` on the
schedule each request actually ran (``Patch.stats.schedules``), summed over the batch.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .timing import Clock

__all__ = ["PhaseStats", "ProfileResult", "profile", "PHASES", "build_llava_shape", "SHAPES"]

PHASES = (
    "vision_ms",
    "select_ms",
    "signal_ms",
    "llm_hooks_ms",
    "overhead_ms",
    "prefill_ms",
    "ttft_ms",
    "decode_ms_per_token",
    "generate_ms",
    "peak_mem_mib",
    "key_proj_ms",
)

CPU_MEM_LABEL = "cpu: growth of the process max RSS during the call (ru_maxrss high-water mark; 0 once warm)"
CUDA_MEM_LABEL = "cuda: torch.cuda.max_memory_allocated after reset_peak_memory_stats()"


# ------------------------------------------------------------------------------------------ statistics
def _percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class PhaseStats:
    """Median and spread of one phase over the timed rounds."""

    median: float
    p10: float
    p90: float
    n: int
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, xs: Sequence[float]) -> "PhaseStats":
        xs = [float(x) for x in xs]
        return cls(median=_percentile(xs, 50), p10=_percentile(xs, 10), p90=_percentile(xs, 90), n=len(xs),
                   samples=xs)


@dataclass
class ProfileResult:
    """What :func:`profile` measured.

    Attributes:
        methods: method labels in the order given (spec strings; ``#k`` appended to duplicates).
        phases: ``{method: {phase: PhaseStats}}`` for every name in :data:`PHASES`.
        flops: ``{method: {...}}`` FLOPs / KV of the request (summed over the batch; ``per_sample`` holds
            each sample's full :meth:`FlopsReport.as_dict`).
        tokens: ``{method: {"visual_tokens_per_image", "llm_tokens_per_layer", "schedule_stable"}}``.
        order: the interleaving, one ``{"round", "warmup", "method"}`` entry per run, in execution order.
        environment: torch/transformers versions, dtype, threads, attention implementation, device,
            ``/proc/loadavg`` before and after, ...
        settings: repeats, warmup, new_tokens, seed, batch, prompt length, memory label.
        skipped: ``{method: error}`` of methods dropped with ``skip_errors=True``.
    """

    methods: list[str]
    phases: dict[str, dict[str, PhaseStats]]
    flops: dict[str, dict[str, Any]]
    tokens: dict[str, dict[str, Any]]
    order: list[dict[str, Any]]
    environment: dict[str, Any]
    settings: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)

    def median(self, method: str, phase: str) -> float:
        return self.phases[method][phase].median

    def to_dict(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "phases": {m: {p: asdict(s) for p, s in ph.items()} for m, ph in self.phases.items()},
            "flops": self.flops,
            "tokens": self.tokens,
            "order": self.order,
            "environment": self.environment,
            "settings": self.settings,
            "skipped": self.skipped,
        }

    def to_json(self, path: str | os.PathLike | None = None, **kw) -> str:
        """JSON text of :meth:`to_dict`; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=kw.pop("indent", 1), default=_json_default, **kw)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def to_table(self) -> str:
        """Markdown table: medians with [p10, p90], FLOPs, KV and the environment line."""

        def cell(m, p, fmt="{:.1f}"):
            s = self.phases[m][p]
            if s.n == 0:
                return "-"
            if s.n == 1:
                return fmt.format(s.median)
            return f"{fmt.format(s.median)} [{fmt.format(s.p10)}, {fmt.format(s.p90)}]"

        base = self.methods[0]
        f0 = self.flops[base]["llm_prefill_tflops"]
        head = ("| method | visual/img at LLM input | eq. visual | LLM prefill TFLOPs | FLOPs vs first | KV MiB | "
                "vision ms | overhead ms (select+signal+hooks) | prefill ms | TTFT ms | decode ms/tok | generate ms | "
                "peak mem MiB |")
        lines = [head, "|" + "---|" * 13]
        for m in self.methods:
            fl = self.flops[m]
            vis = self.tokens[m]["visual_tokens_per_image"]
            ratio = fl["llm_prefill_tflops"] / f0 if f0 else float("nan")
            lines.append(
                f"| {m} | {vis} | {fl.get('eq_visual_tokens', float('nan')):.1f} | {fl['llm_prefill_tflops']:.4g} | {ratio:.3f} | {fl['kv_mib']:.2f} | "
                f"{cell(m, 'vision_ms')} | {cell(m, 'overhead_ms', '{:.2f}')} | {cell(m, 'prefill_ms')} | "
                f"{cell(m, 'ttft_ms')} | {cell(m, 'decode_ms_per_token', '{:.2f}')} | {cell(m, 'generate_ms')} | "
                f"{cell(m, 'peak_mem_mib')} |"
            )
        env = self.environment
        st = self.settings
        lines.append("")
        for m, err in self.skipped.items():
            lines.append(f"skipped {m}: {err}")
        lines.append(
            f"median [p10, p90] over {st['repeats']} interleaved rounds after {st['warmup']} warm-up; "
            f"generate(max_new_tokens={st['new_tokens']}), batch {st['batch']}, prompt {st['prompt_tokens']} tokens; "
            f"{env['device']}, {env['dtype']}, {env['threads']} thread(s), attn={env['attn_implementation']}, "
            f"torch {env['torch']}, transformers {env['transformers']}; loadavg {env.get('loadavg_before')} -> "
            f"{env.get('loadavg_after')}; memory = {st['memory']}"
        )
        return "\n".join(lines)


def _json_default(o):
    if torch.is_tensor(o):
        return o.tolist()
    if isinstance(o, float):
        return None
    return str(o)


# ------------------------------------------------------------------------------------------ environment
def _loadavg() -> str | None:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(model: nn.Module) -> dict[str, Any]:
    """The facts a latency number depends on (FLOPS.md §7.3 / §7.5)."""
    import transformers

    import vtprune

    p = next(model.parameters())
    dev = p.device
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vtprune": getattr(vtprune, "__version__", "?"),
        "python": platform.python_version(),
        "dtype": str(p.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "device_type": dev.type,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_before": _loadavg(),
    }
    if dev.type == "cuda":
        env["device"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = torch.cuda.get_device_properties(dev).name  # driver version is not exposed by torch
        except Exception:  # pragma: no cover
            pass
    else:
        env["device"] = f"cpu ({env['cpu']})"
    return env


# ------------------------------------------------------------------------------------------ timing hooks
def _get(obj, *names):
    for n in names:
        if obj is None:
            return None
        obj = getattr(obj, n, None)
    return obj


class _Timer:
    """Forward hooks that bracket the patch's hooks and record phase timestamps for one run."""

    def __init__(self, model: nn.Module, cuda: bool):
        self.model = model
        self.cuda = cuda
        self.clock = Clock(next(model.parameters()).device if cuda else "cpu")
        inner = getattr(model, "model", model)
        self.lm = _get(inner, "language_model")
        self.tower = _get(inner, "vision_tower") or _get(inner, "visual")
        self.projector = _get(inner, "multi_modal_projector")
        self.embeddings = _get(self.tower, "embeddings")
        self.pre_norm = _get(self.tower, "pre_layrnorm")  # CLIP's norm before its layers: the tower's own work
        enc = _get(self.tower, "vision_model", "encoder") or _get(self.tower, "encoder")
        self.vit_layers = list(_get(enc, "layers") or _get(enc, "layer") or _get(self.tower, "blocks") or [])
        self.llm_layers = list(_get(self.lm, "layers") or [])
        self.handles: list = []
        self.reset()

    def reset(self) -> None:
        self.fwd: list[float] = []  # model forward durations, in call order
        self.lm_calls = 0
        self.prefill_ms = 0.0
        self.tower_ms = 0.0
        self.tower_calls = 0
        self.vit_ms = 0.0
        self.emb_ms = 0.0
        self.proj_ms = 0.0
        self.hooks_ms = 0.0
        self.key_proj_ms = 0.0
        self._expect_proj = False
        self._t: dict[str, float] = {}

    def now(self) -> float:
        """Seconds on the run's :class:`~eval.timing.Clock` (CUDA events, synchronised, on CUDA)."""
        return self.clock.now() / 1e3

    @property
    def in_prefill(self) -> bool:
        return len(self.fwd) == 0  # the first model forward of the run has not finished

    # the model's first pre-hook / last post-hook
    def install(self) -> None:
        H = self.handles
        m = self.model

        def fwd_pre(mod, args):
            self._t["fwd"] = self.now()

        def fwd_post(mod, args, out):
            self.fwd.append((self.now() - self._t["fwd"]) * 1e3)

        H.append(m.register_forward_pre_hook(fwd_pre, prepend=True))
        H.append(m.register_forward_hook(fwd_post))
        if self.lm is not None:
            def lm_pre(mod, args):
                self.lm_calls += 1
                if self.lm_calls == 1:
                    self._t["lm"] = self.now()

            def lm_post(mod, args, out):
                if self.lm_calls == 1:
                    self.prefill_ms = (self.now() - self._t["lm"]) * 1e3

            H.append(self.lm.register_forward_pre_hook(lm_pre, prepend=True))
            H.append(self.lm.register_forward_hook(lm_post))
        self._bracket(self.tower, "tower", self._tower_done, only_prefill=True)
        self._bracket(self.embeddings, "emb", lambda ms: setattr(self, "emb_ms", self.emb_ms + ms), only_prefill=True)
        self._bracket(self.pre_norm, "pre_norm", lambda ms: setattr(self, "emb_ms", self.emb_ms + ms), only_prefill=True)
        for i, layer in enumerate(self.vit_layers):
            self._bracket(layer, f"vit{i}", self._vit_done, only_prefill=True)
        if self.projector is not None:
            self._bracket(self.projector, "proj", self._proj_done, only_prefill=True)
        # vtprune's decoder hooks sit between our prepended and appended hooks
        add = lambda ms: setattr(self, "hooks_ms", self.hooks_ms + ms)  # noqa: E731
        for i, layer in enumerate(self.llm_layers):
            def pre_a(mod, args, i=i):
                if self.in_prefill:
                    self._t[f"L{i}"] = self.now()

            def pre_b(mod, args, i=i):
                if self.in_prefill and f"L{i}" in self._t:
                    add((self.now() - self._t.pop(f"L{i}")) * 1e3)

            H.append(layer.register_forward_pre_hook(pre_a, prepend=True))
            H.append(layer.register_forward_pre_hook(pre_b))
            for sub in ("self_attn", "mlp"):
                mod = getattr(layer, sub, None)
                if mod is None:
                    continue
                key = f"{sub}{i}"

                def post_a(mod, args, out, key=key):
                    if self.in_prefill:
                        self._t[key] = self.now()

                def post_b(mod, args, out, key=key):
                    if self.in_prefill and key in self._t:
                        add((self.now() - self._t.pop(key)) * 1e3)

                H.append(mod.register_forward_hook(post_a, prepend=True))
                H.append(mod.register_forward_hook(post_b))
            kp = _get(layer, "self_attn", "k_proj")
            if kp is not None:  # the layer's own key projection: outside vtprune's pre-hook window (L{i})
                def kp_pre(mod, args, i=i):
                    if self.in_prefill and f"L{i}" not in self._t:
                        self._t[f"K{i}"] = self.now()

                def kp_post(mod, args, out, i=i):
                    if f"K{i}" in self._t:
                        self.key_proj_ms += (self.now() - self._t.pop(f"K{i}")) * 1e3

                H.append(kp.register_forward_pre_hook(kp_pre, prepend=True))
                H.append(kp.register_forward_hook(kp_post))

    def _bracket(self, module, key, done, only_prefill=False):
        if module is None:
            return

        def pre(mod, args):
            if not only_prefill or self.in_prefill:
                self._t[key] = self.now()

        def post(mod, args, out):
            if key in self._t:
                done((self.now() - self._t.pop(key)) * 1e3)

        self.handles.append(module.register_forward_pre_hook(pre, prepend=True))
        self.handles.append(module.register_forward_hook(post))

    def _tower_done(self, ms: float) -> None:
        self.tower_ms += ms
        self.tower_calls += 1
        self._expect_proj = True

    def _vit_done(self, ms: float) -> None:
        self.vit_ms += ms
        self._expect_proj = True

    def _proj_done(self, ms: float) -> None:
        # only the projector call that follows the encoder is vision; later calls (a policy projecting
        # merged tokens itself) are the policy's work, inside select_ms
        if self._expect_proj:
            self.proj_ms += ms
            self._expect_proj = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def vision_ms(self) -> float:
        if self.tower_calls:
            return self.tower_ms + self.proj_ms
        return self.emb_ms + self.vit_ms + self.proj_ms


# ------------------------------------------------------------------------------------------ profiling
def _method_options(m) -> tuple[Any, dict[str, Any]]:
    """(method, keyword options of :func:`vtprune.patch`) of one ``methods`` entry."""
    if isinstance(m, tuple):
        if len(m) != 2 or not isinstance(m[1], dict):
            raise ValueError(f"profile(): a tuple entry must be (method, {{patch options}}); got {m!r}")
        return m
    return m, {}


def _label(m, seen: dict[str, int]) -> str:
    from vtprune.policy import Policy

    m, opts = _method_options(m)
    base = m.spec() if isinstance(m, Policy) else str(m)
    if opts:
        base += " [" + ", ".join(f"{k}={v}" for k, v in opts.items()) + "]"
    k = seen.get(base, 0)
    seen[base] = k + 1
    return base if k == 0 else f"{base}#{k + 1}"


def _max_rss_mib() -> float:
    try:
        import resource
    except ImportError:  # not a POSIX system: no max RSS
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _flops_of(model, stats, new_tokens: int, dtype_bytes: int, has_vision_policy: bool) -> dict[str, Any]:
    from dataclasses import replace

    from vtprune.flops import count_flops

    scheds = list(stats.schedules)
    out: dict[str, Any] = {"per_sample": []}
    tot = {"llm_prefill_tflops": 0.0, "vision_tflops": 0.0, "projector_tflops": 0.0, "kv_mib": 0.0,
           "kv_mib_end": 0.0, "decode_gflops_per_token": 0.0, "decode_gflops_per_token_mean": 0.0}
    vision_views = [list(v) for v in (stats.vision_tokens_per_layer or [])]
    for i, s in enumerate(scheds):
        s = replace(s, new_tokens=new_tokens)
        if len(scheds) == 1 and vision_views:  # views cannot be assigned to samples of a batch here
            s.vision_tokens_per_layer = vision_views
            s.projector_tokens = sum(s.visual_tokens_per_image) if has_vision_policy else s.visual_tokens_in
        rep = count_flops(model, s, dtype_bytes=dtype_bytes).as_dict()
        out["per_sample"].append(rep)
        for k in tot:
            tot[k] += rep[k]
    out.update(tot)
    if scheds:
        first = out["per_sample"][0]
        out["fastv_ratio"] = first["fastv_ratio"]
        out["eq_visual_tokens"] = first["eq_visual_tokens"]
        out["convention"] = first["convention"]
    return out


def profile(
    model: nn.Module,
    inputs: Any,
    methods: Sequence[Any],
    *,
    repeats: int = 5,
    warmup: int = 2,
    new_tokens: int = 32,
    seed: int = 0,
    progress: Any = None,
    skip_errors: bool = False,
) -> "ProfileResult":
    """Time vision / selection / prefill / decode / generate for each method, interleaved.

    Args:
        model: a stock HF VLM supported by :func:`vtprune.patch` (not patched).
        inputs: the processor output (``input_ids``, ``attention_mask``, ``pixel_values``, ...) already on
            the model's device; the same inputs are used for every method.
        methods: spec strings (``"fastv:layer=2,keep=64"``, ``"none"``) or policy objects, or ``(method,
            {patch options})`` pairs (``("transprune", {"reuse_projections": False})``, labelled
            ``"transprune [reuse_projections=False]"``).
        repeats: timed rounds (each runs every method once).
        warmup: discarded rounds before them.
        new_tokens: ``generate(max_new_tokens=new_tokens, min_new_tokens=new_tokens)``, greedy.
        seed: patch seed (stochastic policies) and ``torch.manual_seed`` before each run.
        progress: optional ``callable(str)`` called after each run.
        skip_errors: a method whose patch or run raises is dropped (recorded in ``result.skipped``) instead
            of aborting the profile.

    Returns:
        :class:`ProfileResult`. No assertion on the numbers is made here.
    """
    import vtprune

    if not methods:
        raise ValueError("profile(): give at least one method")
    if repeats < 1 or warmup < 0 or new_tokens < 1:
        raise ValueError("profile(): repeats >= 1, warmup >= 0 and new_tokens >= 1 are required")
    if getattr(model, "_vtprune_patch", None) is not None:
        raise ValueError("profile(): the model is already patched; remove the patch first")
    seen: dict[str, int] = {}
    labels = [_label(m, seen) for m in methods]
    param = next(model.parameters())
    cuda = param.device.type == "cuda"
    dtype_bytes = torch.finfo(param.dtype).bits // 8 if param.dtype.is_floating_point else 2
    env = environment(model)
    ids = inputs["input_ids"]
    batch, prompt_len = int(ids.shape[0]), int(ids.shape[1])
    gen_kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)

    samples: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PHASES} for m in labels}
    last_stats: dict[str, Any] = {}
    has_v: dict[str, bool] = {}
    sched_sig: dict[str, set] = {m: set() for m in labels}
    gen_tokens: dict[str, int] = {}
    order: list[dict[str, Any]] = []
    timer = _Timer(model, cuda)
    k = len(labels)
    skipped: dict[str, str] = {}
    for rnd in range(warmup + repeats):
        is_warm = rnd < warmup
        rot = rnd % k
        for j in list(range(rot, k)) + list(range(rot)):
            label, method = labels[j], methods[j]
            if label in skipped:
                continue
            handle = None
            timer.reset()
            try:
                method, opts = _method_options(method)
                handle = vtprune.patch(model, method, seed=seed, **opts)
                timer.install()  # after the patch: our hooks bracket the patch's
                torch.manual_seed(seed)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(param.device)
                rss0 = _max_rss_mib()
                t0 = timer.now()
                with torch.no_grad():
                    out = model.generate(**inputs, **gen_kw)
                gen_ms = (timer.now() - t0) * 1e3
                mem = torch.cuda.max_memory_allocated(param.device) / 2**20 if cuda else _max_rss_mib() - rss0
                stats = handle.stats
            except Exception as e:
                if not skip_errors:
                    raise
                skipped[label] = f"{type(e).__name__}: {e}"
                if progress is not None:
                    progress(f"skipping {label}: {skipped[label]}")
                continue
            finally:
                timer.remove()
                if handle is not None:
                    handle.remove()
            order.append({"round": rnd, "warmup": is_warm, "method": label})
            gen_tokens[label] = int(out.shape[1] - prompt_len)
            vis = timer.vision_ms()
            signal = max(float(stats.vision_ms) - vis, 0.0)
            decode = timer.fwd[1:]
            rec = {
                "vision_ms": vis,
                "select_ms": float(stats.select_ms),
                "signal_ms": signal,
                "llm_hooks_ms": timer.hooks_ms + float(stats.tap_ms) + float(stats.reuse_ms),
                "overhead_ms": float(stats.select_ms) + signal + timer.hooks_ms + float(stats.tap_ms) + float(stats.reuse_ms),
                "prefill_ms": timer.prefill_ms,
                "ttft_ms": timer.fwd[0] if timer.fwd else float("nan"),
                "decode_ms_per_token": sum(decode) / len(decode) if decode else float("nan"),
                "generate_ms": gen_ms,
                "peak_mem_mib": mem,
                "key_proj_ms": timer.key_proj_ms,
            }
            sig = tuple(tuple(s.llm_tokens_per_layer) for s in stats.schedules)
            sched_sig[label].add(sig)
            last_stats[label] = stats
            has_v[label] = bool(handle.vision_policies)
            if not is_warm:
                for p, v in rec.items():
                    if not (isinstance(v, float) and v != v):  # drop NaN (e.g. no decode step)
                        samples[label][p].append(v)
            if progress is not None:
                progress(f"round {rnd + 1}/{warmup + repeats}{' (warm-up)' if is_warm else ''} {label}: "
                         f"prefill {rec['prefill_ms']:.1f} ms, generate {gen_ms:.1f} ms")
    env["loadavg_after"] = _loadavg()
    labels = [m for m in labels if m not in skipped]
    if not labels:
        raise ValueError(f"profile(): every method failed: {skipped}")

    phases = {m: {p: PhaseStats.of(samples[m][p]) for p in PHASES} for m in labels}
    flops, tokens = {}, {}
    for m in labels:
        st = last_stats[m]
        flops[m] = _flops_of(model, st, gen_tokens[m], dtype_bytes, has_v[m])
        tokens[m] = {
            "visual_tokens_per_image": list(st.visual_tokens_per_image),
            "visual_tokens_in_per_image": list(st.visual_tokens_in_per_image),
            "llm_tokens_per_layer": [list(s.llm_tokens_per_layer) for s in st.schedules],
            "vision_tokens_per_layer": [list(v) for v in (st.vision_tokens_per_layer or [])],
            "schedule_stable": len(sched_sig[m]) == 1,
            "new_tokens": gen_tokens[m],
            "reused_key_rows": int(st.reused_key_rows),
        }
    settings = {
        "repeats": repeats,
        "warmup": warmup,
        "new_tokens": new_tokens,
        "seed": seed,
        "batch": batch,
        "prompt_tokens": prompt_len,
        "use_cache": True,
        "decoding": "greedy, min_new_tokens = max_new_tokens",
        "memory": CUDA_MEM_LABEL if cuda else CPU_MEM_LABEL,
        "interleaving": "round-robin over methods in each round, start rotated by one per round",
        "timer": "forward hooks, " + ("torch.cuda.Event timestamps (synchronised)" if cuda else "time.perf_counter"),
    }
    return ProfileResult(methods=labels, phases=phases, flops=flops, tokens=tokens, order=order,
                         environment=env, settings=settings, skipped=skipped)


# ------------------------------------------------------------------------------------------ model shapes
SHAPES = ("tiny", "llava-1.5-1b", "llava-1.5-7b")


def build_llava_shape(shape: str = "tiny", *, dtype: torch.dtype | None = None, seed: int = 0,
                      attn_implementation: str = "sdpa", device: str | torch.device = "cpu"):
    """A randomly initialised LLaVA-1.5-shaped model and its processor, from configs (no downloads).

    * ``"tiny"``: CLIP 32-wide, 2 layers, 224 px / patch 14 (256 visual tokens) + a 4-layer 64-wide
      Llama (GQA 4/2); fp32 by default. Budgets like ``keep=64`` are valid on it.
    * ``"llava-1.5-1b"``: CLIP ViT-L/14-336 (1024 wide, 24 layers, 16 heads, MLP 4096; 576 visual
      tokens) + a Llama of ~1 B parameters (2048 wide, 16 layers, 16 heads, MLP 5632, vocab 32064);
      bf16 by default.
    * ``"llava-1.5-7b"``: the same CLIP + the Vicuna-7B shape (4096, 32 layers, 32 heads, 11008); bf16.

    Tokenizer: byte level (one token per byte) plus ``<image>``; ids stay below the vocab size. Timing
    does not depend on the weights' values, so random weights give the real shapes' costs.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vtprune.testing import byte_tokenizer

    tok = byte_tokenizer(["<image>"])
    if shape == "tiny":
        vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=224, patch_size=14, projection_dim=32)
        tcfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=0,
                           rms_norm_eps=1e-6)
        dtype = dtype or torch.float32
    elif shape in ("llava-1.5-1b", "llava-1.5-7b"):
        vcfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        if shape == "llava-1.5-1b":
            dims = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=16)
        else:
            dims = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32)
        tcfg = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, pad_token_id=0, rms_norm_eps=1e-5, **dims)
        dtype = dtype or torch.bfloat16
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype (no fp32 copy of 1-7 B weights)
    try:
        with torch.device(device):  # initialise in place (the 7B shape is built directly on the GPU)
            model = LlavaForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    model = model.to(dtype)
    model.set_attn_implementation(attn_implementation)
    size = vcfg.image_size
    ip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=vcfg.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=None)
    return model, proc


def llava_inputs(proc, question: str, *, system: str = "", image=None, seed: int = 0):
    """Processor output for one ``image`` (default: random pixels at the processor's size) and a prompt
    ``"{system}USER: <image>\\n{question} ASSISTANT:"``."""
    import numpy as np
    from PIL import Image

    if image is None:
        size = proc.image_processor.crop_size["height"]
        rng = np.random.default_rng(seed)
        image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    text = f"{system}USER: <image>\n{question} ASSISTANT:"
    return proc(text=[text], images=[image], return_tensors="pt")
