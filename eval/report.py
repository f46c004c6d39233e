"""Reports of a sweep's results store: a markdown table + ranking, CSVs, and accuracy-vs-FLOPs plots.

    from vtprune.eval.report import make_report
    paths = make_report("runs/tiny/results.jsonl", "runs/tiny/report")            # x: LLM prefill FLOPs
    paths = make_report("runs/tiny/results.jsonl", "runs/tiny/report", x="total")  # x: total prefill FLOPs

or ``vtprune report RESULTS.jsonl --out DIR [--x llm|total]``. Written to ``DIR``, per model of the store:

- ``results.md``: one table per model (benchmark, method, budget, n questions, accuracy, relative
  accuracy, LLM prefill FLOPs as a fraction of vanilla, total prefill TFLOPs per sample and its fraction,
  visual tokens, latency; a "budget clamped" column when an int budget exceeded some image's tokens),
  the method ranking (mean relative accuracy at the budgets every ranked method ran), the accuracy by
  question type (or another breakdown the benchmark scores, e.g. VQAv2 answer types), unsupported
  cells, and the plots inline;
- ``results.csv``: one row per cell with every numeric field; ``by_type.csv``: one row per cell and
  question type (n, accuracy, accuracy relative to ``none`` on the same type);
- ``pareto_<model>__<benchmark>.png``: accuracy vs prefill FLOPs, one line per method through its
  budgets (points labelled with the budget, placed so that labels do not overlap: :mod:`.labels`), the
  vanilla ``none`` point as a star and a dotted line at its accuracy. x (``x=``): ``"llm"`` (default,
  the papers' convention and docs/efficiency.md's primary figure): LLM prefill FLOPs as a fraction of
  ``none`` on the same model and benchmark; ``"total"``: total prefill TFLOPs per sample (vision +
  projector + LLM), with the fraction of vanilla on a top axis;
- ``relative_<model>.png``: relative accuracy (mean over benchmarks) vs the mean FLOPs fraction (same x);
- when the sweep's config carries published numbers (its ``published`` block, saved next to the store by
  the sweep, or ``config=``): a "Published vs measured" section in ``results.md`` (each number with its
  convention and source, the measured value in the same convention, the difference, both relative to
  their own vanilla row), ``published.csv``, and ``published_<config>__<model>.png`` (measured against
  published, one panel per column, one colour per method, points labelled with the budget).

Stores written before a field existed stay readable: a missing FLOPs fraction is computed from the
``none`` record, a missing per-type n or ``budget_clamped`` shows as "–".
"""
from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .labels import place_labels
from .store import ResultsStore

__all__ = ["make_report", "load_rows", "ranking", "compare_published", "breakdowns", "CSV_COLUMNS",
           "BREAKDOWN_COLUMNS", "PUBLISHED_COLUMNS", "X_AXES"]

CSV_COLUMNS = ("model", "benchmark", "method", "method_name", "budget_param", "budget", "status", "n", "accuracy",
               "rel_accuracy", "total_prefill_tflops", "llm_prefill_tflops", "vision_tflops", "projector_tflops",
               "flops_ratio", "llm_flops_ratio", "fastv_ratio", "visual_tokens", "eq_visual_tokens", "prompt_tokens",
               "kv_mib", "prefill_ms", "total_ms", "peak_mem_mib", "budget_clamped")

BREAKDOWN_COLUMNS = ("model", "benchmark", "method", "budget", "breakdown", "group", "n", "accuracy", "rel_accuracy")

#: ``x=`` of the plots: record field of each point (relative plot: its mean over benchmarks) and axis label.
X_AXES = {
    "llm": ("llm_flops_ratio", "LLM prefill FLOPs (fraction of vanilla `none`)"),
    "total": ("total_prefill_tflops", "total prefill compute per sample (TFLOPs: vision + projector + LLM)"),
}

PUBLISHED_COLUMNS = ("config", "model", "method", "budget", "column", "benchmark", "convention", "published", "measured",
                     "delta", "published_rel", "measured_rel", "delta_rel", "n", "source")

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "*")


def load_rows(results: str | os.PathLike) -> list[dict]:
    """The records of a results store (latest per cell), in order of first appearance."""
    p = Path(results)
    if not p.is_file():
        raise FileNotFoundError(f"results file {p} not found (run `vtprune sweep CONFIG` first)")
    rows = []
    for item in ResultsStore(p).records():
        rec = dict(item["record"])
        ident = item["identity"] or {}
        for k in ("model", "benchmark", "method", "budget", "budget_param"):
            rec.setdefault(k, ident.get(k))
        rec.setdefault("status", "ok")
        rows.append(rec)
    return rows


