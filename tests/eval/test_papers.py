"""Paper-reproduction configs (eval/configs/papers/): each validates against the registry and the real
model shapes; without the weights or data the sweep stops before loading anything and names every file
the loaders read; the layouts declare exactly what the loaders read; the report puts published numbers
beside measured ones."""
from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from vtprune.eval import cli
from vtprune.eval.benchmarks import BENCHMARKS, BenchmarkFormatError, load_benchmark
from vtprune.eval.sweep import MissingAssetError, load_config, plan_cells, validate_cells
from vtprune.eval.sweep import variables as var
from vtprune.eval.sweep.assets import missing_images, preflight
from vtprune.eval.sweep.published import Published, load_sidecar, sidecar_path

REPO = Path(__file__).resolve().parents[2]
PAPERS = sorted((REPO / "eval" / "configs" / "papers").glob("*.yaml"))
PAPER_IDS = [p.stem for p in PAPERS]


def test_there_is_a_config_per_main_table():
    assert {p.stem for p in PAPERS} >= {
        "hiprune-llava-1.5-7b", "hiprune-llava-next-7b", "hiprune-qwen2.5-vl-7b", "todre-llava-next-7b",
        "todre-qwen2.5-vl-7b", "transprune-llava-1.5-7b", "transprune-llava-next-7b", "globalcom2-llava-next-7b",
        "pitome-llava-1.5-7b", "pitome-clip-flickr30k"}


# ----------------------------------------------------------------------------------------------------
# Tiny files in each official layout, written at the canonical paths a loader's layout declares


def _png(path: Path, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)


def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (0, 0, 255)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def make_benchmark(loader: str, path: Path, options: dict) -> None:
    """A minimal valid benchmark of ``loader`` at ``path``: each file and folder at the location its
    ``layout`` names as canonical (the first path of each need)."""
    layout = BENCHMARKS[loader].layout(path, **options)
    need = {n.what: n.path for n in layout.needs}
    first = layout.needs[0].path
    if loader == "pope":
        for n in layout.needs:
            if n.kind == "file":
                _write(n.path, json.dumps({"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
                                           "text": "Is there a cat in the image?", "label": "yes"}) + "\n")
        _png(layout.needs[-1].path / "COCO_val2014_000000000001.jpg")
    elif loader == "gqa":
        _write(first, json.dumps({"q1": {"imageId": "n1", "question": "Is it red?", "answer": "yes",
                                         "types": {"structural": "verify", "semantic": "attr"}}}))
        _png(layout.needs[1].path / "n1.jpg")
    elif loader == "textvqa":
        _write(first, json.dumps({"data": [{"question_id": 1, "image_id": "t1", "question": "What does it say?",
                                            "answers": ["stop"] * 10}]}))
        _png(layout.needs[1].path / "t1.jpg")
    elif loader == "vqav2":
        _write(first, json.dumps({"data_subtype": "val2014", "questions": [
            {"question_id": 11, "image_id": 1, "question": "What colour?"}]}))
        _write(layout.needs[1].path, json.dumps({"annotations": [
            {"question_id": 11, "image_id": 1, "answers": [{"answer": "red", "answer_id": i} for i in range(10)],
             "answer_type": "other"}]}))
        _png(layout.needs[2].path / "COCO_val2014_000000000001.jpg")
    elif loader == "scienceqa_img":
        _write(need["ScienceQA problems (JSON)"], json.dumps({"1": {
            "question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1, "hint": "", "image": "image.png"}}))
        _write(need["ScienceQA split lists (JSON)"], json.dumps({"train": [], "val": [], "test": ["1"]}))
        _png(layout.needs[2].path / "1" / "image.png")
    elif loader == "mmbench":
        _write(first, "index\tquestion\thint\tA\tB\tanswer\tcategory\timage\n"
                      f"0\tWhat colour?\tnan\tred\tblue\tB\tcolor\t{_png_b64()}\n")
    elif loader == "mme":
        for n in layout.needs:  # <task>/<stem>.txt next to <task>/<stem>.png, one image per subtask
            _write(n.path / "0001.txt", "Is there a cat?\tYes\nIs there a dog?\tNo\n")
            _png(n.path / "0001.png")
    elif loader == "retrieval":
        _write(first, json.dumps({"images": [
            {"filename": f"{i}.jpg", "imgid": i, "split": "test", "sentences": [{"raw": f"caption {i} a"},
                                                                                {"raw": f"caption {i} b"}]}
            for i in range(3)]}))
        for i in range(3):
            _png(layout.needs[1].path / f"{i}.jpg", size=(56, 56))
    else:  # pragma: no cover - a new loader in a paper config needs a fixture here
        raise AssertionError(f"no fixture writer for loader {loader!r}")


def _score_empty(bench) -> dict:
    if hasattr(bench, "texts"):  # retrieval: a similarity row per image
        return bench.score_similarity([[0.0] * len(bench.texts)] * len(bench))
    return bench.score({})


def _scorable(bench) -> bool:
    try:
        _score_empty(bench)
    except ValueError:
        return False
    return True


def _loaders_in_papers() -> list[tuple[str, dict]]:
    seen = {}
    for p in PAPERS:
        for b in yaml.safe_load(p.read_text())["benchmarks"]:
            seen.setdefault(b["name"], b.get("options") or {})
    return sorted(seen.items())


@pytest.mark.parametrize("loader,options", _loaders_in_papers(), ids=[n for n, _ in _loaders_in_papers()])
def test_layout_declares_what_the_loader_reads(tmp_path, loader, options):
    """Files written at the layout's canonical paths load (with every image present); taking away any one
    declared file or folder makes the load fail, lose samples, miss images or leave nothing to score
    against: every need matters."""
    suffix = {"mmbench": "bench.tsv", "retrieval": "flickr30k/dataset_flickr30k.json"}.get(loader, "bench")
    path = tmp_path / suffix
    make_benchmark(loader, path, options)
    layout = BENCHMARKS[loader].layout(path, **options)
    assert layout.missing() == [] and layout.source
    full = load_benchmark(loader, path, **options)
    assert len(full) > 0 and missing_images(full) == []
    for need in layout.needs:
        aside = tmp_path / "aside"
        shutil.move(str(need.path), aside)
        try:
            assert need in layout.missing()
            try:
                b = load_benchmark(loader, path, **options)
            except BenchmarkFormatError:
                continue
            assert len(b) < len(full) or missing_images(b) or not _scorable(b), f"{need.path} is declared but not read"
        finally:
            shutil.move(str(aside), need.path)


# ----------------------------------------------------------------------------------------------------
# Real checkpoint shapes (config.json only, from the public configurations) for validation on the meta device

CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768)
VICUNA7 = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32064)


def _qwen25(text: dict, out_hidden: int):
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=out_hidden,
                  window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  fullatt_block_indexes=[7, 15, 23, 31])
    text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653)


