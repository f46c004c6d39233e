"""Reports: markdown table + ranking, CSV and PNG plots from a results store (synthetic records, no model)."""
import csv

import pytest
from vtprune.eval.labels import overlap_area
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
    # n per cell, accuracy, rel. acc., LLM FLOPs ratio (0.1 + 0.9 * 0.25) * 1.05, total TFLOPs, total ratio
    assert "| gqa | fastv | 0.25 | 100 | 56.0 | 90.3 | 0.341 | 1.442 | 0.406 |" in md
    assert "budget clamped |" not in md  # no cell clamped: no column
    assert "### Method ranking" in md and "pitome" in md and "Unsupported cells" in md
    ranked = [l.split("|")[2].strip() for l in md.split("### Method ranking")[1].splitlines()
              if l.startswith("| ") and l.split("|")[1].strip().isdigit()]
    assert ranked == ["hiprune", "fastv", "random"]
    with open(paths["csv"]) as f:
        data = list(csv.DictReader(f))
    assert list(data[0]) == list(CSV_COLUMNS) and len(data) == 2 * 10 + 1
    assert "by_type" not in paths  # these benchmarks score no breakdown
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


# ----------------------------------------------------------------------------------------------------
# The main job's report: x axis, n, labels, question types, clamped budgets, several models

TYPES = ("color", "count", "exists", "position", "shape", "size")
# the embedded model's methods; stage-P methods share the LLM FLOPs of a budget, so their points stack
MAIN_METHODS = ("random", "pool", "fastv", "hiprune", "visionzip", "todre", "transprune", "pitome", "pitome-p")


def main_record(model, method, budget, n=480, clamped=0, old=False):
    """A record like the embedded sweep's: per-type accuracy that differs by method and type."""
    frac = 1.0 if budget is None else budget
    seed = sum(map(ord, method)) % 7
    by_type = {t: max(0.0, min(1.0, 0.95 - (1 - frac) * (0.05 + 0.08 * ((seed + k) % 5)))) for k, t in enumerate(TYPES)}
    per = n // len(TYPES)
    acc = sum(by_type.values()) / len(TYPES)
    stage_d = method in ("fastv", "transprune")
    llm_full, vision = 0.004, 0.0061
    llm = llm_full * ((0.55 + 0.45 * frac) if stage_d else (0.2 + 0.8 * frac))
    score = {"primary": acc, "accuracy": acc, "by_type": by_type}
    if not old:
        score["n_by_type"] = {t: per for t in TYPES}
    rec = {"model": model, "benchmark": "embedded", "benchmark_loader": "embedded", "method": method,
           "method_name": method, "params": {}, "budget_param": None if budget is None else "keep", "budget": budget,
           "spec": None, "n": n, "status": "ok", "accuracy": acc, "score": score,
           "llm_prefill_tflops": llm, "vision_tflops": vision, "projector_tflops": 0.0001,
           "total_prefill_tflops": llm + vision + 0.0001, "visual_tokens": 64 * frac, "prefill_ms": 10.0,
           "total_ms": 12.0, "env": {"device": "cpu"}}
    if not old:
        rec["budget_clamped"] = clamped
    return rec


def write_main_store(path, models=("embedded", "embedded-anyres"), old=False, clamp=None):
    """Two models x (none + 9 methods x 3 budgets); ``old``: records without the ratios, per-type n and
    budget_clamped (a store written before they existed). ``clamp``: (model, method, budget, k)."""
    store = ResultsStore(path, fsync=False)
    for model in models:
        ref = main_record(model, "none", None, old=old)
        recs = [ref] + [main_record(model, m, b, old=old) for m in MAIN_METHODS for b in (0.5, 0.25, 0.125)]
        for r in recs:
            if clamp and (model, r["method"], r["budget"]) == clamp[:3]:
                r["budget_clamped"] = clamp[3]
            if not old:
                r["rel_accuracy"] = r["accuracy"] / ref["accuracy"]
                r["flops_ratio"] = r["total_prefill_tflops"] / ref["total_prefill_tflops"]
                r["llm_flops_ratio"] = r["llm_prefill_tflops"] / ref["llm_prefill_tflops"]
            store.put(cell_key(model=model, benchmark="embedded", method=r["method"], budget=r["budget"]), r)
    return path