def _is_ref(r: Mapping) -> bool:
    return r.get("method_name") == "none" or (r.get("method") == "none" and r.get("spec") is None)


def _budget_str(b: Any, ref: bool = True) -> str:
    """A budget for tables and plots: ``None`` is "full" for the vanilla reference and "fixed" for a
    method that runs at its own settings (``budget_param: null``)."""
    if b is None:
        return "full" if ref else "fixed"
    if isinstance(b, float) and b.is_integer() and b > 1:
        b = int(b)
    return f"{b:g}" if isinstance(b, float) else str(b)


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def _acc_scale(rows: Sequence[Mapping]) -> tuple[float, str]:
    """Accuracy display: percent for fractions, raw points (MME) otherwise."""
    if any(r.get("benchmark_loader") == "mme" for r in rows):
        return 1.0, "score (points)"
    return 100.0, "accuracy (%)"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "x"


def _sort_key(r: Mapping):
    b = r.get("budget")
    return (0 if _is_ref(r) else 1, str(r.get("method")), -(b if isinstance(b, (int, float)) else math.inf))


def _ok(rows: Iterable[Mapping]) -> list[Mapping]:
    return [r for r in rows if r.get("status", "ok") == "ok" and r.get("accuracy") is not None]


# ----------------------------------------------------------------------------------------------------
# Ranking


def ranking(rows: Sequence[Mapping], model: str) -> tuple[list[dict], list, list[str]]:
    """Methods of ``model`` ranked by mean relative accuracy at matched budgets.

    The matched budgets are those every ranked method ran at; methods without a budget in common with
    the majority budget knob are left out (returned as the third item). Returns
    ``(rows, budgets, unranked)``, each row ``{method, mean_rel_accuracy, per_budget, mean_flops_ratio,
    mean_llm_flops_ratio, n}`` (``n``: the cells averaged).
    """
    cand = [r for r in _ok(rows) if r.get("model") == model and not _is_ref(r) and r.get("rel_accuracy") is not None]
    by_method: dict[str, list[Mapping]] = defaultdict(list)
    for r in cand:
        by_method[r["method"]].append(r)
    if not by_method:
        return [], [], []
    budget_sets = {m: {r.get("budget") for r in rs} for m, rs in by_method.items()}
    # the budget set most methods share (methods with another knob rarely share values)
    counts: dict[Any, int] = defaultdict(int)
    for bs in budget_sets.values():
        for b in bs:
            counts[b] += 1
    top = max(counts.values())
    shared = {b for b, c in counts.items() if c == top}
    ranked = [m for m, bs in budget_sets.items() if shared <= bs]
    unranked = sorted(set(by_method) - set(ranked))
    budgets = sorted(shared, key=lambda b: -b if isinstance(b, (int, float)) else 0)
    out = []
    for m in ranked:
        rs = [r for r in by_method[m] if r.get("budget") in shared]
        per = {}
        for b in budgets:
            vals = [r["rel_accuracy"] for r in rs if r.get("budget") == b]
            per[b] = sum(vals) / len(vals) if vals else None
        fr = [r["flops_ratio"] for r in rs if r.get("flops_ratio") is not None]
        lr = [r["llm_flops_ratio"] for r in rs if r.get("llm_flops_ratio") is not None]
        out.append({"method": m, "mean_rel_accuracy": sum(r["rel_accuracy"] for r in rs) / len(rs), "per_budget": per,
                    "mean_flops_ratio": sum(fr) / len(fr) if fr else None,
                    "mean_llm_flops_ratio": sum(lr) / len(lr) if lr else None, "n": len(rs)})
    out.sort(key=lambda d: -d["mean_rel_accuracy"])
    return out, budgets, unranked


# ----------------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _method_styles(methods: Sequence[str]) -> dict[str, dict]:
    plt = _plt()
    # tab10 without its grey (random's colour), then the light tab20 shades
    palette = [plt.get_cmap("tab10")(i) for i in range(10) if i != 7] + [plt.get_cmap("tab20")(i) for i in range(1, 20, 2)
                                                                         if i != 15]
    styles = {}
    for i, m in enumerate(sorted(methods, key=lambda m: (m != "random", m))):
        styles[m] = {"color": palette[i % len(palette)], "marker": _MARKERS[i % len(_MARKERS)]}
    if "random" in styles:
        styles["random"] = {"color": "0.45", "marker": "x", "linestyle": "--"}
    return styles


