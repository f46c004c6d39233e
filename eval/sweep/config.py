"""Sweep configs: parse and validate the YAML/dict (every error a ``ValueError`` naming the key), plan the cells.

The format is documented in :mod:`vtprune.eval.sweep`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..store import cell_key

#: Methods every sweep includes (``none`` once per model x benchmark, ``random`` at every budget).
BASELINES = ("none", "random")


_TOP_KEYS = {"name", "models", "benchmarks", "methods", "budgets", "max_new_tokens", "batch_size", "seed", "limit",
             "dtype", "device", "store", "variables", "baselines", "published"}
_MODEL_KEYS = {"name", "path", "builtin", "open_clip", "hub", "dtype", "prompt"}
_BENCH_KEYS = {"name", "path", "label", "options", "models", "limit"}
_METHOD_KEYS = {"name", "spec", "params", "label", "budget_param", "budgets", "models"}
_DTYPES = ("float32", "float16", "bfloat16")


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: str | None = None
    builtin: str | None = None
    dtype: str = "float32"
    prompt: str | None = None
    where: str = field(default="models", compare=False)  # its place in the config, for messages
    hub: str | None = field(default=None, compare=False)  # the Hugging Face repository to download (a hint only)
    open_clip: str | None = None  # an open_clip architecture; ``path`` is then its weights file

    def source(self) -> dict:
        if self.builtin:
            return {"builtin": self.builtin}
        return {"open_clip": self.open_clip, "path": self.path} if self.open_clip else {"path": self.path}


@dataclass(frozen=True)
class BenchEntry:
    name: str  # loader
    path: str
    label: str
    options: dict = field(default_factory=dict, hash=False)
    models: tuple | None = None  # the model names it is run with (None: every model)
    limit: int | None = None  # its first N samples (None: the config's ``limit``)

    def runs_on(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True)
class MethodEntry:
    name: str  # registered method name, or the label of a composed spec
    label: str
    params: dict = field(default_factory=dict, hash=False)
    budget_param: str | None = "keep"
    budgets: tuple = (None,)
    spec: str | None = None  # composition template with {budget}
    models: tuple | None = None  # the model names it runs on (None: every model)
    where: str = field(default="methods", compare=False)  # its place in the config, for messages

    def runs_on(self, model: str) -> bool:
        return self.models is None or model in self.models


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
    variables: dict = field(default_factory=dict)  # ${NAME} -> its description (the config's ``variables:``)
    unset_variables: tuple = ()  # names left unresolved (load_config(..., allow_unset=True) only)
    published: Any = None  # a :class:`.published.Published`, or None


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


def load_config(config: Mapping | str | os.PathLike, variables: Mapping[str, str] | None = None, *,
                allow_unset: bool = False) -> SweepConfig:
    """Parse and validate a sweep config (dict, or a YAML/JSON file path); ``ValueError`` names the key.

    ``${NAME}`` placeholders take their value from ``variables`` (the CLI's ``--set NAME=VALUE``), else
    from the environment. An unset name raises ``ValueError`` naming it, unless ``allow_unset``: then
    it stays in the strings as ``${NAME}`` and ``unset_variables`` lists it (for a message that says
    what to download and where before anything is set).
    """
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

    from . import variables as var
    from .models import BUILTIN_MODELS

    _check_keys(raw, _TOP_KEYS, "")
    described = raw.get("variables") or {}
    if not isinstance(described, Mapping) or not all(
            isinstance(k, str) and var.PATTERN.fullmatch("${" + k + "}") and isinstance(v, str) for k, v in described.items()):
        raise _err("variables", f"must map variable names to descriptions (MODELS: folder of the checkpoints), got {described!r}")
    names = var.used({k: v for k, v in raw.items() if k != "variables"})
    unknown = sorted(set(variables or {}) - set(names))
    if unknown:
        raise _err("variables", f"--set {unknown[0]}: the config uses no ${{{unknown[0]}}}"
                                + (f" (it uses {', '.join(names)})" if names else " (it uses no variables)"))
    values = var.values_for(names, variables)
    unset = [n for n in names if n not in values]
    if unset and not allow_unset:
        raise ValueError("sweep config: " + var.unset_message(unset, described))
    raw = var.substitute({k: v for k, v in raw.items() if k != "variables"}, values)
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
        open_clip = _str(m, "open_clip", where, required=False)
        if open_clip is not None and path is None:
            raise _err(f"{where}.open_clip", "needs 'path': the weights file of the open_clip model")
        hub = _str(m, "hub", where, required=False)
        if hub is not None and (builtin is not None or not re.fullmatch(r"[\w.-]+/[\w.-]+", hub)):
            raise _err(f"{where}.hub", "the Hugging Face repository id (owner/name) of a 'path' model, "
                                       f"shown in the download instructions; got {hub!r}")
        mdt = m.get("dtype", dtype)
        if mdt not in _DTYPES:
            raise _err(f"{where}.dtype", f"must be one of {', '.join(_DTYPES)}, got {mdt!r}")
        prompt = _str(m, "prompt", where, required=False)
        if prompt is not None and "{image}" not in prompt:
            raise _err(f"{where}.prompt", "the template must contain {image} (and usually {prompt} or {question})")
        if name in seen:
            raise _err(f"{where}.name", f"duplicate model name {name!r}")
        seen.add(name)
        if open_clip is not None and prompt is not None:
            raise _err(f"{where}.prompt", "an open_clip model takes no prompt (it encodes images and texts)")
        models.append(ModelEntry(name=name, path=path, builtin=builtin, dtype=mdt, prompt=prompt, where=where,
                                 hub=hub, open_clip=open_clip))

    # benchmarks
    from ..benchmarks import BENCHMARKS

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
        only = _model_subset(b.get("models"), models, where)
        blimit = b.get("limit")
        if blimit is not None and (isinstance(blimit, bool) or not isinstance(blimit, int) or blimit < 1):
            raise _err(f"{where}.limit", f"must be a positive integer (its first N samples), got {blimit!r}")
        benches.append(BenchEntry(name=name, path=path, label=label, options=dict(opts), models=only, limit=blimit))

    from .clip import CLIP_LOADERS as clip_loaders

    for e in models:
        for b in benches:
            if not b.runs_on(e.name):
                continue
            if e.open_clip and b.name not in clip_loaders:
                raise _err(f"{e.where}.open_clip", f"an open_clip model runs the {', '.join(clip_loaders)} benchmarks, "
                                                   f"not {b.name!r} ({b.label!r}); put it in a config of its own")
            if not e.open_clip and b.name in ("retrieval", "karpathy"):
                raise _err(f"{e.where}", f"benchmark {b.label!r} (image-text retrieval) needs a CLIP model "
                                         "('open_clip: ARCH' with 'path: WEIGHTS_FILE')")

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
            if "budget_param" in m and bparam is None and m.get("budgets") is not None:
                raise _err(f"{where}.budgets", "a method with 'budget_param: null' runs once at its own settings; "
                                               "drop 'budgets'")
            fields = {f.name for f in dataclasses.fields(known[name])}
            bad = sorted(set(params) - fields)
            if bad:
                raise _err(f"{where}.params.{bad[0]}", f"method {name!r} has no such parameter; its parameters: {', '.join(sorted(fields))}")
            if name == "none" or bparam is None:
                bparam = None
            elif not isinstance(bparam, str) or bparam not in fields:
                raise _err(f"{where}.budget_param", f"method {name!r} has no parameter {bparam!r}; its parameters: {', '.join(sorted(fields))}")
            elif bparam in params:
                raise _err(f"{where}.params.{bparam}", "is the budget knob (budget_param); set it through 'budgets' instead")
        if (name == "none" and spec is None) or (spec is None and bparam is None):
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
        only = _model_subset(m.get("models"), models, where)
        if only is not None and name == "none" and spec is None:
            raise _err(f"{where}.models", "the 'none' reference runs on every model (relative accuracy needs it)")
        methods.append(MethodEntry(name=name, label=label, params=params, budget_param=bparam, budgets=budgets,
                                   spec=spec, models=only, where=where))
    # baselines
    baselines = raw.get("baselines", list(BASELINES))
    if (not isinstance(baselines, list) or "none" not in baselines
            or any(b not in BASELINES for b in baselines) or len(set(baselines)) != len(baselines)):
        raise _err("baselines", f"must list 'none' (relative accuracy needs it) and optionally 'random', got {baselines!r}")
    if not any(e.name == "none" and e.spec is None for e in methods):
        methods.insert(0, MethodEntry(name="none", label="none", budget_param=None, budgets=(None,),
                                      where="methods (the 'none' baseline, always added)"))
    if "random" in baselines and not any(e.name == "random" and e.spec is None for e in methods):
        if top_budgets is None:
            raise _err("budgets", "required: the random baseline runs at the top-level budgets")
        if any(e.label == "random" for e in methods):
            raise _err("methods", "the label 'random' is reserved for the random baseline")
        methods.insert(1, MethodEntry(name="random", label="random", budget_param="keep", budgets=top_budgets,
                                      where="budgets (the 'random' baseline runs at the top-level budgets)"))
    methods.sort(key=lambda e: 0 if (e.name == "none" and e.spec is None) else 1)  # the reference first (stable)

    store = raw.get("store")
    if store is not None and not isinstance(store, str):
        raise _err("store", f"must be a path string, got {store!r}")
    published = None
    if raw.get("published") is not None:
        from .published import parse_published

        published = parse_published(raw["published"], [e.name for e in models], [b.label for b in benches],
                                    {e.label: e.budgets for e in methods})
    return SweepConfig(
        models=models, benchmarks=benches, methods=methods,
        max_new_tokens=_int(raw, "max_new_tokens", 8, 1), batch_size=_int(raw, "batch_size", 1, 1),
        seed=_int(raw, "seed", 0, 0), limit=_int(raw, "limit", None, 1), device=device, dtype=dtype, store=store,
        name=raw.get("name"), source=source, variables=dict(described), unset_variables=tuple(unset),
        published=published,
    )


def bench_limit(cfg: SweepConfig, bench: BenchEntry, limit: int | None = None) -> int | None:
    """The number of samples of ``bench`` a sweep evaluates (None: all)."""
    for value in (limit, bench.limit, cfg.limit):
        if value is not None:
            return value
    return None


def _model_subset(only, models: list[ModelEntry], where: str) -> tuple | None:
    """A ``models:`` restriction (of a method or a benchmark) checked against the config's model names."""
    if only is None:
        return None
    names = [e.name for e in models]
    if not isinstance(only, list) or not only or not all(isinstance(x, str) for x in only):
        raise _err(f"{where}.models", f"must be a non-empty list of model names ({', '.join(names)}), got {only!r}")
    bad = [x for x in only if x not in names]
    if bad:
        raise _err(f"{where}.models", f"unknown model {bad[0]!r}; the config's models: {', '.join(names)}")
    return tuple(dict.fromkeys(only))


def plan_cells(cfg: SweepConfig, limit: int | None = None) -> list[Cell]:
    """The cells in run order: per model, per benchmark, ``none`` first, then methods x budgets.

    ``limit`` (e.g. from the command line) overrides a benchmark's own ``limit``, which overrides the config's."""
    cells = []
    for m in cfg.models:
        for b in cfg.benchmarks:
            if not b.runs_on(m.name):
                continue
            lim = bench_limit(cfg, b, limit)
            for meth in cfg.methods:
                if not meth.runs_on(m.name):
                    continue
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