def _boxes_clear(placement, tol=0.0):
    boxes = placement.boxes
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert overlap_area(a, b) <= tol, (a, b)
    return len(boxes)


def test_x_axis_is_llm_flops_fraction_by_default_and_total_on_request(tmp_path):
    store = write_main_store(tmp_path / "results.jsonl", models=("embedded",))
    rows = {(r["method"], r["budget"]): r for r in load_rows(store)}
    llm = make_report(store, tmp_path / "llm")
    p = tmp_path / "llm" / "pareto_embedded__embedded.png"
    xs = sorted(round(t.xy[0], 9) for t in llm["labels"][p].texts)
    want = sorted(round(r["llm_prefill_tflops"] / rows[("none", None)]["llm_prefill_tflops"], 9)
                  for k, r in rows.items() if k[0] != "none")
    assert xs == want and max(xs) < 1.0
    total = make_report(store, tmp_path / "total", x="total")
    xs = sorted(round(t.xy[0], 9) for t in total["labels"][tmp_path / "total" / "pareto_embedded__embedded.png"].texts)
    assert xs == sorted(round(r["total_prefill_tflops"], 9) for k, r in rows.items() if k[0] != "none")
    # the relative plot: mean LLM FLOPs fraction (one benchmark: the cell's own)
    rel = llm["labels"][tmp_path / "llm" / "relative_embedded.png"]
    assert sorted(round(t.xy[0], 9) for t in rel.texts) == want
    with pytest.raises(ValueError, match="choose one of llm, total"):
        make_report(store, tmp_path / "bad", x="vision")
    from vtprune.eval import cli

    assert cli.main(["report", str(store), "--out", str(tmp_path / "cli"), "--x", "total"]) == 0
    assert "x = total prefill TFLOPs per sample" in (tmp_path / "cli" / "results.md").read_text()


def test_labels_do_not_overlap_each_other_or_the_points(tmp_path):
    """The main job's crowd: 9 methods x 3 budgets, the stage-P methods stacked at the same x."""
    store = write_main_store(tmp_path / "results.jsonl", models=("embedded",))
    paths = make_report(store, tmp_path / "rep")
    assert len(paths["labels"]) == 2
    for png, placement in paths["labels"].items():
        assert _boxes_clear(placement) == 27 and placement.overlaps == 0, png
        # what was drawn: each label's rendered box is the computed one, clear of every point marker
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.text import Text

        renderer = FigureCanvasAgg(placement.texts[0].figure).get_renderer()  # the saved figure is closed
        for t, box in zip(placement.texts, placement.boxes):
            ext = Text.get_window_extent(t, renderer)  # the text, without its leader line
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            assert abs((ext.x0 + ext.x1) / 2 - cx) < 1.0 and abs((ext.y0 + ext.y1) / 2 - cy) < 1.0
            assert ext.width <= box[2] - box[0] and ext.height <= box[3] - box[1]
        fig = placement.texts[0].axes
        anchors = [fig.transData.transform(t.xy) for t in placement.texts]
        for box in placement.boxes:
            for ax_, ay in anchors:
                assert not (box[0] < ax_ < box[2] and box[1] < ay < box[3])


