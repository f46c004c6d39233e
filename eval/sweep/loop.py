"""Sweep runner: models x methods (with params) x budgets x benchmarks -> one record per cell.

    from vtprune.eval.sweep import run_sweep
    records = run_sweep("eval/configs/tiny.yaml", "runs/tiny/results.jsonl", limit=8)

or ``vtprune sweep CONFIG.yaml [--store RESULTS.jsonl] [--limit N] [--shard-by auto|accelerate|none]``.

Config (YAML or a dict; unknown keys are errors, every error is a ``ValueError`` naming the key)::

    models:                       # required, non-empty
      - name: tiny-llava          # required; the label used in records and plots
        builtin: tiny-llava       # tiny-llava | tiny-llava_next | tiny-qwen2_vl | tiny-qwen2_5_vl | embedded
      - name: llava-1.5-7b
        path: /models/llava-1.5-7b-hf   # AutoModelForImageTextToText / AutoProcessor.from_pretrained
        dtype: float16            # optional (default: the top-level dtype)
        prompt: "USER: {image}\\n{prompt} ASSISTANT:"   # optional; {image} {prompt} {question}
    benchmarks:                   # required, non-empty
      - name: embedded            # a loader of vtprune.eval.benchmarks.load_benchmark
        path: assets/embedded/bench
        label: embedded-heldout   # optional display name (default: name)
        options: {}               # optional loader keyword arguments
    methods:                      # optional; `none` and `random` are always added
      - fastv                     # short form: a registered name, default params, budget knob `keep`
      - name: fastv
        params: {layer: 3}
        label: fastv-K3           # optional (default: name plus params)
        budgets: [0.5, 0.25]      # optional: overrides the top-level budgets for this method
      - name: pitome
        budget_param: ratio       # the method's own budget knob (default: keep)
      - spec: "pool:keep={budget} + fastv:layer=2,keep=0.5"   # a composition; {budget} is filled in
        label: pool+fastv
    budgets: [0.5, 0.25]          # required unless every method has its own
    max_new_tokens: 8             # greedy decoding, short answers
    batch_size: 4                 # left padding
    seed: 0                       # the patch seed (stochastic methods such as random)
    limit: null                   # first N samples of each benchmark
    dtype: float32
    device: auto                  # auto (cuda if available) | cpu | cuda | cuda:N
    store: runs/x/results.jsonl   # optional default for the CLI's --store

Relative paths (benchmark and model paths) are tried against the working directory, the config
file's folder and the repository root, in that order.

Each cell writes its per-sample predictions (with the per-sample schedule, FLOPs and latency in
``extra``) through :meth:`ResultsStore.predictions`; batches are appended atomically, so a killed
cell resumes at the first batch not on disk, with the same batch composition (hence the same
predictions) as an uninterrupted run. The record is computed from the predictions file alone, in the
benchmark's sample order, after which ``store.put`` marks the cell finished. Timing, memory and
environment fields (:data:`VOLATILE_FIELDS`) naturally differ between runs; :func:`comparable`
drops them.

Record fields (``store.get(key)`` / the list ``run_sweep`` returns): identity (``model``, ``benchmark``,
``benchmark_loader``, ``method`` (the label), ``method_name``, ``spec``, ``params``, ``budget_param``,
``budget``), ``status`` (``"ok"``, or ``"unsupported"`` with ``error`` when ``vtprune.patch`` rejects the
method for this model), ``n``, ``accuracy`` (the benchmark's ``primary``), ``score`` (its full dict),
``rel_accuracy`` (accuracy / accuracy of the ``none`` cell of the same model x benchmark; 1.0 for
``none`` itself; ``None`` when the reference scores 0), ``flops_ratio`` / ``llm_flops_ratio`` (total /
LLM prefill FLOPs relative to ``none``), the kept-token schedule as means over samples
(``visual_tokens`` per image at the LLM input, ``visual_tokens_in``, ``llm_tokens_per_layer``,
``visual_tokens_per_layer``, ``prompt_tokens``, ``new_tokens``), the FLOPs that ran as means over
samples of ``count_flops(model, schedule)`` (:data:`FLOPS_FIELDS`), and the volatile
``prefill_ms`` / ``total_ms`` (median per sample; batch time / batch size), ``select_ms``,
``vision_ms`` (mean), ``peak_mem_mib`` (CUDA max allocated, or the process max RSS on CPU),
``peak_mem_kind`` and ``env``.

Data-parallel sharding (``shard_by="accelerate"``, automatic when ``WORLD_SIZE > 1`` as set by
``accelerate launch`` / ``torchrun``): batch ``j`` (of the single-process batching) goes to rank
``j % world`` (with ``batch_size: 1`` this is sample ``i % world == rank``); every rank appends to
the cell's predictions file (``flock``-protected), then after ``wait_for_everyone()`` rank 0 scores
and puts the record. Because batches are the same as in a single process, a sharded sweep yields the
records of a single-process one. Launch with ``accelerate launch --multi_gpu --num_processes N -m
vtprune.eval.cli sweep CONFIG`` on GPUs; on CPU use ``torchrun --nproc_per_node N -m vtprune.eval.cli
sweep CONFIG`` (gloo; ``accelerate launch --cpu`` starts one process unless MPI is configured).
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import re
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .store import ResultsStore, cell_key

__all__ = ["run_sweep", "load_config", "plan_cells", "comparable", "SweepConfig", "Cell", "MissingAssetError",
           "VOLATILE_FIELDS", "BUILTIN_MODELS", "BASELINES"]

#: Record fields that depend on the machine and the moment (excluded by :func:`comparable`).
VOLATILE_FIELDS = ("prefill_ms", "total_ms", "select_ms", "vision_ms", "peak_mem_mib", "peak_mem_kind", "env")

#: Methods every sweep includes (``none`` once per model x benchmark, ``random`` at every budget).
BASELINES = ("none", "random")

BUILTIN_MODELS = ("tiny-llava", "tiny-llava_next", "tiny-qwen2_vl", "tiny-qwen2_5_vl", "embedded")

#: Per-sample FLOPs fields taken from ``count_flops(model, schedule).as_dict()`` (means in the record).
FLOPS_FIELDS = ("llm_prefill_tflops", "vision_tflops", "projector_tflops", "total_prefill_tflops", "fastv_ratio",
                "kv_mib", "kv_mib_end", "decode_gflops_per_token", "eq_visual_tokens")

_TOP_KEYS = {"name", "models", "benchmarks", "methods", "budgets", "max_new_tokens", "batch_size", "seed", "limit",
             "dtype", "device", "store"}
_MODEL_KEYS = {"name", "path", "builtin", "dtype", "prompt"}
_BENCH_KEYS = {"name", "path", "label", "options"}
_METHOD_KEYS = {"name", "spec", "params", "label", "budget_param", "budgets"}
_DTYPES = ("float32", "float16", "bfloat16")

_REPO_ROOT = Path(__file__).resolve().parents[1]


class MissingAssetError(FileNotFoundError):
    """A model or benchmark named by the config is not on disk (the message names the fix)."""


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: str | None = None
    builtin: str | None = None
    dtype: str = "float32"
    prompt: str | None = None

    def source(self) -> dict:
        return {"builtin": self.builtin} if self.builtin else {"path": self.path}


@dataclass(frozen=True)
class BenchEntry:
    name: str  # loader
    path: str
    label: str
    options: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class MethodEntry:
    name: str  # registered method name, or the label of a composed spec
    label: str
    params: dict = field(default_factory=dict, hash=False)
    budget_param: str | None = "keep"
    budgets: tuple = (None,)
    spec: str | None = None  # composition template with {budget}


@dataclass
class SweepConfig:
    models: list[ModelEntry]
    benchmarks: list[BenchEntry]
    methods: list[MethodEntry]
    max_new_tokens: int = 8
    batch_size: int = 1
    seed: int = 0
    limit: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    store: str | None = None
    name: str | None = None
    source: Path | None = None  # the config file, if any


@dataclass
class Cell:
    model: ModelEntry
    bench: BenchEntry
    method: MethodEntry
    budget: Any
    identity: dict
    key: str
    ref_key: str | None = None  # the `none` cell of the same model x benchmark

    @property
    def is_reference(self) -> bool:
        return self.method.name == "none" and self.method.spec is None


def _err(key: str, problem: str) -> ValueError:
    return ValueError(f"sweep config: {key}: {problem}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_keys(obj: Mapping, allowed: set, where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _err(f"{where}.{unknown[0]}" if where else unknown[0],
                   f"unknown key; allowed keys: {', '.join(sorted(allowed))}")


def _int(obj: Mapping, key: str, default: Any, lo: int, where: str = "") -> Any:
    v = obj.get(key, default)
    if v is None and default is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _err(where + key, f"must be an integer >= {lo}, got {v!r}")
    return v


def _str(obj: Mapping, key: str, where: str, required: bool = True) -> str | None:
    v = obj.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v.strip():
        raise _err(f"{where}.{key}", f"must be a non-empty string, got {v!r}")
    return v.strip()


def _budgets(v: Any, where: str) -> tuple:
    if not isinstance(v, (list, tuple)) or not v:
        raise _err(where, f"must be a non-empty list of numbers (fractions like 0.25 or token counts like 64), got {v!r}")
    for i, b in enumerate(v):
        if not _is_number(b) or b <= 0:
            raise _err(f"{where}[{i}]", f"must be a positive number, got {b!r}")
    if len(set(v)) != len(v):
        raise _err(where, f"repeats a budget: {list(v)!r}")
    return tuple(v)


def _default_label(name: str, params: Mapping) -> str:
    if not params:
        return name
    return name + "(" + ",".join(f"{k}={params[k]}" for k in sorted(params)) + ")"


def load_config(config: Mapping | str | os.PathLike) -> SweepConfig:
    """Parse and validate a sweep config (dict, or a YAML/JSON file path); ``ValueError`` names the key."""
    source = None
    if isinstance(config, (str, os.PathLike)):
        source = Path(config)
        if not source.is_file():
            raise FileNotFoundError(f"sweep config {source} not found")
        import yaml

        try:
            raw = yaml.safe_load(source.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"sweep config {source}: not valid YAML ({exc})") from exc
    else:
        raw = config
    if not isinstance(raw, Mapping):
        raise ValueError(f"sweep config: must be a mapping with keys models, benchmarks, methods, budgets; got {type(raw).__name__}")
    from vtprune import registry

    _check_keys(raw, _TOP_KEYS, "")
    dtype = raw.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise _err("dtype", f"must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    device = raw.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise _err("device", f"must be auto, cpu, cuda or cuda:N, got {device!r}")

    # models
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise _err("models", "required: a non-empty list of {name, path | builtin}")
    models, seen = [], set()
    for i, m in enumerate(models_raw):
        where = f"models[{i}]"
        if not isinstance(m, Mapping):
            raise _err(where, f"must be a mapping {{name, path | builtin}}, got {m!r}")
        _check_keys(m, _MODEL_KEYS, where)
        name = _str(m, "name", where)
        path, builtin = m.get("path"), m.get("builtin")
        if (path is None) == (builtin is None):
            raise _err(where, "needs exactly one of 'path' (a from_pretrained folder) or 'builtin' "
                              f"({', '.join(BUILTIN_MODELS)})")
        if builtin is not None and builtin not in BUILTIN_MODELS:
            raise _err(f"{where}.builtin", f"unknown builtin {builtin!r}; choose from {', '.join(BUILTIN_MODELS)}")
        if path is not None:
            path = _str(m, "path", where)
        mdt = m.get("dtype", dtype)
        if mdt not in _DTYPES:
            raise _err(f"{where}.dtype", f"must be one of {', '.join(_DTYPES)}, got {mdt!r}")
        prompt = _str(m, "prompt", where, required=False)
        if prompt is not None and "{image}" not in prompt:
            raise _err(f"{where}.prompt", "the template must contain {image} (and usually {prompt} or {question})")
        if name in seen:
            raise _err(f"{where}.name", f"duplicate model name {name!r}")
        seen.add(name)
        models.append(ModelEntry(name=name, path=path, builtin=builtin, dtype=mdt, prompt=prompt))

    # benchmarks
    from .benchmarks import BENCHMARKS

    benches_raw = raw.get("benchmarks")
    if not isinstance(benches_raw, list) or not benches_raw:
        raise _err("benchmarks", "required: a non-empty list of {name, path}")
    benches, seen = [], set()
    for i, b in enumerate(benches_raw):
        where = f"benchmarks[{i}]"
        if not isinstance(b, Mapping):
            raise _err(where, f"must be a mapping {{name, path}}, got {b!r}")
        _check_keys(b, _BENCH_KEYS, where)
        name = _str(b, "name", where).lower().replace("-", "_")
        if name not in BENCHMARKS:
            raise _err(f"{where}.name", f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}")
        path = _str(b, "path", where)
        label = _str(b, "label", where, required=False) or name
        opts = b.get("options", {}) or {}
        if not isinstance(opts, Mapping):
            raise _err(f"{where}.options", f"must be a mapping of loader keyword arguments, got {opts!r}")
        if label in seen:
            raise _err(f"{where}.label", f"duplicate benchmark label {label!r} (give each a distinct 'label')")
        seen.add(label)
        benches.append(BenchEntry(name=name, path=path, label=label, options=dict(opts)))

    # budgets and methods
    top_budgets = _budgets(raw["budgets"], "budgets") if raw.get("budgets") is not None else None
    methods_raw = raw.get("methods") or []
    if not isinstance(methods_raw, list):
        raise _err("methods", f"must be a list of method names or mappings, got {methods_raw!r}")
    known = registry.registered()
    methods: list[MethodEntry] = []
    for i, m in enumerate(methods_raw):
        where = f"methods[{i}]"
        if isinstance(m, str):
            m = {"name": m}
        if not isinstance(m, Mapping):
            raise _err(where, f"must be a method name or a mapping {{name, params, budget_param, budgets}}, got {m!r}")
        _check_keys(m, _METHOD_KEYS, where)
        params = m.get("params", {}) or {}
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise _err(f"{where}.params", f"must be a mapping of parameter names to values, got {params!r}")
        params = dict(params)
        spec = None
        if m.get("spec") is not None:
            if m.get("name") is not None or params:
                raise _err(where, "give either 'spec' (a composition) or 'name' (+ 'params'), not both")
            spec = _str(m, "spec", where)
            label = _str(m, "label", where, required=False)
            if label is None:
                raise _err(f"{where}.label", "required with 'spec' (the name shown in records and plots)")
            name = label
            bparam = None
        else:
            name = _str(m, "name", where)
            if name not in known:
                raise _err(f"{where}.name", f"unknown method {name!r}; registered: {', '.join(known)}")
            label = _str(m, "label", where, required=False) or _default_label(name, params)
            bparam = m.get("budget_param", "keep")
            fields = {f.name for f in dataclasses.fields(known[name])}
            bad = sorted(set(params) - fields)
            if bad:
                raise _err(f"{where}.params.{bad[0]}", f"method {name!r} has no such parameter; its parameters: {', '.join(sorted(fields))}")
            if name == "none":
                bparam = None
            elif not isinstance(bparam, str) or bparam not in fields:
                raise _err(f"{where}.budget_param", f"method {name!r} has no parameter {bparam!r}; its parameters: {', '.join(sorted(fields))}")
            elif bparam in params:
                raise _err(f"{where}.params.{bparam}", "is the budget knob (budget_param); set it through 'budgets' instead")
        if name == "none" and spec is None:
            budgets: tuple = (None,)
        elif m.get("budgets") is not None:
            budgets = _budgets(m["budgets"], f"{where}.budgets")
        elif top_budgets is not None:
            budgets = top_budgets
        else:
            raise _err("budgets", f"required (method {label!r} has no 'budgets' of its own)")
        if spec is not None:
            if "{budget}" not in spec:
                raise _err(f"{where}.spec", "must contain {budget} where the budget goes, e.g. 'pool:keep={budget} + fastv:layer=2'")
            for b in budgets:
                try:
                    for pname, _ in registry.parse_spec(spec.replace("{budget}", str(b))):
                        if pname not in known:
                            raise ValueError(f"unknown method {pname!r}; registered: {', '.join(known)}")
                except ValueError as exc:
                    raise _err(f"{where}.spec", str(exc)) from None
        if any(e.label == label for e in methods):
            raise _err(f"{where}.label", f"duplicate method label {label!r} (give one a distinct 'label')")
        methods.append(MethodEntry(name=name, label=label, params=params, budget_param=bparam, budgets=budgets,
                                   spec=spec))
    # baselines
    if not any(e.name == "none" and e.spec is None for e in methods):
        methods.insert(0, MethodEntry(name="none", label="none", budget_param=None, budgets=(None,)))
    if not any(e.name == "random" and e.spec is None for e in methods):
        if top_budgets is None:
            raise _err("budgets", "required: the random baseline runs at the top-level budgets")
        if any(e.label == "random" for e in methods):
            raise _err("methods", "the label 'random' is reserved for the random baseline")
        methods.insert(1, MethodEntry(name="random", label="random", budget_param="keep", budgets=top_budgets))
    methods.sort(key=lambda e: 0 if (e.name == "none" and e.spec is None) else 1)  # the reference first (stable)

    store = raw.get("store")
    if store is not None and not isinstance(store, str):
        raise _err("store", f"must be a path string, got {store!r}")
    return SweepConfig(
        models=models, benchmarks=benches, methods=methods,
        max_new_tokens=_int(raw, "max_new_tokens", 8, 1), batch_size=_int(raw, "batch_size", 1, 1),
        seed=_int(raw, "seed", 0, 0), limit=_int(raw, "limit", None, 1), device=device, dtype=dtype, store=store,
        name=raw.get("name"), source=source,
    )


def plan_cells(cfg: SweepConfig, limit: int | None = None) -> list[Cell]:
    """The cells in run order: per model, per benchmark, ``none`` first, then methods x budgets."""
    lim = limit if limit is not None else cfg.limit
    cells = []
    for m in cfg.models:
        for b in cfg.benchmarks:
            for meth in cfg.methods:
                for budget in meth.budgets:
                    ident = dict(
                        model=m.name, model_source=m.source(), dtype=m.dtype, prompt=m.prompt,
                        benchmark=b.label, benchmark_loader=b.name, benchmark_path=b.path,
                        benchmark_options=b.options or None,
                        method=meth.label, method_name=None if meth.spec else meth.name,
                        spec=meth.spec, params=meth.params, budget_param=meth.budget_param, budget=budget,
                        seed=cfg.seed, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, limit=lim,
                    )
                    cells.append(Cell(m, b, meth, budget, ident, cell_key(**ident)))
    refs: dict = {}
    for c in cells:
        if c.is_reference:
            refs.setdefault((c.model.name, c.bench.label), c.key)
    for c in cells:
        c.ref_key = refs.get((c.model.name, c.bench.label))
    return cells


def comparable(record: Mapping) -> dict:
    """``record`` without the timing, memory and environment fields (:data:`VOLATILE_FIELDS`)."""
    return {k: v for k, v in record.items() if k not in VOLATILE_FIELDS}


# ----------------------------------------------------------------------------------------------------
# Paths, models, prompts


def _resolve(path: str, cfg: SweepConfig) -> Path | None:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    for base in (Path.cwd(), cfg.source.resolve().parent if cfg.source else None, _REPO_ROOT):
        if base is not None and (base / p).exists():
            return base / p
    return None


def _tried(path: str, cfg: SweepConfig) -> str:
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    bases = [Path.cwd()] + ([cfg.source.resolve().parent] if cfg.source else []) + [_REPO_ROOT]
    return ", ".join(dict.fromkeys(str(b / p) for b in bases))


def _preflight(cfg: SweepConfig, cells: Sequence[Cell], store: ResultsStore) -> dict[str, Path]:
    """Resolve every path the unfinished cells need; raise :class:`MissingAssetError` naming the fixes."""
    pending = [c for c in cells if not store.has(c.key)]
    paths: dict[str, Path] = {}
    problems: list[str] = []
    for b in cfg.benchmarks:
        p = _resolve(b.path, cfg)
        if p is not None:
            paths[b.label] = p
        elif any(c.bench is b for c in pending):
            fix = ""
            if b.name == "embedded" and Path(b.path).as_posix().rstrip("/").endswith("assets/embedded/bench"):
                fix = (" The embedded benchmark is generated, not downloaded: run "
                       "`python -m vtprune.eval.embedded.generator` (writes assets/embedded/bench).")
            problems.append(f"benchmark {b.label!r}: path {b.path!r} not found (tried {_tried(b.path, cfg)}).{fix}")
    for m in cfg.models:
        if not any(c.model is m for c in pending):
            continue
        if m.path is not None and _resolve(m.path, cfg) is None and not _looks_like_hub_id(m.path):
            problems.append(f"model {m.name!r}: path {m.path!r} not found (tried {_tried(m.path, cfg)}); point "
                            "'path' at a from_pretrained folder (config.json, weights, processor files)")
        if m.builtin == "embedded":
            try:
                _embedded_loader()
            except MissingAssetError as exc:
                problems.append(str(exc))
    if problems:
        raise MissingAssetError("missing assets:\n  - " + "\n  - ".join(problems))
    return paths


def _looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not path.startswith(".")


def _embedded_loader():
    try:
        from .embedded import load_embedded
        from .embedded.load import MODEL_DIR
    except ImportError as exc:  # the embedded model is not part of this checkout yet
        raise MissingAssetError(f"builtin model 'embedded' is not available in this checkout ({exc}); "
                                "use a 'tiny-*' builtin or a 'path' model") from exc
    if not (Path(MODEL_DIR) / "config.json").exists():
        raise MissingAssetError(f"builtin model 'embedded': no checkpoint at {MODEL_DIR}; train it with "
                                "`python scripts/train_embedded.py` (or use a 'tiny-*' builtin)")
    return load_embedded


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _load_model(entry: ModelEntry, cfg: SweepConfig, device):
    """``(model, processor, prompt_fn)``; ``prompt_fn(benchmark, sample) -> text``."""
    dtype = _torch_dtype(entry.dtype)
    family = None
    if entry.builtin and entry.builtin.startswith("tiny-"):
        from vtprune.testing import BUILDERS

        family = entry.builtin[len("tiny-"):]
        model, proc = BUILDERS[family](dtype=dtype)
    elif entry.builtin == "embedded":
        model, proc = _embedded_loader()(device="cpu", dtype=dtype)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        p = _resolve(entry.path, cfg)
        src = str(p) if p is not None else entry.path
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=dtype)
        proc = AutoProcessor.from_pretrained(src)
    model = model.to(device).eval()
    tok = getattr(proc, "tokenizer", proc)
    tok.padding_side = "left"
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return model, proc, _prompt_fn(entry, proc, family)


def _fill(template: str, values: Mapping[str, str]) -> str:
    return re.sub(r"\{(image|prompt|question)\}", lambda m: values[m.group(1)], template)


def _prompt_fn(entry: ModelEntry, proc, family: str | None) -> Callable:
    image = getattr(proc, "image_token", None) or "<image>"
    if entry.prompt is not None:
        return lambda bench, s: _fill(entry.prompt, {"image": image, "prompt": bench.prompt(s), "question": s.question})
    if family is not None:
        from vtprune.testing import prompt_for

        return lambda bench, s: prompt_for(family, bench.prompt(s))
    if entry.builtin == "embedded":
        from .embedded.model import prompt as embedded_prompt

        return lambda bench, s: embedded_prompt(s.question)  # the format the embedded model was trained on
    if getattr(proc, "chat_template", None):
        def chat(bench, s):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": bench.prompt(s)}]}]
            return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

        return chat
    return lambda bench, s: f"USER: {image}\n{bench.prompt(s)} ASSISTANT:"


# ----------------------------------------------------------------------------------------------------
# Measurement helpers


class _PrefillTimer:
    """Times the first forward of each ``generate`` (the prefill, including vtprune's selection)."""

    def __init__(self, model, sync: Callable[[], None]):
        self.sync = sync
        self.calls = 0
        self.t0 = self.t1 = None
        self._h = [model.register_forward_pre_hook(self._pre, prepend=True), model.register_forward_hook(self._post)]

    def reset(self) -> None:
        self.calls, self.t0, self.t1 = 0, None, None

    def _pre(self, module, args):
        if self.calls == 0:
            self.sync()
            self.t0 = time.perf_counter()

    def _post(self, module, args, output):
        if self.calls == 0:
            self.sync()
            self.t1 = time.perf_counter()
        self.calls += 1

    @property
    def ms(self) -> float | None:
        return None if self.t0 is None or self.t1 is None else (self.t1 - self.t0) * 1e3

    def remove(self) -> None:
        for h in self._h:
            h.remove()
        self._h = []


def _new_tokens(gen, eos: set[int], pad: int | None) -> list[int]:
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


def _eos_ids(model, tok) -> set[int]:
    ids = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), getattr(tok, "eos_token_id", None)):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return ids


