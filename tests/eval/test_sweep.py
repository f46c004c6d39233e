"""Sweep runner on a tiny random LLaVA and a tiny on-disk benchmark: records, resume after SIGKILL,
2-process data-parallel sharding, config errors, the CLI."""
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from vtprune.eval import cli
from vtprune.eval.store import ResultsStore
from vtprune.eval.sweep import VOLATILE_FIELDS, comparable, load_config, plan_cells, run_sweep
from vtprune.testing import tiny_images

REPO = Path(__file__).resolve().parents[2]
N_SAMPLES = 4

BASE = {
    "models": [{"name": "tiny-llava", "builtin": "tiny-llava"}],
    "benchmarks": [{"name": "embedded", "path": None}],  # filled by the fixture
    "methods": ["fastv"],  # none and random are added
    "budgets": [0.5, 0.25],
    "max_new_tokens": 3,
    "batch_size": 2,
    "seed": 0,
    "device": "cpu",
}
RECORD_FIELDS = {
    "model", "benchmark", "method", "params", "budget", "status", "n", "accuracy", "score", "rel_accuracy",
    "visual_tokens", "llm_tokens_per_layer", "llm_prefill_tflops", "vision_tflops", "total_prefill_tflops",
    "fastv_ratio", "kv_mib", "flops_ratio", "prefill_ms", "total_ms", "peak_mem_mib", "env",
}


def write_bench(folder: Path, answers) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "benchmark.jsonl", "w") as f:
        for i, (img, ans) in enumerate(zip(tiny_images(N_SAMPLES, seed=3), answers)):
            img.save(folder / "images" / f"{i}.png")
            f.write(json.dumps({"id": f"q{i}", "image": f"images/{i}.png", "question": f"what is shape {i}?",
                                "answer": ans, "type": "shape" if i % 2 else "color"}) + "\n")
    return folder


def config_for(bench: Path, **over) -> dict:
    cfg = copy.deepcopy(BASE)
    cfg["benchmarks"][0]["path"] = str(bench)
    cfg.update(over)
    return cfg


def cell_records(store_path) -> list[dict]:
    return [r["record"] for r in ResultsStore(store_path).records()]