def _pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated (lower-or-equal cost and higher-or-equal accuracy), by increasing cost."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def _n_text(rows: Sequence[Mapping]) -> str:
    """``"n = 480"`` (questions per cell), or the range when cells differ."""
    ns = sorted({r["n"] for r in rows if isinstance(r.get("n"), int)})
    if not ns:
        return "n = ?"
    return f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]} per cell"


def _finish(fig, ax, path: Path, labels: list[tuple[float, float, str, object]], lines: list,
            hlines: Sequence[float] = ()):
    """Legend outside the axes, final layout, labels placed clear of each other, the points and (where
    possible) the lines (:func:`.labels.place_labels`), save."""
    plt = _plt()
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, framealpha=0.9, borderaxespad=0.0)
    fig.tight_layout()
    lo, hi = ax.get_xlim()
    lines = lines + [[(lo, y), (hi, y)] for y in hlines]
    placement = place_labels(ax, labels, lines=lines)
    fig.savefig(path)
    plt.close(fig)
    return placement


def _plot_pareto(rows: Sequence[Mapping], model: str, bench: str, path: Path, styles: dict, x: str = "llm"):
    """Accuracy vs prefill FLOPs of one model x benchmark; returns the label :class:`.labels.Placement`."""
    plt = _plt()
    key, xlabel = X_AXES[x]
    scale, ylabel = _acc_scale(rows)
    fig, ax = plt.subplots(figsize=(9.0, 5.6), dpi=130)
    ref = next((r for r in rows if _is_ref(r)), None)
    pts, labels, lines, hlines = [], [], [], []
    for method in sorted({r["method"] for r in rows if not _is_ref(r)}, key=lambda m: (m != "random", m)):
        rs = sorted((r for r in rows if r["method"] == method and r.get(key) is not None), key=lambda r: r[key])
        if not rs:
            continue
        st = styles[method]
        xs = [r[key] for r in rs]
        ys = [r["accuracy"] * scale for r in rs]
        pts += list(zip(xs, ys))
        ax.plot(xs, ys, color=st["color"], marker=st["marker"], linestyle=st.get("linestyle", "-"), linewidth=1.8,
                markersize=7, label=method, zorder=3)
        labels += [(x_, y_, _budget_str(r.get("budget"), False), st["color"]) for x_, y_, r in zip(xs, ys, rs)]
        lines.append(list(zip(xs, ys)))
    if ref is not None and ref.get(key) is not None:
        x0, y0 = ref[key], ref["accuracy"] * scale
        pts.append((x0, y0))
        ax.axhline(y0, color="goldenrod", linestyle=":", linewidth=1, zorder=1)
        hlines = [y0]
        ax.scatter([x0], [y0], marker="*", s=320, color="gold", edgecolor="black", linewidth=0.8, zorder=5,
                   label="none (vanilla, all tokens)")
        if x == "total":
            secax = ax.secondary_xaxis("top", functions=(lambda v, r=x0: v / r, lambda f, r=x0: f * r))
            secax.set_xlabel("fraction of vanilla total prefill FLOPs")
        elif ref.get("llm_prefill_tflops"):
            t0 = ref["llm_prefill_tflops"]
            secax = ax.secondary_xaxis("top", functions=(lambda v, r=t0: v * r * 1e3, lambda g, r=t0: g / r / 1e3))
            secax.set_xlabel("LLM prefill GFLOPs per sample")
    front = _pareto_front(pts)
    if len(front) > 1:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="0.6", linewidth=4, alpha=0.25, zorder=2, label="Pareto frontier (all methods)")
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{bench} on {model} ({_n_text(rows)} questions): accuracy vs prefill FLOPs\n"
                 "(up and to the left is better; labels are budgets)", fontsize=11)
    ax.grid(True, alpha=0.3)
    return _finish(fig, ax, path, labels, lines, hlines)