def _sample_flops(model, patch, inputs, new_tokens: list[int]) -> list[dict]:
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


def _vit_prefix(cfg) -> int:
    vc = cfg.vision_config
    if getattr(vc, "model_type", "").startswith("siglip"):
        return 0
    return 1 + int(getattr(vc, "num_register_tokens", 0) or 0)


def _peak_mem(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
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


# ----------------------------------------------------------------------------------------------------
# Sharding


class _Dist:
    def __init__(self, shard_by: str, device: str):
        if shard_by not in ("auto", "accelerate", "none"):
            raise ValueError(f"shard_by must be 'auto', 'accelerate' or 'none', got {shard_by!r}")
        use = shard_by == "accelerate" or (shard_by == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1)
        self.state = None
        self.rank, self.world = 0, 1
        if use:
            from accelerate import PartialState

            cpu = device == "cpu" or (device == "auto" and not _cuda_available())
            self.state = PartialState(cpu=cpu)
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str):
        import torch

        if self.state is not None and device in ("auto", "cuda") and self.state.device.type == "cuda":
            return self.state.device
        if device == "auto":
            return torch.device("cuda" if _cuda_available() else "cpu")
        return torch.device(device)

    def barrier(self) -> None:
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------
# The sweep


def run_sweep(config: Mapping | str | os.PathLike, store_path: str | os.PathLike, *, limit: int | None = None,
              shard_by: str = "auto", progress: bool = True) -> list[dict]:
    """Run (or resume) a sweep; returns the records of its cells in run order.

    Args:
        config: a config dict or a YAML file (module docstring).
        store_path: the results JSONL (per-cell predictions go to ``<stem>.predictions/``).
        limit: first ``limit`` samples of each benchmark (overrides the config's ``limit``; part of
            the cell identity, so limited and full runs never mix).
        shard_by: ``"auto"`` (data-parallel when ``WORLD_SIZE > 1``), ``"accelerate"`` or ``"none"``.
        progress: tqdm bars (overall cells, samples of the current cell) on the main process.

    Cells finished in the store are skipped; a partial cell continues from its predictions file.
    A method the model's family does not support (``vtprune.patch`` raises ``ValueError``) gets a
    record with ``status: "unsupported"`` and ``error``. Every rank returns the records.
    """
    import torch
    from tqdm.auto import tqdm

    cfg = load_config(config)
    cells = plan_cells(cfg, limit)
    dist = _Dist(shard_by, cfg.device)
    device = dist.device(cfg.device)
    store = ResultsStore(store_path)
    bench_paths = _preflight(cfg, cells, store)
    env = environment(device, dist.world)
    benches: dict[str, Any] = {}

    def bench_of(entry: BenchEntry):
        if entry.label not in benches:
            from .benchmarks import load_benchmark

            bench = load_benchmark(entry.name, bench_paths[entry.label], **entry.options)
            lim = limit if limit is not None else cfg.limit
            benches[entry.label] = bench.subset(limit=lim) if lim is not None else bench
        return benches[entry.label]

    done_at_start = sum(store.has(c.key) for c in cells)
    overall = tqdm(total=len(cells), initial=done_at_start, desc="sweep", unit="cell", position=0,
                   disable=not (progress and dist.main), dynamic_ncols=True)
    try:
        for model_entry in cfg.models:
            mine = [c for c in cells if c.model is model_entry]
            if all(store.has(c.key) for c in mine):
                continue
            model, proc, prompt_fn = _load_model(model_entry, cfg, device)
            try:
                for cell in mine:
                    if store.has(cell.key):
                        continue
                    overall.set_postfix_str(f"{model_entry.name} | {cell.bench.label} | {cell.method.label} @ {cell.budget}")
                    _run_cell(cell, model, proc, prompt_fn, bench_of(cell.bench), store, dist, device, cfg, env, progress)
                    overall.update(1)
            finally:
                del model, proc
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        overall.close()
    dist.barrier()
    return [store.get(c.key) for c in cells]