def checkpoint_config(hub: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    if hub == "llava-hf/llava-1.5-7b-hf":
        return LlavaConfig(vision_config=CLIPVisionConfig(**CLIP_L336), text_config=LlamaConfig(**VICUNA7),
                           image_token_index=32000, vision_feature_layer=-2)
    if hub == "llava-hf/llava-v1.6-vicuna-7b-hf":
        return LlavaNextConfig(vision_config=CLIPVisionConfig(**CLIP_L336), text_config=LlamaConfig(**VICUNA7),
                               image_token_index=32000, vision_feature_layer=-2,
                               image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
    if hub == "Qwen/Qwen2.5-VL-7B-Instruct":
        return _qwen25(dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064), 3584)
    if hub == "Qwen/Qwen2.5-VL-3B-Instruct":
        return _qwen25(dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                            num_key_value_heads=2, vocab_size=151936), 2048)
    raise AssertionError(f"no configuration for {hub}")  # pragma: no cover - a new model in a paper config


def _dirs(tmp_path) -> dict:
    return {"MODELS": str(tmp_path / "models"), "DATA": str(tmp_path / "data")}


@pytest.mark.parametrize("path", PAPERS, ids=PAPER_IDS)
def test_paper_config_validates(tmp_path, path):
    """Schema, method names and parameters (load_config against the registry), declared variables, every
    published column a field its loader scores, and every (model, method, budget) patched onto the real
    architecture (meta device) without an error."""
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path, _dirs(tmp_path))
    assert cfg.name == path.stem and cfg.store == f"runs/papers/{path.stem}/results.jsonl"
    assert set(var.used(raw)) == set(cfg.variables) == {"MODELS", "DATA"}
    assert all(m.hub for m in cfg.models), "every checkpoint names its Hugging Face repository"
    pub = cfg.published
    assert pub is not None
    for model in cfg.models:
        assert any(r.model == model.name and r.method == "none" for r in pub.rows), "a published vanilla row"
        for meth in cfg.methods:
            if meth.name not in ("none", "random") and meth.runs_on(model.name):
                assert any(r.model == model.name and r.method == meth.label for r in pub.rows), meth.label
    # each published column reads a field its benchmark's loader scores
    for b in cfg.benchmarks:
        make_benchmark(b.name, Path(b.path), b.options)
        score = _score_empty(load_benchmark(b.name, b.path, **b.options))
        for m in (m for m in pub.metrics.values() if m.benchmark == b.label):
            assert m.measured({"status": "ok", "score": score}) is not None, f"{m.id}: no field {m.field!r}"
    # every (model, method, budget) is accepted by vtprune.patch on the real architecture
    for m in cfg.models:
        if not m.open_clip:
            Path(m.path).mkdir(parents=True)
            checkpoint_config(m.hub).save_pretrained(m.path)
    if any(m.open_clip for m in cfg.models):
        pytest.importorskip("open_clip")
    validate_cells(cfg, plan_cells(cfg))


