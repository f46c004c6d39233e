"""Reports of a sweep's results store: a markdown table + ranking, a CSV, and accuracy-vs-FLOPs plots.

    from vtprune.eval.report import make_report
    paths = make_report("runs/tiny/results.jsonl", "runs/tiny/report")

or ``vtprune report RESULTS.jsonl --out DIR``. Written to ``DIR``:

- ``results.md``: one table per model (benchmark, method, budget, accuracy, relative accuracy,
  total prefill TFLOPs, FLOPs ratio, visual tokens, latency), the method ranking (mean relative
  accuracy at the budgets every ranked method ran), unsupported cells, and the plots inline;
- ``results.csv``: one row per cell with every numeric field;
- ``pareto_<model>__<benchmark>.png``: accuracy vs total prefill TFLOPs per sample, one line per
  method through its budgets (points labelled with the budget), the vanilla ``none`` point as a star,
  a dotted line at the vanilla accuracy and a top axis with the fraction of vanilla FLOPs;
- ``relative_<model>.png``: relative accuracy (mean over benchmarks) vs FLOPs ratio.
"""
from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .store import ResultsStore

__all__ = ["make_report", "load_rows", "ranking", "CSV_COLUMNS"]

CSV_COLUMNS = ("model", "benchmark", "method", "method_name", "budget_param", "budget", "status", "n", "accuracy",
               "rel_accuracy", "total_prefill_tflops", "llm_prefill_tflops", "vision_tflops", "projector_tflops",
               "flops_ratio", "llm_flops_ratio", "fastv_ratio", "visual_tokens", "eq_visual_tokens", "prompt_tokens",
               "kv_mib", "prefill_ms", "total_ms", "peak_mem_mib")

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


def _budget_str(b: Any) -> str:
    if b is None:
        return "full"
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
    ``(rows, budgets, unranked)``, each row ``{method, mean_rel_accuracy, per_budget, mean_flops_ratio, n}``.
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
        out.append({"method": m, "mean_rel_accuracy": sum(r["rel_accuracy"] for r in rs) / len(rs), "per_budget": per,
                    "mean_flops_ratio": sum(fr) / len(fr) if fr else None, "n": len(rs)})
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
    cmap = plt.get_cmap("tab10")
    styles = {}
    for i, m in enumerate(sorted(methods, key=lambda m: (m != "random", m))):
        styles[m] = {"color": cmap(i % 10), "marker": _MARKERS[i % len(_MARKERS)]}
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