def same_records(a, b) -> None:
    assert [comparable(r) for r in a] == [comparable(r) for r in b]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A 4-sample benchmark whose answers for q0..q2 are the vanilla tiny model's own predictions (so
    `none` scores 3/4 and relative accuracy is a real ratio), q3 is unanswerable."""
    root = tmp_path_factory.mktemp("sweep")
    probe = write_bench(root / "probe", ["?"] * N_SAMPLES)
    cfg = config_for(probe, methods=[], budgets=[0.5])
    store = root / "probe_store" / "results.jsonl"
    run_sweep(cfg, store, progress=False)
    none_cell = plan_cells(load_config(cfg))[0]
    assert none_cell.method.name == "none"
    preds = ResultsStore(store).predictions(none_cell.key).predictions()
    answers = [preds[f"q{i}"] for i in range(3)] + ["an answer no tiny model gives"]
    return write_bench(root / "bench", answers)


@pytest.fixture(scope="module")
def full_run(bench, tmp_path_factory):
    store = tmp_path_factory.mktemp("full") / "results.jsonl"
    t0 = time.time()
    records = run_sweep(config_for(bench), store, progress=False)
    return store, records, time.time() - t0


def test_sweep_records(full_run, bench):
    store, records, _ = full_run
    from vtprune.flops import count_flops, nominal_schedule
    from vtprune.testing import tiny_llava

    assert [(r["method"], r["budget"]) for r in records] == [
        ("none", None), ("random", 0.5), ("random", 0.25), ("fastv", 0.5), ("fastv", 0.25)]
    assert cell_records(store) == records
    for r in records:
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert r["status"] == "ok" and r["n"] == N_SAMPLES and r["score"]["n_missing"] == 0
        assert r["total_prefill_tflops"] == pytest.approx(r["llm_prefill_tflops"] + r["vision_tflops"]
                                                          + r["projector_tflops"])
        assert len(r["llm_tokens_per_layer"]) == 4 and r["prefill_ms"] > 0 and r["total_ms"] >= r["prefill_ms"]
        assert r["peak_mem_mib"] > 0 and r["env"]["torch"] and r["env"]["world_size"] == 1
    none, r50, r25, f50, f25 = records
    assert none["accuracy"] == 0.75 and none["rel_accuracy"] == 1.0 and none["flops_ratio"] == 1.0
    for r in records[1:]:
        assert r["rel_accuracy"] == pytest.approx(r["accuracy"] / 0.75)
        assert r["flops_ratio"] == pytest.approx(r["total_prefill_tflops"] / none["total_prefill_tflops"])
        assert r["flops_ratio"] < 1
    # the kept-token schedule: random keeps 8 / 4 of 16 tokens before the LLM, FastV prunes after layer 2
    assert (none["visual_tokens"], r50["visual_tokens"], r25["visual_tokens"]) == (16, 8, 4)
    n0 = none["llm_tokens_per_layer"][0]
    assert none["llm_tokens_per_layer"] == [n0] * 4
    assert r25["llm_tokens_per_layer"] == [n0 - 12] * 4
    assert f50["visual_tokens"] == 16 and f50["llm_tokens_per_layer"] == [n0, n0, n0 - 8, n0 - 8]
    assert f25["llm_prefill_tflops"] < f50["llm_prefill_tflops"] < none["llm_prefill_tflops"]
    # the FLOPs are those of the schedule that ran: vision = one CLIP view, LLM = n0 tokens per layer
    model, _ = tiny_llava()
    nominal = count_flops(model, nominal_schedule(model, 16, n0 - 16)).as_dict()
    for k in ("vision_tflops", "projector_tflops", "llm_prefill_tflops", "kv_mib"):
        assert none[k] == pytest.approx(nominal[k]), k
    assert r50["vision_tflops"] == none["vision_tflops"]  # stage P: the encoder ran in full
    # per question type (the benchmark's `type`): accuracy and n; no budget exceeded 16 fixed tokens
    assert none["score"]["n_by_type"] == {"color": 2, "shape": 2}
    assert none["score"]["by_type"] == {"color": 1.0, "shape": 0.5}  # q3 (shape) is unanswerable
    assert all(r["budget_clamped"] == 0 for r in records)
    # per-sample predictions with their schedule are in the store
    for cell in plan_cells(load_config(config_for(bench))):
        rows = ResultsStore(store).predictions(cell.key).records()
        assert sorted(rows) == [f"q{i}" for i in range(N_SAMPLES)]
        assert all(row["extra"]["llm_tokens_per_layer"] and row["extra"]["rank"] == 0 for row in rows.values())


def test_rerun_is_a_no_op(full_run, bench):
    store, records, _ = full_run
    size = store.stat().st_size
    again = run_sweep(config_for(bench), store, progress=False)
    assert again == records and store.stat().st_size == size


CHILD = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from vtprune.eval import store as store_mod
    from vtprune.eval.sweep import run_sweep
    cfg, store, target = sys.argv[1], sys.argv[2], sys.argv[3]
    orig = store_mod.PredictionsWriter.append_many

    def slow(self, items):  # stall after each batch of the 2nd cell so the parent's SIGKILL lands mid-cell
        orig(self, items)
        if str(self.path) == target:
            time.sleep(120)

    store_mod.PredictionsWriter.append_many = slow
    run_sweep(cfg, store, progress=False)
""")