def _patch_args(cell: Cell) -> tuple[Any, dict]:
    m = cell.method
    if m.spec is not None:
        return m.spec.replace("{budget}", str(cell.budget)), {}
    params = dict(m.params)
    if m.budget_param is not None and cell.budget is not None:
        params[m.budget_param] = cell.budget
    return m.name, params


def _run_cell(cell: Cell, model, proc, prompt_fn, bench, store: ResultsStore, dist: _Dist, device, cfg: SweepConfig,
              env: dict, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm

    import vtprune

    writer = store.predictions(cell.key)
    samples = bench.samples
    bs = cfg.batch_size
    batches = [samples[i:i + bs] for i in range(0, len(samples), bs)]
    mine = [bt for j, bt in enumerate(batches) if j % dist.world == dist.rank]
    done = writer.done_ids()
    todo = [bt for bt in mine if not all(s.id in done for s in bt)]
    method, params = _patch_args(cell)
    error = None
    try:  # every rank tries, so that rank 0 knows even when it has no batch left
        patch = vtprune.patch(model, method, seed=cfg.seed, **params)
    except ValueError as exc:  # this method cannot run on this model family / config
        error, todo = str(exc), []
    if error is None and not todo:
        patch.remove()
    elif error is None:
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        timer = _PrefillTimer(model, sync)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        n_mine = sum(len(bt) for bt in mine)
        bar = tqdm(total=n_mine, initial=n_mine - sum(len(bt) for bt in todo), desc=cell.method.label, unit="sample",
                   position=1, leave=False, disable=not (progress and dist.main), dynamic_ncols=True)
        try:
            for bt in todo:
                rows = _predict_batch(bt, model, proc, prompt_fn, bench, patch, timer, sync, device, cfg)
                for _, extra in rows:
                    extra["rank"] = dist.rank
                writer.append_many([(s.id, text, extra) for s, (text, extra) in zip(bt, rows) if s.id not in done])
                bar.update(len(bt))
        finally:
            bar.close()
            timer.remove()
            patch.remove()
    dist.barrier()
    if dist.main:
        store.put(cell.key, _record(cell, bench, writer, store, env, error))


def _predict_batch(batch, model, proc, prompt_fn, bench, patch, timer: _PrefillTimer, sync, device, cfg: SweepConfig):
    import torch

    texts = [prompt_fn(bench, s) for s in batch]
    images = [s.load_image() for s in batch]
    inputs = proc(text=texts, images=images, return_tensors="pt", padding=True)
    inputs = inputs.to(device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    tok = getattr(proc, "tokenizer", proc)
    timer.reset()
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id)
    sync()
    total_ms = (time.perf_counter() - t0) * 1e3
    gen = out[:, inputs["input_ids"].shape[1]:]
    answers = tok.batch_decode(gen, skip_special_tokens=True)
    n_new = _new_tokens(gen.cpu(), _eos_ids(model, tok), tok.pad_token_id)
    flops = _sample_flops(model, patch, inputs, n_new)
    b = len(batch)
    st = patch.stats
    peak, kind = _peak_mem(device)
    rows = []
    for i in range(b):
        extra = dict(flops[i])
        extra.update(prefill_ms=timer.ms / b if timer.ms is not None else None, total_ms=total_ms / b, select_ms=st.select_ms / b,
                     vision_ms=st.vision_ms / b, peak_mem_mib=peak, peak_mem_kind=kind, batch=b)
        rows.append((answers[i].strip(), extra))
    return rows


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(xs) if xs else None


def _record(cell: Cell, bench, writer, store: ResultsStore, env: dict, error: str | None) -> dict:
    ident = cell.identity
    rec: dict[str, Any] = {k: ident[k] for k in ("model", "benchmark", "benchmark_loader", "method", "method_name",
                                                 "params", "budget_param", "budget")}
    rec["spec"] = cell.method.spec
    rec["n"] = len(bench.samples)
    if error is not None:
        rec.update(status="unsupported", error=error, accuracy=None, rel_accuracy=None)
        return rec
    rows = writer.records()
    preds = {s.id: rows[s.id]["prediction"] for s in bench.samples if s.id in rows}
    extras = [rows[s.id].get("extra", {}) for s in bench.samples if s.id in rows]  # benchmark order: reproducible means
    score = bench.score(preds)
    rec["status"] = "ok"
    rec["accuracy"] = score["primary"]
    rec["score"] = score
    for k in FLOPS_FIELDS + ("visual_tokens", "visual_tokens_in", "prompt_tokens", "new_tokens"):
        rec[k] = _mean([e.get(k) for e in extras])
    for k in ("llm_tokens_per_layer", "visual_tokens_per_layer"):
        lists = [e.get(k) for e in extras if e.get(k)]
        rec[k] = [sum(col) / len(col) for col in zip(*lists)] if lists else []
    # relative to the vanilla cell of the same model x benchmark
    ref = rec if cell.key == cell.ref_key else (store.get(cell.ref_key) if cell.ref_key else None)
    if ref is not None and ref.get("status") == "ok":
        racc, rflops, rllm = ref.get("accuracy"), ref.get("total_prefill_tflops"), ref.get("llm_prefill_tflops")
        rec["rel_accuracy"] = 1.0 if ref is rec else (rec["accuracy"] / racc if racc else None)
        rec["flops_ratio"] = rec["total_prefill_tflops"] / rflops if rflops else None
        rec["llm_flops_ratio"] = rec["llm_prefill_tflops"] / rllm if rllm else None
    else:
        rec["rel_accuracy"] = rec["flops_ratio"] = rec["llm_flops_ratio"] = None
    rec["prefill_ms"] = _median([e.get("prefill_ms") for e in extras])
    rec["total_ms"] = _median([e.get("total_ms") for e in extras])
    rec["select_ms"] = _mean([e.get("select_ms") for e in extras])
    rec["vision_ms"] = _mean([e.get("vision_ms") for e in extras])
    peaks = [e.get("peak_mem_mib") for e in extras if e.get("peak_mem_mib") is not None]
    rec["peak_mem_mib"] = max(peaks) if peaks else None
    rec["peak_mem_kind"] = next((e.get("peak_mem_kind") for e in extras if e.get("peak_mem_kind")), None)
    rec["env"] = env
    return rec