@pytest.mark.parametrize("path", PAPERS, ids=PAPER_IDS)
def test_missing_data_names_every_file(tmp_path, capsys, path):
    """Without weights or data: exit 2 before loading anything, nothing stored, and the message names every
    file and folder each loader reads, its source, and a download command per checkpoint."""
    dirs = _dirs(tmp_path)
    store = tmp_path / "store" / "results.jsonl"
    argv = ["sweep", str(path), "--store", str(store), "--no-progress"]
    rc = cli.main(argv + [f"--set={k}={v}" for k, v in dirs.items()])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing was loaded or run" in err
    assert not store.parent.exists()
    cfg = load_config(path, dirs)
    for b in cfg.benchmarks:
        layout = BENCHMARKS[b.name].layout(b.path, **b.options)
        for need in layout.needs:
            assert f"[missing] {need.path}" in err, need
        assert layout.source in err
    for m in cfg.models:
        if m.open_clip:
            p = Path(m.path)
            assert f"huggingface-cli download {m.hub} {p.name} --local-dir {p.parent}" in err
        else:
            assert f"huggingface-cli download {m.hub} --local-dir {m.path}" in err
    # with no variable set: which ones, and the same plan with the placeholders
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "${MODELS} is not set: pass --set MODELS=DIR or export MODELS=DIR" in err
    raw = yaml.safe_load(path.read_text())
    for m in raw["models"]:
        assert m["path"] in err and m["hub"] in err