def _plot_pareto(rows: Sequence[Mapping], model: str, bench: str, path: Path, styles: dict) -> None:
    plt = _plt()
    scale, ylabel = _acc_scale(rows)
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=130)
    ref = next((r for r in rows if _is_ref(r)), None)
    pts = []
    for method in sorted({r["method"] for r in rows if not _is_ref(r)}, key=lambda m: (m != "random", m)):
        rs = sorted((r for r in rows if r["method"] == method and r.get("total_prefill_tflops") is not None),
                    key=lambda r: r["total_prefill_tflops"])
        if not rs:
            continue
        st = styles[method]
        xs = [r["total_prefill_tflops"] for r in rs]
        ys = [r["accuracy"] * scale for r in rs]
        pts += list(zip(xs, ys))
        ax.plot(xs, ys, color=st["color"], marker=st["marker"], linestyle=st.get("linestyle", "-"), linewidth=1.8,
                markersize=7, label=method, zorder=3)
        for x, y, r in zip(xs, ys, rs):
            ax.annotate(_budget_str(r.get("budget")), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7,
                        color=st["color"])
    if ref is not None and ref.get("total_prefill_tflops") is not None:
        x0, y0 = ref["total_prefill_tflops"], ref["accuracy"] * scale
        pts.append((x0, y0))
        ax.axhline(y0, color="goldenrod", linestyle=":", linewidth=1, zorder=1)
        ax.scatter([x0], [y0], marker="*", s=320, color="gold", edgecolor="black", linewidth=0.8, zorder=5,
                   label="none (vanilla, all tokens)")
        secax = ax.secondary_xaxis("top", functions=(lambda x, r=x0: x / r, lambda f, r=x0: f * r))
        secax.set_xlabel("fraction of vanilla prefill FLOPs")
    front = _pareto_front(pts)
    if len(front) > 1:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color="0.6", linewidth=4, alpha=0.25, zorder=2, label="Pareto frontier (all methods)")
    ax.margins(x=0.06, y=0.1)
    ax.set_xlabel("total prefill compute per sample (TFLOPs: vision + projector + LLM)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{bench} on {model}: accuracy vs prefill FLOPs\n(up and to the left is better; labels are budgets)",
                 fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_relative(rows: Sequence[Mapping], model: str, path: Path, styles: dict) -> int:
    """Mean relative accuracy (over benchmarks) vs mean FLOPs ratio, per method and budget."""
    plt = _plt()
    benches = sorted({r["benchmark"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=130)
    drawn = 0
    for method in sorted({r["method"] for r in rows if not _is_ref(r)}, key=lambda m: (m != "random", m)):
        by_budget: dict[Any, list[Mapping]] = defaultdict(list)
        for r in rows:
            if r["method"] == method and r.get("rel_accuracy") is not None and r.get("flops_ratio") is not None:
                by_budget[r.get("budget")].append(r)
        pts = []
        for b, rs in by_budget.items():
            pts.append((sum(r["flops_ratio"] for r in rs) / len(rs), 100 * sum(r["rel_accuracy"] for r in rs) / len(rs), b,
                        len(rs)))
        if not pts:
            continue
        pts.sort()
        st = styles[method]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=st["color"], marker=st["marker"],
                linestyle=st.get("linestyle", "-"), linewidth=1.8, markersize=7, label=method, zorder=3)
        for x, y, b, n in pts:
            note = _budget_str(b) + ("" if n == len(benches) else f" ({n}/{len(benches)})")
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7, color=st["color"])
        drawn += 1
    ax.axhline(100, color="goldenrod", linestyle=":", linewidth=1, zorder=1)
    ax.scatter([1.0], [100.0], marker="*", s=320, color="gold", edgecolor="black", linewidth=0.8, zorder=5,
               label="none (vanilla, all tokens)")
    ax.set_xlabel("FLOPs ratio (total prefill FLOPs relative to vanilla)")
    ax.set_ylabel("relative accuracy (% of vanilla, mean over benchmarks)")
    ax.set_title(f"{model}: relative accuracy vs compute, mean over {len(benches)} benchmark"
                 f"{'s' if len(benches) != 1 else ''}\n({', '.join(benches)}; labels are budgets)", fontsize=11)
    ax.margins(x=0.06, y=0.1)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return drawn


# ----------------------------------------------------------------------------------------------------
# Tables


def _table(rows: Sequence[Mapping]) -> list[str]:
    scale, label = _acc_scale(rows)
    unit = "%" if scale == 100 else "pts"
    head = ["benchmark", "method", "budget", f"accuracy ({unit})", "rel. acc. (%)", "TFLOPs (prefill)",
            "FLOPs ratio", "visual tokens", "prefill ms", "total ms"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        acc = r.get("accuracy")
        rel = r.get("rel_accuracy")
        out.append("| " + " | ".join([
            str(r["benchmark"]), ("**none**" if _is_ref(r) else str(r["method"])), _budget_str(r.get("budget")),
            _fmt(acc * scale if acc is not None else None, ".1f"), _fmt(rel * 100 if rel is not None else None, ".1f"),
            _fmt(r.get("total_prefill_tflops")), _fmt(r.get("flops_ratio"), ".3f"), _fmt(r.get("visual_tokens"), ".1f"),
            _fmt(r.get("prefill_ms"), ".1f"), _fmt(r.get("total_ms"), ".1f"),
        ]) + " |")
    return out


def _write_csv(rows: Sequence[Mapping], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in CSV_COLUMNS])


def make_report(results: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, list[Path] | Path]:
    """Write the markdown, CSV and PNG plots of ``results`` into ``out_dir``; returns the paths."""
    rows_all = load_rows(results)
    if not rows_all:
        raise ValueError(f"{results}: no records yet (the sweep has not finished a cell)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = _ok(rows_all)
    unsupported = [r for r in rows_all if r.get("status") not in (None, "ok")]
    models = list(dict.fromkeys(r["model"] for r in rows_all))
    methods = sorted({r["method"] for r in ok if not _is_ref(r)})
    styles = _method_styles(methods)
    pngs: list[Path] = []
    md = [f"# Sweep report: `{Path(results).name}`", "",
          f"{len(rows_all)} cells ({len(ok)} scored, {len(unsupported)} unsupported) over "
          f"{len(models)} model(s). Accuracy is each benchmark's primary metric; relative accuracy is "
          "accuracy / accuracy of `none` (the vanilla model through the patch, all visual tokens) on the same "
          "model and benchmark; TFLOPs are total prefill FLOPs per sample (vision + projector + LLM, the "
          "token schedule that actually ran; docs/efficiency.md); FLOPs ratio is relative to `none`; visual tokens are "
          "per image at the LLM input; latencies are medians per sample (the `env` field of each record "
          "names the hardware).", ""]
    for model in models:
        mrows = sorted([r for r in ok if r["model"] == model], key=lambda r: (str(r["benchmark"]),) + _sort_key(r))
        md += [f"## {model}", ""]
        if mrows:
            md += _table(mrows) + [""]
        rank, budgets, unranked = ranking(ok, model)
        if rank:
            md += ["### Method ranking", "",
                   f"Mean relative accuracy over benchmarks at the matched budgets ({', '.join(_budget_str(b) for b in budgets)}).", ""]
            head = ["rank", "method", "mean rel. acc. (%)"] + [f"@ {_budget_str(b)}" for b in budgets] + ["mean FLOPs ratio"]
            md += ["| " + " | ".join(head) + " |", "|" + "|".join(["---:", "---"] + ["---:"] * (len(head) - 2)) + "|"]
            for i, d in enumerate(rank, 1):
                per = [_fmt(d["per_budget"][b] * 100 if d["per_budget"][b] is not None else None, ".1f") for b in budgets]
                md.append("| " + " | ".join([str(i), d["method"], _fmt(d["mean_rel_accuracy"] * 100, ".1f")] + per
                                            + [_fmt(d["mean_flops_ratio"], ".3f")]) + " |")
            md.append("")
            if unranked:
                md += [f"Not ranked (no budget in common with the others): {', '.join(unranked)}.", ""]
        for bench in dict.fromkeys(r["benchmark"] for r in mrows):
            brows = [r for r in mrows if r["benchmark"] == bench]
            p = out / f"pareto_{_slug(model)}__{_slug(bench)}.png"
            _plot_pareto(brows, model, bench, p, styles)
            pngs.append(p)
            md += [f"![{bench} on {model}]({p.name})", ""]
        p = out / f"relative_{_slug(model)}.png"
        if mrows and _plot_relative(mrows, model, p, styles):
            pngs.append(p)
            md += [f"![relative accuracy on {model}]({p.name})", ""]
    if unsupported:
        md += ["## Unsupported cells", "", "| model | benchmark | method | budget | reason |", "|---|---|---|---|---|"]
        for r in unsupported:
            reason = str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")
            md.append(f"| {r['model']} | {r['benchmark']} | {r['method']} | {_budget_str(r.get('budget'))} | {reason} |")
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
    return {"markdown": md_path, "csv": csv_path, "plots": pngs}