def _plot_relative(rows: Sequence[Mapping], model: str, path: Path, styles: dict, x: str = "llm"):
    """Mean relative accuracy (over benchmarks) vs the mean FLOPs fraction, per method and budget; returns
    ``(lines drawn, label Placement)``."""
    plt = _plt()
    key = "llm_flops_ratio" if x == "llm" else "flops_ratio"
    benches = sorted({r["benchmark"] for r in rows})
    fig, ax = plt.subplots(figsize=(9.0, 5.6), dpi=130)
    drawn, labels, lines = 0, [], []
    for method in sorted({r["method"] for r in rows if not _is_ref(r)}, key=lambda m: (m != "random", m)):
        by_budget: dict[Any, list[Mapping]] = defaultdict(list)
        for r in rows:
            if r["method"] == method and r.get("rel_accuracy") is not None and r.get(key) is not None:
                by_budget[r.get("budget")].append(r)
        pts = []
        for b, rs in by_budget.items():
            pts.append((sum(r[key] for r in rs) / len(rs), 100 * sum(r["rel_accuracy"] for r in rs) / len(rs), b,
                        len(rs)))
        if not pts:
            continue
        pts.sort(key=lambda p: (p[0], p[1]))
        st = styles[method]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=st["color"], marker=st["marker"],
                linestyle=st.get("linestyle", "-"), linewidth=1.8, markersize=7, label=method, zorder=3)
        lines.append([(p[0], p[1]) for p in pts])
        for px_, py_, b, n in pts:
            note = _budget_str(b, False) + ("" if n == len(benches) else f" ({n}/{len(benches)})")
            labels.append((px_, py_, note, st["color"]))
        drawn += 1
    ax.axhline(100, color="goldenrod", linestyle=":", linewidth=1, zorder=1)
    ax.scatter([1.0], [100.0], marker="*", s=320, color="gold", edgecolor="black", linewidth=0.8, zorder=5,
               label="none (vanilla, all tokens)")
    what = "LLM prefill FLOPs" if x == "llm" else "total prefill FLOPs (vision + projector + LLM)"
    ax.set_xlabel(f"{what}, fraction of vanilla")
    ax.set_ylabel("relative accuracy (% of vanilla, mean over benchmarks)")
    ax.set_title(f"{model}: relative accuracy vs compute, mean over {len(benches)} benchmark"
                 f"{'s' if len(benches) != 1 else ''}\n({', '.join(benches)}; {_n_text(rows)}; labels are budgets)",
                 fontsize=11)
    ax.margins(x=0.08, y=0.12)
    ax.grid(True, alpha=0.3)
    return drawn, _finish(fig, ax, path, labels, lines, [100.0])


# ----------------------------------------------------------------------------------------------------
# Tables


def _clamped_text(r: Mapping) -> str:
    """``"3/480"`` samples whose int budget exceeded their visual tokens; "" when none; "–" when not recorded."""
    k = r.get("budget_clamped")
    if k is None:
        return "–"
    return f"{k}/{r.get('n', '?')}" if k else ""


def _table(rows: Sequence[Mapping]) -> list[str]:
    scale, label = _acc_scale(rows)
    unit = "%" if scale == 100 else "pts"
    clamp = any(r.get("budget_clamped") for r in rows)
    head = ["benchmark", "method", "budget", "n", f"accuracy ({unit})", "rel. acc. (%)", "LLM FLOPs ratio",
            "total TFLOPs (prefill)", "total FLOPs ratio", "visual tokens", "prefill ms", "total ms"]
    head += ["budget clamped"] if clamp else []
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        acc = r.get("accuracy")
        rel = r.get("rel_accuracy")
        out.append("| " + " | ".join([
            str(r["benchmark"]), ("**none**" if _is_ref(r) else str(r["method"])), _budget_str(r.get("budget"), _is_ref(r)),
            _fmt(r.get("n"), "d"), _fmt(acc * scale if acc is not None else None, ".1f"),
            _fmt(rel * 100 if rel is not None else None, ".1f"), _fmt(r.get("llm_flops_ratio"), ".3f"),
            _fmt(r.get("total_prefill_tflops")), _fmt(r.get("flops_ratio"), ".3f"), _fmt(r.get("visual_tokens"), ".1f"),
            _fmt(r.get("prefill_ms"), ".1f"), _fmt(r.get("total_ms"), ".1f"),
        ] + ([_clamped_text(r)] if clamp else [])) + " |")
    return out