def test_preflight_passes_once_everything_is_in_place(tmp_path):
    """The files the message asks for are enough: with them, preflight returns every benchmark path; a
    checkpoint folder without weights is named as incomplete."""
    path = REPO / "eval" / "configs" / "papers" / "hiprune-llava-1.5-7b.yaml"
    cfg = load_config(path, _dirs(tmp_path))
    for b in cfg.benchmarks:
        make_benchmark(b.name, Path(b.path), b.options)
    ckpt = Path(cfg.models[0].path)
    checkpoint_config(cfg.models[0].hub).save_pretrained(ckpt)
    with pytest.raises(MissingAssetError) as e:
        preflight(cfg, plan_cells(cfg))
    msg = str(e.value)
    assert "is incomplete, missing: weights" in msg and "benchmarks:" not in msg
    for name in ("model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        (ckpt / name).write_bytes(b"")
    paths = preflight(cfg, plan_cells(cfg))
    assert set(paths) == {b.label for b in cfg.benchmarks}


def test_missing_images_stop_the_sweep_before_any_model_loads(tmp_path, capsys):
    path = REPO / "eval" / "configs" / "papers" / "hiprune-llava-next-7b.yaml"
    dirs = _dirs(tmp_path)
    cfg = load_config(path, dirs)
    for b in cfg.benchmarks:
        make_benchmark(b.name, Path(b.path), b.options)
    ckpt = Path(cfg.models[0].path)
    checkpoint_config(cfg.models[0].hub).save_pretrained(ckpt)
    for name in ("model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        (ckpt / name).write_bytes(b"")  # empty: loading them would fail, so the sweep must stop before
    img = Path(dirs["DATA"]) / "pope" / "val2014" / "COCO_val2014_000000000001.jpg"
    img.unlink()
    rc = cli.main(["sweep", str(path), "--store", str(tmp_path / "s.jsonl"), "--no-progress"]
                  + [f"--set={k}={v}" for k, v in dirs.items()])
    err = capsys.readouterr().err
    assert rc == 2 and "benchmark 'pope': 1 image file(s) not found" in err and str(img) in err


# ----------------------------------------------------------------------------------------------------
# Config additions: variables, baselines, fixed-setting methods, the published block


BASE = {"models": [{"name": "tiny-llava", "builtin": "tiny-llava"}],
        "benchmarks": [{"name": "embedded", "path": "${DATA}/bench"}],
        "methods": ["pool"], "budgets": [0.5]}


def test_variables_from_set_then_environment(monkeypatch):
    monkeypatch.setenv("DATA", "/from/env")
    assert load_config(BASE).benchmarks[0].path == "/from/env/bench"
    assert load_config(BASE, {"DATA": "/from/set"}).benchmarks[0].path == "/from/set/bench"
    monkeypatch.delenv("DATA")
    with pytest.raises(ValueError, match=r"\$\{DATA\} is not set: pass --set DATA=DIR or export DATA=DIR"):
        load_config(BASE)
    cfg = load_config(BASE, allow_unset=True)
    assert cfg.unset_variables == ("DATA",) and cfg.benchmarks[0].path == "${DATA}/bench"
    with pytest.raises(ValueError, match=r"--set DAT: the config uses no \$\{DAT\} \(it uses DATA\)"):
        load_config(BASE, {"DAT": "/x"})
    assert var.parse_overrides(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        var.parse_overrides(["no-equals"])


def test_baselines_and_methods_without_a_budget():
    cfg = load_config(dict(BASE, benchmarks=[{"name": "embedded", "path": "x"}], baselines=["none"],
                           methods=[{"name": "transprune", "label": "tp", "budget_param": None,
                                     "params": {"prune_layers": [1, 2, 3]}}]))
    assert [(m.label, m.budgets, m.budget_param) for m in cfg.methods] == [("none", (None,), None), ("tp", (None,), None)]
    with pytest.raises(ValueError, match="baselines"):
        load_config(dict(BASE, benchmarks=[{"name": "embedded", "path": "x"}], baselines=["random"]))
    with pytest.raises(ValueError, match=r"methods\[0\].budgets: a method with 'budget_param: null'"):
        load_config(dict(BASE, benchmarks=[{"name": "embedded", "path": "x"}],
                         methods=[{"name": "pool", "budget_param": None, "budgets": [0.5]}]))


PUB = {"sources": {"s": {"paper": "P", "arxiv": "1234.5678", "table": "Tab. 1"},
                   "t": {"paper": "Q", "table": "Tab. 2", "kind": "third-party"}},
       "metrics": {"acc": {"benchmark": "embedded", "field": "by_type.color", "convention": "colour accuracy (%)"}},
       "rows": [{"method": "none", "source": "s", "values": {"acc": 90.0}},
                {"method": "none", "source": "t", "values": {"acc": 80.0}},
                {"method": "pool", "budget": 0.5, "source": "t", "values": {"acc": 60.0}}]}


def test_published_block_parses_and_refers_to_its_own_vanilla():
    cfg = load_config(dict(BASE, benchmarks=[{"name": "embedded", "path": "x"}], published=PUB))
    pub = cfg.published
    assert pub.reference(pub.rows[2], "acc") == 80.0  # the same source's vanilla row, not the first one
    m = pub.metrics["acc"]
    assert m.measured({"status": "ok", "score": {"by_type": {"color": 0.25}}}) == 25.0
    assert m.measured({"status": "ok", "score": {"by_type": {}}}) is None
    assert Published.from_dict(json.loads(json.dumps(pub.to_dict()))) == pub
    assert pub.sources["t"].cite() == "Q, Tab. 2 [third-party]"


@pytest.mark.parametrize("edit,where", [
    (lambda p: p["rows"][2].update(method="fastv"), r"published.rows\[2\].method: no method labelled 'fastv'"),
    (lambda p: p["rows"][2].update(budget=0.25), r"published.rows\[2\].budget: 0.25 is not a budget"),
    (lambda p: p["rows"][0].update(budget=0.5), r"published.rows\[0\].budget"),
    (lambda p: p["rows"][0].update(source="nope"), r"published.rows\[0\].source: unknown source 'nope'"),
    (lambda p: p["rows"][0]["values"].update(gqa=1.0), r"published.rows\[0\].values.gqa: no such column"),
    (lambda p: p["rows"][0]["values"].update(acc="high"), r"published.rows\[0\].values.acc: must be a number"),
    (lambda p: p["metrics"]["acc"].update(benchmark="pope"), r"published.metrics.acc.benchmark: no benchmark"),
    (lambda p: p["metrics"]["acc"].pop("convention"), r"published.metrics.acc.convention"),
    (lambda p: p["sources"]["s"].pop("table"), r"published.sources.s: needs 'table'"),
    (lambda p: p["sources"]["s"].update(kind="blog"), r"published.sources.s.kind"),
    (lambda p: p["rows"].append(dict(p["rows"][0])), r"published.rows\[3\]: repeats"),
])
def test_published_block_errors_name_the_key(edit, where):
    pub = json.loads(json.dumps(PUB))
    edit(pub)
    with pytest.raises(ValueError, match=where):
        load_config(dict(BASE, benchmarks=[{"name": "embedded", "path": "x"}], published=pub))


# ----------------------------------------------------------------------------------------------------
# The report's published column, on the embedded model and benchmark (accuracies not asserted: the
# embedded model is being retrained)


def test_report_shows_published_beside_measured(tmp_path):
    from vtprune.eval.report import PUBLISHED_COLUMNS, load_rows

    readme = {"paper": "vtprune README, embedded results", "table": "Results table", "kind": "repository"}
    cfg = {
        "name": "embedded-published",
        "models": [{"name": "embedded", "builtin": "embedded"}],
        "benchmarks": [{"name": "embedded", "path": str(REPO / "assets" / "embedded" / "bench")}],
        "methods": ["pool"], "budgets": [0.25], "limit": 4, "max_new_tokens": 1, "batch_size": 4,
        "device": "cpu", "dtype": "float32",
        "published": {"sources": {"readme": readme},
                      "metrics": {"embedded": {"field": "accuracy", "convention": "exact match (%), held-out split"}},
                      "rows": [{"method": "none", "source": "readme", "values": {"embedded": 95.5}},
                               {"method": "pool", "budget": 0.25, "source": "readme", "values": {"embedded": 86.0}},
                               {"method": "random", "budget": 0.25, "source": "readme", "values": {"embedded": 72.3}}]},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    store = tmp_path / "results.jsonl"
    assert cli.main(["sweep", str(tmp_path / "cfg.yaml"), "--store", str(store), "--no-progress"]) == 0
    assert list(load_sidecar(store)) == ["embedded-published"] and sidecar_path(store).is_file()
    rows = {(r["method"], r["budget"]): r for r in load_rows(store)}
    assert cli.main(["report", str(store), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "results.md").read_text()
    assert "## Published vs measured: embedded-published" in md
    assert "| embedded | embedded | exact match (%), held-out split | `score.accuracy` × 100 | – |" in md
    none, pool = rows[("none", None)], rows[("pool", 0.25)]
    for rec, method, budget, published in ((none, "**none**", "full", 95.5), (pool, "pool", "0.25", 86.0)):
        measured = 100 * rec["score"]["accuracy"]
        line = next(l for l in md.splitlines() if l.startswith(f"| {method} | {budget} | embedded |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3] == format(published, ".5g") and cells[4] == format(measured, ".5g")
        assert cells[5] == format(measured - published, "+.4g") and cells[9] == "4" and cells[10] == "readme"
    rel = 100 * pool["score"]["accuracy"] / none["score"]["accuracy"] if none["score"]["accuracy"] else None
    line = next(l for l in md.splitlines() if l.startswith("| pool | 0.25 | embedded |"))
    assert [c.strip() for c in line.strip("|").split("|")][6] == format(100 * 86.0 / 95.5, ".1f")
    if rel is not None:
        assert [c.strip() for c in line.strip("|").split("|")][7] == format(rel, ".1f")
    csv_lines = (tmp_path / "rep" / "published.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(PUBLISHED_COLUMNS) and len(csv_lines) == 1 + 3
    png = tmp_path / "rep" / "published_embedded-published__embedded.png"
    assert png.stat().st_size > 10_000 and f"]({png.name})" in md
    # the same from the config itself (no sidecar needed), and a config without numbers says so
    sidecar_path(store).unlink()
    assert cli.main(["report", str(store), "--out", str(tmp_path / "rep2"), "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert "## Published vs measured: embedded-published" in (tmp_path / "rep2" / "results.md").read_text()
    assert cli.main(["report", str(store), "--out", str(tmp_path / "rep3")]) == 0
    assert "Published vs measured" not in (tmp_path / "rep3" / "results.md").read_text()
    del cfg["published"]
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["report", str(store), "--out", str(tmp_path / "rep4"), "--config", str(tmp_path / "plain.yaml")]) == 2


# ----------------------------------------------------------------------------------------------------
# open_clip models in a sweep (PiToMe's CLIP retrieval), on a tiny random CLIP


def test_open_clip_sweep_matches_clip_eval(tmp_path, monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    import torch

    from vtprune.eval.clip_eval import retrieval
    from vtprune.eval.store import ResultsStore
    from vtprune.testing import tiny_open_clip

    arch = {"embed_dim": 32,
            "vision_cfg": dict(image_size=56, patch_size=8, width=32, layers=4, head_width=8, mlp_ratio=2.0),
            "text_cfg": dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=1)}
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "vtprune-tiny-clip.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "arch")
    model, tok = tiny_open_clip(seed=1)
    torch.save(model.state_dict(), tmp_path / "weights.bin")
    bench_path = tmp_path / "flickr" / "dataset_flickr30k.json"
    make_benchmark("retrieval", bench_path, {})
    cfg = {"name": "clip", "models": [{"name": "tiny-clip", "open_clip": "vtprune-tiny-clip", "path": str(tmp_path / "weights.bin")}],
           "benchmarks": [{"name": "retrieval", "label": "flickr", "path": str(bench_path)}],
           "baselines": ["none"], "methods": [{"name": "pitome", "budget_param": "ratio", "budgets": [0.8]}],
           "batch_size": 2, "device": "cpu", "dtype": "float32"}
    (tmp_path / "clip.yaml").write_text(yaml.safe_dump(cfg))
    store = tmp_path / "clip.jsonl"
    assert cli.main(["sweep", str(tmp_path / "clip.yaml"), "--store", str(store), "--no-progress"]) == 0
    recs = {r["record"]["method"]: r["record"] for r in ResultsStore(store).records()}
    bench = load_benchmark("retrieval", bench_path)
    for method, spec, params in (("none", "none", {}), ("pitome", "pitome", {"ratio": 0.8})):
        direct = retrieval(model, tok, bench, spec, batch_size=2, **params)
        rec = recs[method]
        assert rec["score"]["rsum"] == pytest.approx(direct["rsum"]) and rec["accuracy"] == direct["primary"]
        assert rec["vision_tflops"] == pytest.approx(direct["gflops"] / 1e3)
    assert recs["pitome"]["flops_ratio"] < 1.0 and recs["none"]["rel_accuracy"] == 1.0
    with pytest.raises(ValueError, match="open_clip model runs the retrieval"):
        load_config(dict(cfg, benchmarks=[{"name": "pope", "path": "x"}]))


def test_docs_list_every_config_file_and_download():
    """docs/reproduce.md names every paper config, every file and folder their loaders read and every
    download command; the README's example command names an existing config."""
    import re

    doc = (REPO / "docs" / "reproduce.md").read_text()
    readme = (REPO / "README.md").read_text()
    cmd = re.search(r"## Reproduce a paper.*?```bash\n(vtprune sweep (\S+) .*?)\n```", readme, flags=re.S)
    assert cmd and (REPO / cmd.group(2)).is_file() and cmd.group(1) in doc
    for path in PAPERS:
        assert f"`{path.stem}`" in doc
        cfg = load_config(path, {"MODELS": "/M", "DATA": "/D"})
        for m in cfg.models:
            rel = Path(m.path).relative_to("/M")
            line = (f"huggingface-cli download {m.hub} {rel.name} --local-dir $MODELS/{rel.parent}" if m.open_clip
                    else f"huggingface-cli download {m.hub} --local-dir $MODELS/{rel}")
            assert line in doc
        for b in cfg.benchmarks:
            for need in BENCHMARKS[b.name].layout(b.path, **b.options).needs:
                rel = need.path.relative_to("/D")
                assert f"{rel.parts[0]}/" in doc and need.path.name in doc, need