def test_kill_mid_cell_and_resume(full_run, bench, tmp_path):
    """SIGKILL during the 2nd cell, restart: finished cells are skipped, the partial cell continues from
    its predictions, and the records equal an uninterrupted run's (timing/env fields excluded)."""
    _, full_records, _ = full_run
    cfg = config_for(bench)
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    store_path = tmp_path / "run" / "results.jsonl"
    store = ResultsStore(store_path)
    cells = plan_cells(load_config(cfg))
    first, second = store.predictions_path(cells[0].key), store.predictions_path(cells[1].key)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(cfg_file), str(store_path), str(second)],
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not (second.exists() and len(second.read_text().splitlines()) >= 3):  # header + one batch
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the child never reached the 2nd cell"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(store.records()) == 1 and store.has(cells[0].key) and not store.has(cells[1].key)
    first_bytes = first.read_bytes()
    assert len(second.read_text().splitlines()) == 3

    resumed = run_sweep(cfg_file, store_path, progress=False)
    same_records(resumed, full_records)
    assert cell_records(store_path) == resumed
    assert first.read_bytes() == first_bytes  # the finished cell was not touched
    assert len(second.read_text().splitlines()) == 1 + N_SAMPLES  # the done batch was not predicted again
    assert set(VOLATILE_FIELDS) & set(resumed[1])  # the comparison above did exclude timing fields


def test_two_process_sharding_equals_single(full_run, bench, tmp_path):
    """torchrun (the env `accelerate launch` also sets) with 2 CPU processes over gloo: each rank
    predicts every other batch into the shared store; rank 0 scores after the barrier."""
    _, full_records, _ = full_run
    cfg = config_for(bench)
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    store_path = tmp_path / "sharded" / "results.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "vtprune.eval.cli", "sweep", str(cfg_file), "--store",
           str(store_path), "--threads", "1", "--no-progress"]
    t0 = time.time()
    res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr[-3000:]
    sharded = cell_records(store_path)
    same_records(sharded, full_records)
    assert all(r["env"]["world_size"] == 2 for r in sharded)
    store = ResultsStore(store_path)
    for cell in plan_cells(load_config(cfg)):
        rows = store.predictions(cell.key).records()
        assert sorted(rows) == [f"q{i}" for i in range(N_SAMPLES)]
        ranks = {rows[f"q{i}"]["extra"]["rank"] for i in range(N_SAMPLES)}
        assert ranks == {0, 1}, ranks  # batch j went to rank j % 2
        assert {rows["q0"]["extra"]["rank"], rows["q2"]["extra"]["rank"]} == {0, 1}
    print(f"2-process sweep: {time.time() - t0:.1f} s")


def test_report_of_a_real_sweep(full_run, tmp_path):
    store, records, _ = full_run
    rc = cli.main(["report", str(store), "--out", str(tmp_path / "rep")])
    assert rc == 0
    md = (tmp_path / "rep" / "results.md").read_text()
    assert sum(1 for l in md.splitlines() if l.startswith("| embedded |")) == len(records)
    assert (tmp_path / "rep" / "pareto_tiny-llava__embedded.png").stat().st_size > 10_000


