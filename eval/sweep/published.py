"""Published numbers carried by a sweep config, to compare with the measured ones (``vtprune report``).

The ``published:`` block of a config::

    published:
      sources:                       # id -> where the numbers come from
        hiprune-tab2:
          paper: "HiPrune (Liu et al.)"
          arxiv: "2508.00553"
          table: "Tab. 2"
          kind: paper                # paper | third-party | figure | repository
          note: "MMB, TextVQA, VQAv2 from the LLaVA scripts, the rest from lmms-eval (App. C)"
      metrics:                       # column id -> the paper's convention and the harness field that matches it
        mme:
          benchmark: mme             # a benchmark label of the config (default: the column id)
          field: total               # key (dotted for nested) of the record's ``score`` (default: primary)
          scale: 1                   # measured = score[field] * scale (default 100: fractions -> %)
          convention: "MME total = perception + cognition (points)"
          differs: "..."             # optional: where the harness's protocol differs from the paper's
      rows:                          # one row per (model, method, budget) of a paper's table
        - {method: none, source: hiprune-tab2, values: {gqa: 61.9, mme: 1862}}
        - {method: hiprune, budget: 192, source: hiprune-tab2, values: {gqa: 59.2, mme: 1814}}

``model`` may be left out of a row when the config has one model; ``method`` is a method *label* of the
config (``none`` for the vanilla row); ``budget`` one of that method's budgets (absent for ``none`` and
for methods without a budget knob). Every error is a ``ValueError`` naming the key.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

SOURCE_KINDS = ("paper", "third-party", "figure", "repository")
_SOURCE_KEYS = {"paper", "arxiv", "table", "kind", "note", "repository", "commit", "file"}
_METRIC_KEYS = {"benchmark", "field", "scale", "convention", "differs"}
_ROW_KEYS = {"model", "method", "budget", "source", "values", "note"}


@dataclass(frozen=True)
class Source:
    id: str
    paper: str
    table: str | None = None
    arxiv: str | None = None
    kind: str = "paper"
    note: str | None = None
    repository: str | None = None
    commit: str | None = None
    file: str | None = None

    def cite(self) -> str:
        """``HiPrune (Liu et al.), arXiv 2508.00553, Tab. 2`` (+ the repository file where there is one)."""
        parts = [self.paper]
        if self.arxiv:
            parts.append(f"arXiv {self.arxiv}")
        if self.table:
            parts.append(self.table)
        if self.file:
            where = f"{self.repository}:{self.file}" if self.repository else self.file
            parts.append(where + (f" @ {self.commit}" if self.commit else ""))
        return ", ".join(parts) + ("" if self.kind == "paper" else f" [{self.kind}]")


@dataclass(frozen=True)
class Metric:
    id: str
    benchmark: str
    convention: str
    field: str = "primary"
    scale: float = 100.0
    differs: str | None = None

    def measured(self, record: Mapping | None) -> float | None:
        """The record's value in this metric's convention (``None`` when absent)."""
        if not record or record.get("status", "ok") != "ok":
            return None
        v: Any = record.get("score") or {}
        for part in self.field.split("."):
            if not isinstance(v, Mapping) or part not in v:
                return None
            v = v[part]
        return float(v) * self.scale if isinstance(v, (int, float)) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class Row:
    model: str
    method: str
    budget: Any
    source: str
    values: dict = field(hash=False)
    note: str | None = None


@dataclass
class Published:
    sources: dict[str, Source]
    metrics: dict[str, Metric]
    rows: list[Row]

    def to_dict(self) -> dict:
        return {"sources": {k: asdict(v) for k, v in self.sources.items()},
                "metrics": {k: asdict(v) for k, v in self.metrics.items()},
                "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Published":
        return cls(sources={k: Source(**v) for k, v in d["sources"].items()},
                   metrics={k: Metric(**v) for k, v in d["metrics"].items()},
                   rows=[Row(**r) for r in d["rows"]])

    def reference(self, row: Row, metric_id: str) -> float | None:
        """The published vanilla value for ``row``'s model and ``metric_id``: from the same source when it
        has one, else from the first source with a vanilla row."""
        refs = [r for r in self.rows if r.model == row.model and r.method == "none" and metric_id in r.values]
        same = [r for r in refs if r.source == row.source]
        pick = (same or refs)[:1]
        return pick[0].values[metric_id] if pick else None


def _err(key: str, problem: str) -> ValueError:
    return ValueError(f"sweep config: {key}: {problem}")


def _check_keys(obj: Mapping, allowed: set, where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _err(f"{where}.{unknown[0]}", f"unknown key; allowed keys: {', '.join(sorted(allowed))}")


def _text(obj: Mapping, key: str, where: str, required: bool) -> str | None:
    v = obj.get(key)
    if v is None and not required:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and key in ("arxiv", "commit"):
        v = str(v)
    if not isinstance(v, str) or not v.strip():
        raise _err(f"{where}.{key}", f"must be a non-empty string, got {v!r}")
    return v.strip()


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_published(raw: Any, models: Sequence[str], benchmarks: Sequence[str],
                    method_budgets: Mapping[str, tuple]) -> Published:
    """Validate the ``published`` block against the config's model names, benchmark labels and method labels
    (``method_budgets``: label -> its budgets, ``(None,)`` for a method without a budget knob)."""
    if not isinstance(raw, Mapping):
        raise _err("published", "must be a mapping with keys sources, metrics, rows")
    _check_keys(raw, {"sources", "metrics", "rows"}, "published")
    sources: dict[str, Source] = {}
    src_raw = raw.get("sources")
    if not isinstance(src_raw, Mapping) or not src_raw:
        raise _err("published.sources", "required: a mapping of source id -> {paper, arxiv, table, kind, note}")
    for sid, s in src_raw.items():
        where = f"published.sources.{sid}"
        if not isinstance(s, Mapping):
            raise _err(where, f"must be a mapping {{paper, arxiv, table, kind, note}}, got {s!r}")
        _check_keys(s, _SOURCE_KEYS, where)
        kind = s.get("kind", "paper")
        if kind not in SOURCE_KINDS:
            raise _err(f"{where}.kind", f"must be one of {', '.join(SOURCE_KINDS)}, got {kind!r}")
        src = Source(id=str(sid), paper=_text(s, "paper", where, True), table=_text(s, "table", where, False),
                     arxiv=_text(s, "arxiv", where, False), kind=kind, note=_text(s, "note", where, False),
                     repository=_text(s, "repository", where, False), commit=_text(s, "commit", where, False),
                     file=_text(s, "file", where, False))
        if src.table is None and src.file is None:
            raise _err(where, "needs 'table' (the paper's table or figure) or 'file' (a repository file)")
        sources[src.id] = src

    metrics: dict[str, Metric] = {}
    met_raw = raw.get("metrics")
    if not isinstance(met_raw, Mapping) or not met_raw:
        raise _err("published.metrics", "required: a mapping of column id -> {benchmark, field, scale, convention}")
    for mid, m in met_raw.items():
        where = f"published.metrics.{mid}"
        if not isinstance(m, Mapping):
            raise _err(where, f"must be a mapping {{benchmark, field, scale, convention}}, got {m!r}")
        _check_keys(m, _METRIC_KEYS, where)
        bench = _text(m, "benchmark", where, False) or str(mid)
        if bench not in benchmarks:
            raise _err(f"{where}.benchmark", f"no benchmark labelled {bench!r} in the config; its benchmarks: "
                                             f"{', '.join(benchmarks)}")
        scale = m.get("scale", 100.0)
        if not _number(scale) or scale <= 0:
            raise _err(f"{where}.scale", f"must be a positive number, got {scale!r}")
        metrics[str(mid)] = Metric(id=str(mid), benchmark=bench, convention=_text(m, "convention", where, True),
                                   field=_text(m, "field", where, False) or "primary", scale=float(scale),
                                   differs=_text(m, "differs", where, False))

    rows_raw = raw.get("rows")
    if not isinstance(rows_raw, list) or not rows_raw:
        raise _err("published.rows", "required: a non-empty list of {method, budget, source, values}")
    rows: list[Row] = []
    seen: set = set()
    for i, r in enumerate(rows_raw):
        where = f"published.rows[{i}]"
        if not isinstance(r, Mapping):
            raise _err(where, f"must be a mapping {{model, method, budget, source, values}}, got {r!r}")
        _check_keys(r, _ROW_KEYS, where)
        model = r.get("model")
        if model is None:
            if len(models) != 1:
                raise _err(f"{where}.model", f"required (the config has {len(models)} models: {', '.join(models)})")
            model = models[0]
        if model not in models:
            raise _err(f"{where}.model", f"unknown model {model!r}; the config's models: {', '.join(models)}")
        method = _text(r, "method", where, True)
        if method not in method_budgets:
            raise _err(f"{where}.method", f"no method labelled {method!r} in the config; its methods: "
                                          f"{', '.join(method_budgets)}")
        budget = r.get("budget")
        allowed = method_budgets[method]
        if budget not in allowed:
            shown = "none (leave 'budget' out)" if allowed == (None,) else ", ".join(map(str, allowed))
            raise _err(f"{where}.budget", f"{budget!r} is not a budget of method {method!r}; its budgets: {shown}")
        src = _text(r, "source", where, True)
        if src not in sources:
            raise _err(f"{where}.source", f"unknown source {src!r}; published.sources: {', '.join(sources)}")
        values = r.get("values")
        if not isinstance(values, Mapping) or not values:
            raise _err(f"{where}.values", "must be a non-empty mapping of metric id -> number")
        for k, v in values.items():
            if k not in metrics:
                raise _err(f"{where}.values.{k}", f"no such column in published.metrics ({', '.join(metrics)})")
            if not _number(v):
                raise _err(f"{where}.values.{k}", f"must be a number, got {v!r}")
        ident = (model, method, budget, src)
        if ident in seen:
            raise _err(where, f"repeats the row of model {model!r}, method {method!r}, budget {budget!r}, source {src!r}")
        seen.add(ident)
        rows.append(Row(model=model, method=method, budget=budget, source=src,
                        values={str(k): float(v) for k, v in values.items()}, note=_text(r, "note", where, False)))
    return Published(sources=sources, metrics=metrics, rows=rows)


# ----------------------------------------------------------------------------------------------------
# The copy next to a results store (so that ``vtprune report RESULTS`` finds the published numbers)


def sidecar_path(store_path: str | os.PathLike) -> Path:
    """``runs/x/results.jsonl`` -> ``runs/x/results.published.json``."""
    p = Path(store_path)
    return p.with_name(p.stem + ".published.json")


def save_sidecar(store_path: str | os.PathLike, name: str, published: Published) -> Path:
    """Save ``published`` under ``name`` in the store's sidecar (other configs' blocks are kept);
    atomic (a temporary file renamed) under a lock."""
    from filelock import FileLock

    path = sidecar_path(store_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"configs": {}}
        data["configs"][name] = published.to_dict()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    return path


def load_sidecar(store_path: str | os.PathLike) -> dict[str, Published]:
    """The published blocks saved next to a store, by config name (``{}`` when there are none)."""
    path = sidecar_path(store_path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: Published.from_dict(d) for name, d in data.get("configs", {}).items()}