def _fill_ratios(rows: Sequence[dict]) -> None:
    """Set ``flops_ratio`` / ``llm_flops_ratio`` where a record lacks them (older stores), from the ``none``
    record of the same model x benchmark (with the most samples)."""
    refs: dict[tuple, Mapping] = {}
    for r in _ok(rows):
        k = (r.get("model"), r.get("benchmark"))
        if _is_ref(r) and (k not in refs or (r.get("n") or 0) > (refs[k].get("n") or 0)):
            refs[k] = r
    for r in _ok(rows):
        ref = refs.get((r.get("model"), r.get("benchmark")))
        for ratio, field in (("flops_ratio", "total_prefill_tflops"), ("llm_flops_ratio", "llm_prefill_tflops")):
            if r.get(ratio) is None and ref is not None and ref.get(field) and r.get(field) is not None:
                r[ratio] = r[field] / ref[field]


def breakdowns(rows: Sequence[Mapping]) -> list[dict]:
    """Accuracy per group of every breakdown the benchmark scores (``score["by_type"]`` of the embedded
    benchmark, ``by_answer_type``, ``by_category``, ...), one dict per (cell, breakdown, group) with
    :data:`BREAKDOWN_COLUMNS` and ``ref`` (the cell is ``none``); ``n`` from ``score["n_<breakdown>"]``
    (``None`` in older stores), ``rel_accuracy`` against the ``none`` cell's accuracy on the same group."""
    out = []
    refs = {(r.get("model"), r.get("benchmark")): r for r in _ok(rows) if _is_ref(r)}
    for r in _ok(rows):
        score = r.get("score") or {}
        ref = (refs.get((r.get("model"), r.get("benchmark"))) or {}).get("score") or {}
        for name, groups in score.items():
            if not (name.startswith("by_") and isinstance(groups, Mapping) and groups):
                continue
            ns = score.get(f"n_{name}") or {}
            for g, acc in groups.items():
                if not isinstance(acc, (int, float)):
                    continue
                racc = (ref.get(name) or {}).get(g)
                out.append({"model": r.get("model"), "benchmark": r.get("benchmark"), "method": r.get("method"),
                            "budget": r.get("budget"), "breakdown": name, "group": g, "n": ns.get(g), "accuracy": acc,
                            "rel_accuracy": acc / racc if racc else None, "ref": _is_ref(r)})
    return out


def _breakdown_md(rows: Sequence[Mapping], parts: Sequence[Mapping]) -> list[str]:
    """One table per (benchmark, breakdown) of a model: a row per cell, a column per group (accuracy %)."""
    md = []
    scale, _ = _acc_scale(rows)
    for bench, name in dict.fromkeys((p["benchmark"], p["breakdown"]) for p in parts):
        mine = [p for p in parts if p["benchmark"] == bench and p["breakdown"] == name]
        groups = sorted({p["group"] for p in mine})
        cell: dict[tuple, dict] = defaultdict(dict)
        for p in mine:
            cell[(p["method"], p["budget"], p["ref"])][p["group"]] = p
        what = name[3:].replace("_", " ")
        unit = "%" if scale == 100 else "points"
        md += [f"### {bench}: accuracy by {what}", "",
               f"Accuracy ({unit}) on the questions of each {what}; in parentheses the difference to `none` on the "
               f"same {what}. n: questions of each {what} per cell (\"–\": not recorded by an older sweep).", ""]
        head = ["method", "budget"] + [str(g) for g in groups]
        md += ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * len(groups)) + "|"]
        ns = {}
        for p in mine:
            if p["n"] is not None:
                ns.setdefault(p["group"], set()).add(p["n"])
        md.append("| n | | " + " | ".join(
            "/".join(str(v) for v in sorted(ns[g])) if g in ns else "–" for g in groups) + " |")
        refrow = next((v for (m, b, ref), v in cell.items() if ref), {})
        order = sorted(cell, key=lambda k: (not k[2], str(k[0]), -(k[1] if isinstance(k[1], (int, float)) else math.inf)))
        for k in order:
            vals = []
            for g in groups:
                p = cell[k].get(g)
                if p is None:
                    vals.append("–")
                    continue
                v = _fmt(p["accuracy"] * scale, ".1f")
                if not k[2] and g in refrow:
                    v += f" ({(p['accuracy'] - refrow[g]['accuracy']) * scale:+.1f})"
                vals.append(v)
            md.append("| " + " | ".join(["**none**" if k[2] else str(k[0]), _budget_str(k[1], k[2])] + vals) + " |")
        md.append("")
    return md


