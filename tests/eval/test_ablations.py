"""Ablation configs build for every ablation and run end to end through the sweep on a tiny model."""
from __future__ import annotations

import json

import pytest

from vtprune.eval.ablations import ABLATIONS, ablation_config
from vtprune.eval.ablations.__main__ import main
from vtprune.eval.sweep import load_config, plan_cells
from vtprune.testing import tiny_images


def _bench(folder):
    (folder / "images").mkdir(parents=True)
    with open(folder / "benchmark.jsonl", "w") as f:
        for i, img in enumerate(tiny_images(3, seed=5)):
            img.save(folder / "images" / f"{i}.png")
            f.write(json.dumps({"id": f"q{i}", "image": f"images/{i}.png", "question": "what?", "answer": "x"}) + "\n")
    return folder


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_every_ablation_config_is_valid(name, tmp_path):
    bench = _bench(tmp_path / "b")
    cfg = load_config(ablation_config(name, model="tiny-llava", benchmark=f"embedded={bench}"))
    cells = plan_cells(cfg, None)
    labels = {c.identity["method"] if hasattr(c, "identity") else c.key for c in cells}
    assert len(cells) >= 2 * len(ABLATIONS[name]["budgets"])
    assert labels


def test_hiprune_layers_follow_the_tower_depth():
    cfg = ablation_config("hiprune", model="tiny-llava")  # 3-layer tiny CLIP
    layers = {m["params"]["object_layer"] for m in cfg["methods"]}
    assert layers == {1, 2}


def test_bad_benchmark_argument():
    with pytest.raises(ValueError, match="LOADER=PATH"):
        ablation_config("fastv", model="tiny-llava", benchmark="/data/pope")
    with pytest.raises(ValueError, match="available: "):
        ablation_config("nope")


def test_fastv_ablation_runs_and_reports(tmp_path):
    bench = _bench(tmp_path / "b")
    out = tmp_path / "out"
    assert main(["fastv", "--model", "tiny-llava", "--benchmark", f"embedded={bench}", "--out", str(out),
                 "--batch-size", "3"]) == 0
    recs = [json.loads(l) for l in open(out / "results.jsonl")]
    methods = {r["record"]["method"] for r in recs}
    assert {"none", "fastv K1", "fastv K2", "fastv K3"} <= methods
    assert (out / "report" / "results.md").exists()


def test_paper_layers_map_transprune_schedule_to_the_depth():
    from vtprune.eval.ablations import paper_layers

    assert paper_layers((7, 9, 12), 32) == (7, 9, 12)
    assert paper_layers((7, 9, 12), 16) == (4, 5, 6)  # 3.5, 4.5, 6 rounded half up
    cfg = ablation_config("transprune", model="tiny-llava")  # too shallow for the mapping: layers 1..3
    assert all("prune_layers=1|2|3" in m["spec"] for m in cfg["methods"])


def test_default_model_and_benchmark_per_ablation():
    from vtprune.eval.ablations import EMBEDDED_BENCHMARKS

    assert ABLATIONS["globalcom2"]["model"] == "embedded-anyres"
    cfg = ablation_config("hiprune", model="tiny-llava")
    assert cfg["benchmarks"][0]["path"] == EMBEDDED_BENCHMARKS["embedded"]
