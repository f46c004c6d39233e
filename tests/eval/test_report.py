"""Reports: markdown table + ranking, CSV and PNG plots from a results store (synthetic records, no model)."""
import csv

import pytest

from vtprune.eval.report import CSV_COLUMNS, load_rows, make_report, ranking
from vtprune.eval.store import ResultsStore, cell_key

# (method, budget) -> (accuracy delta vs vanilla, visual tokens kept fraction); vanilla 576 tokens
CURVES = {
    "random": {0.5: -0.08, 0.25: -0.15, 0.125: -0.25},
    "fastv": {0.5: -0.02, 0.25: -0.06, 0.125: -0.14},
    "hiprune": {0.5: -0.01, 0.25: -0.03, 0.125: -0.07},
}
BENCH_ACC = {"gqa": 0.62, "pope": 0.86}


def fake_record(model, bench, method, budget):
    ref_acc = BENCH_ACC[bench]
    frac = 1.0 if budget is None else budget
    acc = ref_acc + (0.0 if budget is None else CURVES[method][budget])
    vision, llm_full = 0.35, 3.2
    llm = llm_full * (0.1 + 0.9 * frac) * (1.05 if method == "fastv" else 1.0)
    total = vision + llm
    return {
        "model": model, "benchmark": bench, "benchmark_loader": bench, "method": method, "method_name": method,
        "params": {}, "budget_param": None if budget is None else "keep", "budget": budget, "spec": None,
        "n": 100, "status": "ok", "accuracy": acc, "score": {"primary": acc}, "rel_accuracy": acc / ref_acc,
        "llm_prefill_tflops": llm, "vision_tflops": vision, "projector_tflops": 0.01, "total_prefill_tflops": total,
        "fastv_ratio": llm / llm_full, "flops_ratio": total / (vision + llm_full), "llm_flops_ratio": llm / llm_full,
        "kv_mib": 300 * frac, "visual_tokens": 576 * frac, "eq_visual_tokens": 576 * frac, "prompt_tokens": 640,
        "prefill_ms": 120 * frac + 30, "total_ms": 200 * frac + 60, "peak_mem_mib": 14000.0, "env": {"device": "cuda"},
    }


@pytest.fixture()
def results(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl", fsync=False)
    for model in ("llava-1.5-7b",):
        for bench in BENCH_ACC:
            store.put(cell_key(model=model, benchmark=bench, method="none"), fake_record(model, bench, "none", None))
            for method, curve in CURVES.items():
                for b in curve:
                    store.put(cell_key(model=model, benchmark=bench, method=method, budget=b),
                              fake_record(model, bench, method, b))
        store.put(cell_key(model=model, benchmark="gqa", method="pitome", budget=0.5),
                  {"model": model, "benchmark": "gqa", "method": "pitome", "method_name": "pitome", "budget": 0.5,
                   "status": "unsupported", "error": "pitome: stage-V merging is not supported", "accuracy": None})
    return tmp_path / "results.jsonl"


def test_report_writes_table_csv_and_plots(results, tmp_path):
    out = tmp_path / "report"
    paths = make_report(results, out)
    md = paths["markdown"].read_text()
    rows = [l for l in md.splitlines() if l.startswith("| ")]
    # 2 benchmarks x (none + 3 methods x 3 budgets) table rows (+ 1 header) + ranking + unsupported
    table = [l for l in rows if l.startswith(("| gqa", "| pope"))]
    assert len(table) == 2 * (1 + 9)
    assert any("**none**" in l and "100.0" in l for l in table)
    assert "| gqa | fastv | 0.25 | 56.0 |" in md
    assert "### Method ranking" in md and "pitome" in md and "Unsupported cells" in md
    ranked = [l.split("|")[2].strip() for l in md.split("### Method ranking")[1].splitlines()
              if l.startswith("| ") and l.split("|")[1].strip().isdigit()]
    assert ranked == ["hiprune", "fastv", "random"]
    with open(paths["csv"]) as f:
        data = list(csv.DictReader(f))
    assert list(data[0]) == list(CSV_COLUMNS) and len(data) == 2 * 10 + 1
    names = sorted(p.name for p in paths["plots"])
    assert names == ["pareto_llava-1.5-7b__gqa.png", "pareto_llava-1.5-7b__pope.png", "relative_llava-1.5-7b.png"]
    for p in paths["plots"]:
        head = p.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 20_000
        assert f"]({p.name})" in md


def test_ranking_matched_budgets(results):
    rows = load_rows(results)
    rank, budgets, unranked = ranking(rows, "llava-1.5-7b")
    assert budgets == [0.5, 0.25, 0.125] and unranked == []
    assert [d["method"] for d in rank] == ["hiprune", "fastv", "random"]
    gqa_h = [(0.62 + d) / 0.62 for d in CURVES["hiprune"].values()]
    pope_h = [(0.86 + d) / 0.86 for d in CURVES["hiprune"].values()]
    assert rank[0]["mean_rel_accuracy"] == pytest.approx(sum(gqa_h + pope_h) / 6)


def test_report_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="vtprune sweep"):
        make_report(tmp_path / "nope.jsonl", tmp_path / "out")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no records"):
        make_report(tmp_path / "empty.jsonl", tmp_path / "out")