def _write_csv(rows: Sequence[Mapping], path: Path, columns: Sequence[str] = CSV_COLUMNS) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])


# ----------------------------------------------------------------------------------------------------
# Published numbers beside the measured ones


def _find(rows: Sequence[Mapping], model: str, bench: str, method: str, budget: Any) -> Mapping | None:
    """The scored record of a cell; of several (runs with different ``limit``), the one with the most samples."""
    hits = [r for r in _ok(rows) if r.get("model") == model and r.get("benchmark") == bench
            and r.get("method") == method and r.get("budget") == budget]
    return max(hits, key=lambda r: r.get("n") or 0) if hits else None


def compare_published(rows: Sequence[Mapping], published, config: str = "") -> list[dict]:
    """One dict per (published row, column) with the measured value in the same convention
    (:data:`PUBLISHED_COLUMNS`; ``measured`` is ``None`` when the cell has not run)."""
    out = []
    for prow in published.rows:
        for mid, value in prow.values.items():
            metric = published.metrics[mid]
            rec = _find(rows, prow.model, metric.benchmark, prow.method, prow.budget)
            ref = _find(rows, prow.model, metric.benchmark, "none", None)
            measured = metric.measured(rec)
            mref = metric.measured(ref)
            pref = published.reference(prow, mid)
            prel = 100 * value / pref if pref else None
            mrel = 100 * measured / mref if measured is not None and mref else None
            out.append({"config": config, "model": prow.model, "method": prow.method, "budget": prow.budget,
                        "column": mid, "benchmark": metric.benchmark, "convention": metric.convention,
                        "published": value, "measured": measured,
                        "delta": measured - value if measured is not None else None,
                        "published_rel": prel, "measured_rel": mrel,
                        "delta_rel": mrel - prel if mrel is not None and prel is not None else None,
                        "n": rec.get("n") if rec else None, "source": prow.source})
    return out