def test_int_budget_above_an_images_tokens_is_recorded_as_clamped(tmp_path):
    """Tiny Qwen2-VL: 56 px images give 4 visual tokens, 112 px ones 16; at keep=8 the small ones keep all
    4 (clamped), the large ones 8; the record counts the clamped samples and the report shows them."""
    root = tmp_path / "bench"
    (root / "images").mkdir(parents=True)
    with open(root / "benchmark.jsonl", "w") as f:
        for i, img in enumerate(tiny_images(4, seed=1, sizes=[(56, 56), (112, 112), (56, 56), (112, 112)])):
            img.save(root / "images" / f"{i}.png")
            f.write(json.dumps({"id": f"q{i}", "image": f"images/{i}.png", "question": "what?", "answer": "x",
                                "type": "color"}) + "\n")
    cfg = config_for(root, models=[{"name": "tiny-qwen", "builtin": "tiny-qwen2_vl"}], methods=[], budgets=[8],
                     max_new_tokens=1)
    store = tmp_path / "store" / "results.jsonl"
    none, rnd = run_sweep(cfg, store, progress=False)
    assert (none["visual_tokens"], none["budget_clamped"]) == (10, 0)
    assert (rnd["visual_tokens"], rnd["budget_clamped"]) == (6, 2)
    rows = ResultsStore(store).predictions(plan_cells(load_config(cfg))[1].key).records()
    assert [rows[f"q{i}"]["extra"]["budget_clamped"] for i in range(4)] == [True, False, True, False]
    assert cli.main(["report", str(store), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "results.md").read_text()
    assert "budget clamped |" in md and "| 2/4 |" in md


# ----------------------------------------------------------------------------------------------------
# Config errors


def _cfg(**over):
    cfg = config_for(Path("bench"))
    for k, v in over.items():
        if v is KeyError:
            cfg.pop(k)
        else:
            cfg[k] = v
    return cfg


@pytest.mark.parametrize("cfg, key", [
    (_cfg(models=KeyError), "models"),
    (_cfg(models=[]), "models"),
    (_cfg(models=[{"name": "m"}]), "models[0]"),
    (_cfg(models=[{"name": "m", "builtin": "tiny-llama"}]), "models[0].builtin"),
    (_cfg(models=[{"name": "m", "builtin": "tiny-llava", "path": "x"}]), "models[0]"),
    (_cfg(models=[{"builtin": "tiny-llava"}]), "models[0].name"),
    (_cfg(benchmarks=[{"name": "nosuch", "path": "x"}]), "benchmarks[0].name"),
    (_cfg(benchmarks=[{"name": "pope"}]), "benchmarks[0].path"),
    (_cfg(methods=["fastvv"]), "methods[0].name"),
    (_cfg(methods=[{"name": "fastv", "params": {"depth": 2}}]), "methods[0].params.depth"),
    (_cfg(methods=[{"name": "fastv", "params": {"keep": 0.5}}]), "methods[0].params.keep"),
    (_cfg(methods=[{"name": "fastv", "budget_param": "ratio"}]), "methods[0].budget_param"),
    (_cfg(methods=[{"name": "fastv", "budgets": []}]), "methods[0].budgets"),
    (_cfg(methods=[{"spec": "pool:keep=0.5"}]), "methods[0].label"),
    (_cfg(methods=[{"spec": "pool:keep=0.5", "label": "p"}]), "methods[0].spec"),
    (_cfg(budgets=KeyError), "budgets"),
    (_cfg(budgets="0.5"), "budgets"),
    (_cfg(budgets=[0.5, -1]), "budgets[1]"),
    (_cfg(budget=[0.5]), "budget"),
    (_cfg(batch_size=0), "batch_size"),
    (_cfg(max_new_tokens="8"), "max_new_tokens"),
    (_cfg(device="tpu"), "device"),
    (_cfg(dtype="fp8"), "dtype"),
])
def test_malformed_config_names_the_key(cfg, key):
    with pytest.raises(ValueError) as exc:
        load_config(cfg)
    assert f"sweep config: {key}: " in str(exc.value), str(exc.value)


def test_config_forms_and_shipped_configs():
    cfg = load_config(_cfg(methods=[
        "fastv", {"name": "fastv", "params": {"layer": 3}, "budgets": [64]},
        {"name": "pitome", "budget_param": "ratio", "budgets": [0.9]},
        {"spec": "pool:keep={budget} + fastv:layer=2,keep=0.5", "label": "pool+fastv"}]))
    assert [(m.label, m.budget_param, m.budgets) for m in cfg.methods] == [
        ("none", None, (None,)), ("random", "keep", (0.5, 0.25)), ("fastv", "keep", (0.5, 0.25)),
        ("fastv(layer=3)", "keep", (64,)), ("pitome", "ratio", (0.9,)), ("pool+fastv", None, (0.5, 0.25))]
    cells = plan_cells(cfg, limit=3)
    assert len(cells) == 1 + 2 + 2 + 1 + 1 + 2 and len({c.key for c in cells}) == len(cells)
    assert all(c.identity["limit"] == 3 and c.ref_key == cells[0].key for c in cells)
    # embedded.yaml: the single-view model runs none + 16 methods x 3 budgets, the AnyRes one none + 7 x 3
    for name, n in (("tiny.yaml", 2 * 7), ("embedded.yaml", (1 + 16 * 3) + (1 + 7 * 3))):
        c = load_config(REPO / "eval" / "configs" / name)
        assert len(plan_cells(c)) == n
    assert load_config(REPO / "eval" / "configs" / "embedded.yaml").models[0].builtin == "embedded"


def test_cli_missing_benchmark_names_the_fix(tmp_path, capsys):
    cfg = _cfg(benchmarks=[{"name": "embedded", "path": str(tmp_path / "assets" / "embedded" / "bench")}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc = cli.main(["sweep", str(tmp_path / "c.yaml"), "--store", str(tmp_path / "r.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and "python -m vtprune.eval.embedded.generator" in err
    rc = cli.main(["sweep", str(tmp_path / "nope.yaml")])
    assert rc == 2 and "nope.yaml not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Validation before the first cell, failures that do not stop the sweep, two sweeps, Ctrl-C


def _nothing_stored(store_path: Path) -> bool:
    return not store_path.parent.exists() or not any(store_path.parent.iterdir())


@pytest.mark.parametrize("over, entry, says", [
    ({"methods": [{"name": "fastv", "params": {"layer": 10}}]}, "methods[0] ('fastv(layer=10)')", "layer=10"),
    ({"methods": [{"name": "fastv", "params": {"layer": "two"}}]}, "methods[0] ('fastv(layer=two)')", "layer"),
    ({"methods": ["fastv"], "budgets": [64]}, "budgets (the 'random' baseline", "keep=64"),
    ({"methods": [{"name": "hiprune", "budgets": [0.5, 64]}]}, "methods[0] ('hiprune') at budget 64", "keep=64"),
    ({"methods": [{"name": "globalcom2"}]}, "methods[0] ('globalcom2') at budget 0.5", "LLaVA-NeXT"),
])
def test_cells_are_validated_before_any_runs(bench, tmp_path, over, entry, says, capsys):
    """A value the model cannot take stops the sweep before the first cell with rc 2, a line naming
    the config entry and the fix, and nothing stored (not a record marked "unsupported" for good)."""
    from vtprune.eval.sweep import SweepConfigError

    cfg = config_for(bench, **over)
    store_path = tmp_path / "run" / "results.jsonl"
    with pytest.raises(SweepConfigError) as exc:
        run_sweep(cfg, store_path, progress=False)
    msg = str(exc.value)
    assert entry in msg and says in msg and "on model 'tiny-llava'" in msg, msg
    assert "models: [NAME, ...]" in msg  # the way to keep a method off a model it does not support
    assert _nothing_stored(store_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc = cli.main(["sweep", str(tmp_path / "c.yaml"), "--store", str(store_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and entry in err and "Traceback" not in err
    assert _nothing_stored(store_path)


def test_method_restricted_to_some_models(bench):
    from vtprune.eval.sweep import validate_cells

    two = [{"name": "tiny-llava", "builtin": "tiny-llava"}, {"name": "tiny-qwen", "builtin": "tiny-qwen2_vl"}]
    cfg = load_config(config_for(bench, models=two, methods=[{"name": "pitome", "budget_param": "ratio",
                                                              "budgets": [0.9], "models": ["tiny-llava"]}]))
    cells = plan_cells(cfg)
    assert [(c.model.name, c.method.label) for c in cells if c.method.name == "pitome"] == [("tiny-llava", "pitome")]
    validate_cells(cfg, cells)  # pitome (stage V) runs on the CLIP or DINOv2 tower of LLaVA-1.5 only
    with pytest.raises(ValueError, match=r"methods\[0\].models: unknown model 'nope'"):
        load_config(config_for(bench, methods=[{"name": "fastv", "models": ["nope"]}]))
    with pytest.raises(ValueError, match="runs on every model"):
        load_config(config_for(bench, methods=[{"name": "none", "models": ["tiny-llava"]}]))


def test_benchmark_restricted_to_some_models(bench):
    """A benchmark with ``models:`` pairs only with those models (each embedded model has its own split)."""
    two = [{"name": "tiny-llava", "builtin": "tiny-llava"}, {"name": "tiny-qwen", "builtin": "tiny-qwen2_vl"}]
    benches = [{"name": "jsonl", "path": str(bench), "label": "a", "models": ["tiny-llava"]},
               {"name": "jsonl", "path": str(bench), "label": "b"}]
    cfg = load_config(config_for(bench, models=two, benchmarks=benches, methods=[]))
    pairs = {(c.model.name, c.bench.label) for c in plan_cells(cfg)}
    assert pairs == {("tiny-llava", "a"), ("tiny-llava", "b"), ("tiny-qwen", "b")}
    with pytest.raises(ValueError, match=r"benchmarks\[0\].models: unknown model 'nope'"):
        load_config(config_for(bench, benchmarks=[dict(benches[0], models=["nope"])]))


def test_benchmark_limit(bench, tmp_path):
    """A benchmark's own ``limit`` beats the config's; the command line's beats both; cells record it."""
    benches = [{"name": "jsonl", "path": str(bench), "label": "a", "limit": 2}, {"name": "jsonl", "path": str(bench), "label": "b"}]
    cfg = load_config(config_for(bench, benchmarks=benches, methods=[], limit=3))
    assert {c.bench.label: c.identity["limit"] for c in plan_cells(cfg)} == {"a": 2, "b": 3}
    assert {c.identity["limit"] for c in plan_cells(cfg, 1)} == {1}
    store_path = tmp_path / "results.jsonl"
    run_sweep(config_for(bench, benchmarks=benches, methods=[], limit=3, baselines=["none"]), store_path, progress=False)
    assert {r["benchmark"]: r["n"] for r in cell_records(store_path)} == {"a": 2, "b": 3}
    with pytest.raises(ValueError, match=r"benchmarks\[0\].limit: must be a positive integer"):
        load_config(config_for(bench, benchmarks=[dict(benches[0], limit=0)]))


def test_a_failing_cell_does_not_stop_the_sweep(full_run, bench, tmp_path, monkeypatch, capsys):
    """One cell raises on its second batch: the error names the cell and the samples, the later cells
    still run, nothing is stored for the failed cell, and the next run retries only that cell and ends
    with the records of an uninterrupted run."""
    from vtprune.eval.sweep import CellsFailedError
    from vtprune.eval.sweep import loop

    _, full_records, _ = full_run
    cfg = config_for(bench)
    store_path = tmp_path / "run" / "results.jsonl"
    real = loop.predict_batch

    def flaky(batch, model, proc, prompt_fn, bench_, patch, *rest):
        if "random:" in repr(patch) and "keep=0.5" in repr(patch) and batch[0].id == "q2":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(batch, model, proc, prompt_fn, bench_, patch, *rest)

    monkeypatch.setattr(loop, "predict_batch", flaky)
    with pytest.raises(CellsFailedError) as exc:
        run_sweep(cfg, store_path, progress=False)
    err = capsys.readouterr().err
    (failure,) = exc.value.failures
    expected = ("model 'tiny-llava', method 'random', budget 0.5, benchmark 'embedded': samples q2, q3: "
                "RuntimeError: CUDA out of memory (simulated)")
    assert failure.message == expected and expected in str(exc.value) and expected in err
    assert "1 of 5 cells failed" in str(exc.value)
    store = ResultsStore(store_path)
    cells = plan_cells(load_config(cfg))
    assert [store.has(c.key) for c in cells] == [True, False, True, True, True]  # later cells ran
    assert exc.value.records[1] is None and exc.value.records[2] == store.get(cells[2].key)
    assert list(store.failures()) == [cells[1].key] and "RuntimeError" in store.failures()[cells[1].key]["traceback"]
    assert len(store.predictions(cells[1].key).done_ids()) == 2  # the batch before the failure is kept
    rep = tmp_path / "rep"
    assert cli.main(["report", str(store_path), "--out", str(rep)]) == 0
    md = (rep / "results.md").read_text()
    assert "## Failed cells" in md and "| model 'tiny-llava', method 'random', budget 0.5, benchmark 'embedded' |" in md

    monkeypatch.setattr(loop, "predict_batch", real)
    again = run_sweep(cfg, store_path, progress=False)
    same_records(again, full_records)
    assert store.failures() == {}  # the record supersedes the failure
    assert len(store_path.read_text().splitlines()) == len(cells)


def test_cli_reports_failed_cells_with_rc_1(bench, tmp_path, monkeypatch, capsys):
    from vtprune.eval.sweep import loop

    def broken(*args, **kwargs):
        raise ValueError("keep=32 is larger than the 4 visual tokens of this image")

    monkeypatch.setattr(loop, "predict_batch", broken)
    cfg = config_for(bench, methods=[], budgets=[0.5], limit=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    store_path = tmp_path / "r" / "results.jsonl"
    rc = cli.main(["sweep", str(tmp_path / "c.yaml"), "--store", str(store_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "2 of 2 cells failed" in err and "Traceback" not in err
    assert "model 'tiny-llava', method 'none', benchmark 'embedded': samples q0, q1: ValueError: keep=32" in err
    assert "run the same command again" in err and str(ResultsStore(store_path).failures_path) in err


SLOW_CHILD = textwrap.dedent("""
    import signal, sys, time, torch
    # a terminal delivers Ctrl-C to the foreground sweep; a test suite started in the background by a shell
    # without job control hands its children SIGINT *ignored*, so restore Python's own handler here
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)
    from vtprune.eval import store as store_mod
    from vtprune.eval import cli
    target, pause = sys.argv[1], float(sys.argv[2])
    orig = store_mod.PredictionsWriter.append_many

    def slow(self, items):  # pause after the first batch of one cell (still claimed by this process)
        orig(self, items)
        if str(self.path) == target and len(self.done_ids()) <= 2:
            print("PAUSED", flush=True)
            time.sleep(pause)

    store_mod.PredictionsWriter.append_many = slow
    sys.exit(cli.main(sys.argv[3:]))
""")


def _paused_child(bench, tmp_path, pause: float):
    """A `vtprune sweep` subprocess of the standard config, paused ``pause`` s after the first batch
    of its 2nd cell (holding that cell's claim); returns (config file, store path, cells, process)."""
    cfg = config_for(bench)
    cfg_file = tmp_path / "sweep.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    store_path = tmp_path / "run" / "results.jsonl"
    cells = plan_cells(load_config(cfg))
    target = ResultsStore(store_path).predictions_path(cells[1].key)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, str(target), str(pause), "sweep", str(cfg_file),
                             "--store", str(store_path), "--no-progress", "--threads", "1"],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # blocks until the child prints PAUSED (or exits)
    if line.strip() != "PAUSED":
        proc.kill()
        pytest.fail("the child sweep never paused: " + proc.stderr.read()[-3000:])
    return cfg_file, store_path, cells, proc


def test_two_sweeps_on_one_store_share_the_work(full_run, bench, tmp_path, capsys):
    """A second sweep on a store whose cell another sweep is running skips that cell, runs the
    others, then waits for it: both end with rc 0, every cell stored once, no CellExistsError."""
    _, full_records, _ = full_run
    cfg_file, store_path, cells, proc = _paused_child(bench, tmp_path, 8)
    try:
        mine = run_sweep(cfg_file, store_path, progress=False)  # skips cell 2 (claimed), waits for it at the end
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "CellExistsError" not in err and "Traceback" not in err
    assert ("waiting for another process that runs model 'tiny-llava', method 'random', budget 0.5"
            in capsys.readouterr().err)
    same_records(mine, full_records)
    store = ResultsStore(store_path)
    same_records([store.get(c.key) for c in cells], full_records)  # stored in the order the cells finished
    assert len(store_path.read_text().splitlines()) == len(cells)  # each cell stored exactly once


def test_ctrl_c_prints_one_line_and_the_same_command_resumes(full_run, bench, tmp_path):
    _, full_records, _ = full_run
    cfg_file, store_path, _, proc = _paused_child(bench, tmp_path, 120)
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [f"vtprune sweep: interrupted; the finished cells and the predictions made so far are kept in "
                     f"{store_path}; run the same command to resume."], err
    assert cli.main(["sweep", str(cfg_file), "--store", str(store_path), "--no-progress"]) == 0
    same_records(cell_records(store_path), full_records)