def test_label_placement_is_deterministic_and_counts_what_it_cannot_place():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from vtprune.eval.labels import place_labels

    def run(n):
        fig, ax = plt.subplots(figsize=(3, 2), dpi=100)
        pts = [(0.5 + 0.001 * i, 0.5 + 0.002 * i, f"label {i}", "k") for i in range(n)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        out = place_labels(ax, pts)
        plt.close(fig)
        return out

    a, b = run(6), run(6)
    assert a.boxes == b.boxes and a.overlaps == 0 and _boxes_clear(a) == 6
    crowded = run(60)  # 60 labels cannot fit in a 3 x 2 inch axes: the ones placed over others are counted
    later = {max(i, j) for i, x in enumerate(crowded.boxes) for j, y in enumerate(crowded.boxes[:i])
             if overlap_area(x, y) > 0}
    assert later and crowded.overlaps >= len(later)


def test_table_by_question_type_and_csv(tmp_path):
    store = write_main_store(tmp_path / "results.jsonl", models=("embedded",))
    paths = make_report(store, tmp_path / "rep")
    md = paths["markdown"].read_text()
    section = md.split("### embedded: accuracy by type")[1].split("![")[0]
    assert "| method | budget | color | count | exists | position | shape | size |" in section
    assert "| n | | 80 | 80 | 80 | 80 | 80 | 80 |" in section
    ref = main_record("embedded", "none", None)["score"]["by_type"]
    hp = main_record("embedded", "hiprune", 0.25)["score"]["by_type"]
    row = "| hiprune | 0.25 | " + " | ".join(f"{100 * hp[t]:.1f} ({100 * (hp[t] - ref[t]):+.1f})" for t in TYPES) + " |"
    assert row in section
    with open(paths["by_type"]) as f:
        data = list(csv.DictReader(f))
    assert len(data) == (1 + 27) * len(TYPES)
    cnt = next(d for d in data if d["method"] == "hiprune" and d["budget"] == "0.25" and d["group"] == "count")
    assert (cnt["breakdown"], cnt["n"]) == ("by_type", "80")
    assert float(cnt["accuracy"]) == pytest.approx(hp["count"])
    assert float(cnt["rel_accuracy"]) == pytest.approx(hp["count"] / ref["count"])


def test_budget_clamped_is_shown_where_true(tmp_path):
    store = write_main_store(tmp_path / "results.jsonl", models=("embedded", "embedded-anyres"),
                             clamp=("embedded-anyres", "pool", 0.5, 37))
    md = make_report(store, tmp_path / "rep")["markdown"].read_text()
    first, second = md.split("## embedded-anyres")
    assert "budget clamped |" not in first.split("## embedded")[1]  # no clamped cell on that model: no column
    lines = [l for l in second.splitlines() if l.startswith("| embedded | pool | 0.5 |")]
    assert len(lines) == 1 and lines[0].endswith("| 37/480 |")
    assert "| embedded | pool | 0.25 |" in second and "budget clamped |" in second
    with open(tmp_path / "rep" / "results.csv") as f:
        clamped = {(d["model"], d["method"], d["budget"]): d["budget_clamped"] for d in csv.DictReader(f)}
    assert clamped[("embedded-anyres", "pool", "0.5")] == "37" and clamped[("embedded", "pool", "0.5")] == "0"


def test_several_models_get_their_own_tables_and_plots(tmp_path):
    store = write_main_store(tmp_path / "results.jsonl")
    paths = make_report(store, tmp_path / "rep")
    md = paths["markdown"].read_text()
    assert md.count("\n## embedded\n") == 1 and md.count("\n## embedded-anyres\n") == 1
    for model in ("embedded", "embedded-anyres"):
        part = md.split(f"\n## {model}\n")[1].split("\n## ")[0]
        assert sum(1 for l in part.splitlines() if l.startswith("| embedded | ")) == 28
        assert "### Method ranking" in part and "### embedded: accuracy by type" in part
        assert f"pareto_{model}__embedded.png" in part and f"relative_{model}.png" in part
    assert sorted(p.name for p in paths["plots"]) == [
        "pareto_embedded-anyres__embedded.png", "pareto_embedded__embedded.png",
        "relative_embedded-anyres.png", "relative_embedded.png"]
    assert "n = 480 questions" in paths["labels"][tmp_path / "rep" / "pareto_embedded__embedded.png"].texts[0].axes.get_title()


def test_old_store_without_new_fields_is_readable(tmp_path):
    """Records written before the LLM FLOPs ratio, per-type n and budget_clamped were stored."""
    store = write_main_store(tmp_path / "results.jsonl", models=("embedded",), old=True)
    paths = make_report(store, tmp_path / "rep")
    md = paths["markdown"].read_text()
    ref = main_record("embedded", "none", None)
    fv = main_record("embedded", "fastv", 0.5)
    ratio = fv["llm_prefill_tflops"] / ref["llm_prefill_tflops"]
    assert f"| embedded | fastv | 0.5 | 480 | {100 * fv['accuracy']:.1f} | – | {ratio:.3f} |" in md
    assert "| n | | – | – | – | – | – | – |" in md and "budget clamped |" not in md
    assert len(paths["labels"]) == 1  # no relative accuracy stored: no relative plot