def _published_md(name: str, published, comp: Sequence[Mapping]) -> list[str]:
    md = [f"## Published vs measured: {name}", "",
          "Published numbers as the sources report them, beside this store's measurement of the same cell in the "
          "same convention (the column's harness field, scaled). Δ = measured − published. Relative columns: % of "
          "the vanilla row of the same source (published) and of the `none` cell (measured); they compare the drop "
          "from vanilla, which survives differences of toolkit, prompt and split better than absolute numbers. "
          "\"–\": the cell has not run yet (or the record lacks the field).", "",
          "| column | benchmark | paper's convention | measured as | where the harness differs |", "|---|---|---|---|---|"]
    for m in published.metrics.values():
        scale = "" if m.scale == 1 else f" × {m.scale:g}"
        md.append(f"| {m.id} | {m.benchmark} | {m.convention} | `score.{m.field}`{scale} | {m.differs or '–'} |")
    md += ["", "| source | citation | note |", "|---|---|---|"]
    for src in published.sources.values():
        md.append(f"| {src.id} | {src.cite()} | {src.note or '–'} |")
    md.append("")
    for model in dict.fromkeys(r["model"] for r in comp):
        md += [f"### {model}", "",
               "| method | budget | column | published | measured | Δ | published rel. (%) | measured rel. (%) | Δ rel. | n | source |",
               "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in comp if r["model"] == model):
            is_ref = r["method"] == "none"
            md.append("| " + " | ".join([
                "**none**" if is_ref else r["method"], _budget_str(r["budget"], is_ref), r["column"],
                _fmt(r["published"], ".5g"), _fmt(r["measured"], ".5g"), _fmt(r["delta"], "+.4g"),
                _fmt(r["published_rel"], ".1f"), _fmt(r["measured_rel"], ".1f"), _fmt(r["delta_rel"], "+.1f"),
                _fmt(r["n"], "d"), r["source"]]) + " |")
        md.append("")
    return md


def _plot_published(comp: Sequence[Mapping], published, model: str, path: Path, styles: dict) -> bool:
    """Measured against published, one panel per column; False (nothing written) when nothing was measured."""
    mine = [r for r in comp if r["model"] == model and r["measured"] is not None]
    if not mine:
        return False
    plt = _plt()
    cols = list(dict.fromkeys(r["column"] for r in mine))
    n = len(cols)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.2 * nrows), dpi=120, squeeze=False)
    for ax, col in zip(axes.flat, cols):
        pts = [r for r in mine if r["column"] == col]
        xs = [r["published"] for r in pts] + [r["measured"] for r in pts]
        lo, hi = min(xs), max(xs)
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", linestyle=":", linewidth=1, label="measured = published")
        for r in pts:
            if r["method"] == "none":
                ax.scatter([r["published"]], [r["measured"]], marker="*", s=260, color="gold", edgecolor="black",
                           linewidth=0.8, zorder=5, label="none (vanilla)")
                continue
            st = styles.get(r["method"], {"color": "C0", "marker": "o"})
            ax.scatter([r["published"]], [r["measured"]], color=st["color"], marker=st["marker"], s=45, zorder=4,
                       label=r["method"])
            ax.annotate(_budget_str(r["budget"], False), (r["published"], r["measured"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=st["color"])
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="best")
        m = published.metrics[col]
        ax.set_title(f"{col}: {m.convention}", fontsize=8, wrap=True)
        ax.set_xlabel("published")
        ax.set_ylabel("measured (same convention)")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{model}: measured vs published (labels are budgets)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _published_blocks(results: str | os.PathLike, config: str | os.PathLike | None) -> dict:
    """``{name: Published}``: the ``published`` block of ``config``, else the blocks the sweep saved next to ``results``."""
    from .sweep.published import load_sidecar

    if config is None:
        return load_sidecar(results)
    from .sweep.config import load_config

    cfg = load_config(config, allow_unset=True)
    if cfg.published is None:
        raise ValueError(f"{config}: the config has no 'published' block to compare with")
    return {cfg.name or Path(config).stem: cfg.published}


def make_report(results: str | os.PathLike, out_dir: str | os.PathLike,
                config: str | os.PathLike | None = None, x: str = "llm") -> dict[str, Any]:
    """Write the markdown, CSVs and PNG plots of ``results`` into ``out_dir``; returns the paths
    (``markdown``, ``csv``, ``by_type`` when a benchmark scores a breakdown, ``plots``; ``published``
    too, the CSV of the published comparison, when there are published numbers) and ``labels``
    (``{plot path: label Placement}``).

    ``config``: a sweep config whose ``published`` block to show; default: the blocks the sweep saved
    next to ``results`` (``<stem>.published.json``). ``x``: the plots' x axis, ``"llm"`` (LLM prefill
    FLOPs as a fraction of vanilla, the default) or ``"total"`` (total prefill TFLOPs per sample)."""
    if x not in X_AXES:
        raise ValueError(f"x={x!r}: choose one of {', '.join(X_AXES)}")
    rows_all = load_rows(results)
    if not rows_all:
        raise ValueError(f"{results}: no records yet (the sweep has not finished a cell)")
    _fill_ratios(rows_all)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = _ok(rows_all)
    unsupported = [r for r in rows_all if r.get("status") not in (None, "ok")]
    models = list(dict.fromkeys(r["model"] for r in rows_all))
    blocks = _published_blocks(results, config)
    methods = sorted({r["method"] for r in ok if not _is_ref(r)}
                     | {r.method for b in blocks.values() for r in b.rows if r.method != "none"})
    styles = _method_styles(methods)
    pngs: list[Path] = []
    md = [f"# Sweep report: `{Path(results).name}`", "",
          f"{len(rows_all)} cells ({len(ok)} scored, {len(unsupported)} unsupported) over "
          f"{len(models)} model(s). n is the number of questions evaluated per cell. Accuracy is each "
          "benchmark's primary metric; relative accuracy is accuracy / accuracy of `none` (the vanilla model "
          "through the patch, all visual tokens) on the same model and benchmark. LLM FLOPs ratio: LLM prefill "
          "FLOPs relative to `none` (the primary figure, docs/efficiency.md); total TFLOPs: prefill FLOPs per "
          "sample of vision + projector + LLM, and its ratio to `none` (FLOPs of the token schedule that "
          "actually ran). Plots: x = "
          + ("LLM prefill FLOPs as a fraction of vanilla" if x == "llm" else "total prefill TFLOPs per sample")
          + " (`vtprune report --x llm|total`). Visual tokens are per image at the LLM input; latencies are "
          "medians per sample (the `env` field of each record names the hardware). \"budget clamped\": samples "
          "whose int budget exceeded their visual tokens (they kept all of them).", ""]
    placements: dict = {}
    parts_all: list[dict] = []
    paths: dict = {}
    comparisons = []
    for name, published in blocks.items():
        comp = compare_published(rows_all, published, name)
        comparisons += comp
        section = _published_md(name, published, comp)
        for model in dict.fromkeys(r["model"] for r in comp):
            p = out / f"published_{_slug(name)}__{_slug(model)}.png"
            if _plot_published(comp, published, model, p, styles):
                pngs.append(p)
                section += [f"![measured vs published, {model}]({p.name})", ""]
        md += section
    if comparisons:
        paths["published"] = out / "published.csv"
        _write_csv(comparisons, paths["published"], PUBLISHED_COLUMNS)
    for model in models:
        mrows = sorted([r for r in ok if r["model"] == model], key=lambda r: (str(r["benchmark"]),) + _sort_key(r))
        md += [f"## {model}", ""]
        if mrows:
            md += _table(mrows) + [""]
        rank, budgets, unranked = ranking(ok, model)
        if rank:
            md += ["### Method ranking", "",
                   f"Mean relative accuracy over benchmarks at the matched budgets ({', '.join(_budget_str(b) for b in budgets)}).", ""]
            head = (["rank", "method", "mean rel. acc. (%)"] + [f"@ {_budget_str(b)}" for b in budgets]
                    + ["mean LLM FLOPs ratio", "mean total FLOPs ratio"])
            md += ["| " + " | ".join(head) + " |", "|" + "|".join(["---:", "---"] + ["---:"] * (len(head) - 2)) + "|"]
            for i, d in enumerate(rank, 1):
                per = [_fmt(d["per_budget"][b] * 100 if d["per_budget"][b] is not None else None, ".1f") for b in budgets]
                md.append("| " + " | ".join([str(i), d["method"], _fmt(d["mean_rel_accuracy"] * 100, ".1f")] + per
                                            + [_fmt(d["mean_llm_flops_ratio"], ".3f"),
                                               _fmt(d["mean_flops_ratio"], ".3f")]) + " |")
            md.append("")
            if unranked:
                md += [f"Not ranked (no budget in common with the others): {', '.join(unranked)}.", ""]
        parts = breakdowns(mrows)
        parts_all += parts
        md += _breakdown_md(mrows, parts)
        for bench in dict.fromkeys(r["benchmark"] for r in mrows):
            brows = [r for r in mrows if r["benchmark"] == bench]
            p = out / f"pareto_{_slug(model)}__{_slug(bench)}.png"
            placements[p] = _plot_pareto(brows, model, bench, p, styles, x)
            pngs.append(p)
            md += [f"![{bench} on {model}]({p.name})", ""]
        p = out / f"relative_{_slug(model)}.png"
        if mrows:
            drawn, placement = _plot_relative(mrows, model, p, styles, x)
            if drawn:
                pngs.append(p)
                placements[p] = placement
                md += [f"![relative accuracy on {model}]({p.name})", ""]
            else:
                p.unlink(missing_ok=True)
    if unsupported:
        md += ["## Unsupported cells", "", "| model | benchmark | method | budget | reason |", "|---|---|---|---|---|"]
        for r in unsupported:
            reason = str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")
            md.append(f"| {r['model']} | {r['benchmark']} | {r['method']} | {_budget_str(r.get('budget'), _is_ref(r))} | {reason} |")
        md.append("")
    failed = ResultsStore(results).failures()
    if failed:
        md += ["## Failed cells", "", "Not in the tables above; rerun the sweep command to retry them.", "",
               "| cell | error |", "|---|---|"]
        for f in failed.values():
            msg = str(f.get("message", "")).replace("|", "\\|").replace("\n", " ")
            cell, _, err = msg.partition(": ")
            md.append(f"| {cell} | {err} |")
        md.append("")
    md_path, csv_path = out / "results.md", out / "results.csv"
    md_path.write_text("\n".join(md), encoding="utf-8")
    _write_csv(sorted(rows_all, key=lambda r: (str(r["model"]), str(r["benchmark"])) + _sort_key(r)), csv_path)
    if parts_all:
        paths["by_type"] = out / "by_type.csv"
        _write_csv(parts_all, paths["by_type"], BREAKDOWN_COLUMNS)
    return {"markdown": md_path, "csv": csv_path, "plots": pngs, "labels": placements, **paths}
