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
    for name, n in (("tiny.yaml", 2 * 7), ("embedded.yaml", 1 + 7 * 3)):
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
