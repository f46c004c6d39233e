"""Results store: canonical cell keys, torn-line repair, kill-and-resume, multi-process appends."""
import json
import signal
import subprocess
import sys
import textwrap

import pytest

import vtprune.eval.store as store_mod
from vtprune.eval.store import (
    CellExistsError, PredictionsWriter, ResultsStore, StoreCorruptError, cell_key, parse_cell_key,
)

STORE_FILE = store_mod.__file__

# The child processes load store.py by path (no vtprune/torch import), then run this code.
CHILD_PRELUDE = textwrap.dedent(f"""
    import importlib.util, sys, os, signal
    spec = importlib.util.spec_from_file_location("store", {STORE_FILE!r})
    store = importlib.util.module_from_spec(spec); spec.loader.exec_module(store)
    ResultsStore, PredictionsWriter, cell_key = store.ResultsStore, store.PredictionsWriter, store.cell_key
""")

# A toy sweep that follows the resume protocol of the store's docstring. ``hook(event, n)`` is called
# before each prediction (event "predict", n = predictions made so far in this run) and before each
# put ("put"); a hook may raise (simulated crash) or kill the process.
SWEEP_SRC = textwrap.dedent("""
    CELLS = [dict(model="tiny", method=m, params={"keep": k}, budget=k, benchmark="toy", limit=5)
             for m in ("random", "hiprune") for k in (16, 32)]
    SAMPLES = [f"s{i}" for i in range(5)]

    def predict(cell, sid):
        return f"{cell['method']}:{cell['budget']}:{sid}"

    def run_sweep(path, hook=lambda event, n: None):
        st = ResultsStore(path)
        made = 0
        for cell in CELLS:
            key = cell_key(**cell)
            if st.has(key):
                continue
            pw = st.predictions(key)
            done = pw.done_ids()
            for sid in SAMPLES:
                if sid in done:
                    continue
                hook("predict", made)
                pw.append(sid, predict(cell, sid), {"tokens": len(sid)})
                made += 1
            preds = pw.predictions()
            record = {"n": len(preds), "correct": sum(p.endswith(("s0", "s2")) for p in preds.values()),
                      "predictions": sorted(preds.items())}
            hook("put", made)
            st.put(key, record)
        return made
""")
ns = {"ResultsStore": ResultsStore, "PredictionsWriter": PredictionsWriter, "cell_key": cell_key}
exec(SWEEP_SRC, ns)
run_sweep, CELLS = ns["run_sweep"], ns["CELLS"]


class Crash(Exception):
    pass


def crash_at(event, when):
    def hook(ev, n):
        if ev == event and n == when:
            raise Crash
    return hook


@pytest.fixture
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "results.jsonl"
    assert run_sweep(path) == 20
    return ResultsStore(path).records()


def _pred_files(path):
    d = path.with_name(path.stem + ".predictions")
    return {f.name: PredictionsWriter(f).records() for f in sorted(d.iterdir())}


# ---------------------------------------------------------------------------------------------- keys

def test_cell_key_is_canonical():
    a = cell_key(model="m", method="hiprune", params={"keep": 64, "alpha": 0.1}, budget=64, shard=None)
    b = cell_key(budget=64, params={"alpha": 0.1, "keep": 64}, method="hiprune", model="m")
    assert a == b == '{"budget":64,"method":"hiprune","model":"m","params":{"alpha":0.1,"keep":64}}'
    assert parse_cell_key(a)["params"] == {"alpha": 0.1, "keep": 64}
    assert cell_key(keep=1) != cell_key(keep=1.0)               # a count is not a fraction
    assert cell_key(layers=(2, 3)) == cell_key(layers=[2, 3])
    with pytest.raises(TypeError):
        cell_key(x={1, 2})
    with pytest.raises(ValueError):
        cell_key(x=float("nan"))


# ------------------------------------------------------------------------------------- basic API

def test_put_get_has_records(tmp_path):
    st = ResultsStore(tmp_path / "r.jsonl")
    k1 = cell_key(model="m", budget=1)
    assert not st.has(k1) and st.get(k1) is None and st.records() == []
    st.put(k1, {"acc": 0.5})
    st.put({"model": "m", "budget": 2}, {"acc": 0.7})          # an identity dict works as a key
    assert st.has(k1) and st.get(k1) == {"acc": 0.5}
    assert st.get(cell_key(budget=2, model="m")) == {"acc": 0.7}
    with pytest.raises(CellExistsError):
        st.put(k1, {"acc": 0.9})
    st.put(k1, {"acc": 0.9}, replace=True)                      # the later line wins, order kept
    recs = ResultsStore(tmp_path / "r.jsonl").records()         # a fresh reader sees the same
    assert [r["record"] for r in recs] == [{"acc": 0.9}, {"acc": 0.7}]
    assert recs[0]["identity"] == {"model": "m", "budget": 1}
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == 3                                      # append-only: nothing rewritten
    # two store objects on one file see each other's appends
    other = ResultsStore(tmp_path / "r.jsonl")
    other.put(cell_key(model="m", budget=3), {"acc": 1.0})
    assert st.has(cell_key(model="m", budget=3)) and len(st) == 3


def test_predictions_writer_resume_and_header(tmp_path):
    st = ResultsStore(tmp_path / "r.jsonl")
    key = cell_key(model="m")
    pw = st.predictions(key)
    assert pw.done_ids() == set() and not pw.path.exists()
    pw.append("a", "yes", {"ms": 3})
    pw.append_many([("b", "no", None), ("c", [1, 2], None)])
    again = st.predictions(key)
    assert again.done_ids() == {"a", "b", "c"}
    assert again.predictions() == {"a": "yes", "b": "no", "c": [1, 2]}
    assert again.records()["a"] == {"prediction": "yes", "extra": {"ms": 3}}
    assert again.header == {"cell": key}
    assert json.loads(pw.path.read_text().splitlines()[0]) == {"header": {"cell": key}}
    with pytest.raises(ValueError, match="does not match"):
        PredictionsWriter(pw.path, header={"cell": "another"})


# ---------------------------------------------------------------------------------- torn lines

def test_torn_last_line_is_ignored_then_repaired(tmp_path):
    p = tmp_path / "r.jsonl"
    st = ResultsStore(p)
    st.put(cell_key(c=1), {"v": 1})
    st.put(cell_key(c=2), {"v": 2})
    complete = p.read_bytes()
    with open(p, "ab") as f:                                   # a writer killed mid-line
        f.write(b'{"cell":"{\\"c\\":3}","record":{"v"')
    fresh = ResultsStore(p)
    assert [r["record"] for r in fresh.records()] == [{"v": 1}, {"v": 2}]
    assert not fresh.has(cell_key(c=3))
    fresh.put(cell_key(c=4), {"v": 4})                          # the append cuts the torn tail
    assert p.read_bytes() == complete + b'{"cell":"{\\"c\\":4}","record":{"v":4}}\n'
    assert [r["record"] for r in ResultsStore(p).records()] == [{"v": 1}, {"v": 2}, {"v": 4}]
    assert [r["record"] for r in st.records()] == [{"v": 1}, {"v": 2}, {"v": 4}]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    p = tmp_path / "r.jsonl"
    ResultsStore(p).put(cell_key(c=1), {"v": 1})
    with open(p, "ab") as f:                                   # killed between data and newline
        f.write(json.dumps({"cell": cell_key(c=2), "record": {"v": 2}}).encode())
    st = ResultsStore(p)
    assert st.has(cell_key(c=2))                                 # a complete record counts
    st.put(cell_key(c=3), {"v": 3})                              # ... and is never dropped
    assert [r["record"] for r in ResultsStore(p).records()] == [{"v": 1}, {"v": 2}, {"v": 3}]
    assert len(p.read_text().splitlines()) == 3 and p.read_text().endswith("\n")


def test_corrupt_middle_line_raises(tmp_path):
    p = tmp_path / "r.jsonl"
    ResultsStore(p).put(cell_key(c=1), {"v": 1})
    with open(p, "ab") as f:
        f.write(b"garbage\n")
    ResultsStore(p)  # constructing does not read
    with pytest.raises(StoreCorruptError, match=r"r\.jsonl: line 2"):
        ResultsStore(p).records()
    with pytest.raises(StoreCorruptError):
        ResultsStore(p).put(cell_key(c=2), {"v": 2})
    assert p.read_bytes().endswith(b"garbage\n")                 # nothing was dropped


# ------------------------------------------------------------------------------ kill and resume

@pytest.mark.parametrize("event, when", [
    ("predict", 0), ("predict", 3), ("predict", 5), ("predict", 12), ("predict", 19),
    ("put", 5), ("put", 20),
])
def test_interrupted_sweep_resumes_to_identical_records(tmp_path, reference, event, when):
    path = tmp_path / "results.jsonl"
    with pytest.raises(Crash):
        run_sweep(path, crash_at(event, when))
    # a second crash later in the resumed run, with torn tails left in both kinds of file
    with open(path, "ab") as f:
        f.write(b'{"cell": "{\\"trunc')
    pred_dir = path.with_name(path.stem + ".predictions")
    for f in (pred_dir.iterdir() if pred_dir.exists() else ()):
        with open(f, "ab") as fh:
            fh.write(b'{"id": "s9", "predic')
    assert run_sweep(path) == 20 - when                         # only the missing predictions are made
    assert ResultsStore(path).records() == reference            # records include every prediction
    for recs in _pred_files(path).values():
        assert sorted(recs) == [f"s{i}" for i in range(5)]      # torn "s9" lines are gone
    assert run_sweep(path) == 0                                  # a finished sweep does nothing
    assert ResultsStore(path).records() == reference


def test_sigkill_mid_write_then_resume(tmp_path, reference):
    path = tmp_path / "results.jsonl"
    # the child dies by SIGKILL right after writing half a prediction line by hand
    child = CHILD_PRELUDE + SWEEP_SRC + textwrap.dedent(f"""
        def hook(event, n):
            if event == "predict" and n == 7:
                st = ResultsStore({str(path)!r})
                key = cell_key(**CELLS[1])
                with open(st.predictions_path(key), "ab") as f:
                    f.write(b'{{"id":"s2","prediction":"ran')
                    f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        run_sweep({str(path)!r}, hook)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    st = ResultsStore(path)
    assert len(st.records()) == 1                                # cell 0 finished, cell 1 partial
    assert st.predictions(cell_key(**CELLS[1])).done_ids() == {"s0", "s1"}
    assert run_sweep(path) == 20 - 7
    assert ResultsStore(path).records() == reference


# ------------------------------------------------------------------------------ multi-process

def test_two_processes_append_without_interleaving(tmp_path):
    path = tmp_path / "results.jsonl"
    pred = tmp_path / "preds.jsonl"
    child = CHILD_PRELUDE + textwrap.dedent(f"""
        rank = int(sys.argv[1])
        st = ResultsStore({str(path)!r})
        pw = PredictionsWriter({str(pred)!r}, header={{"cell": "shared"}})
        pad = "x" * (500 + 300 * rank)            # long lines make interleaving visible
        for i in range(200):
            st.put(cell_key(rank=rank, i=i), {{"pad": pad, "i": i}})
            pw.append(f"{{rank}}-{{i}}", pad)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", child, str(r)], stderr=subprocess.PIPE)
             for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    lines = path.read_text().splitlines()
    assert len(lines) == 400
    objs = [json.loads(l) for l in lines]                       # every line is a whole record
    assert {o["cell"] for o in objs} == {cell_key(rank=r, i=i) for r in (0, 1) for i in range(200)}
    assert len(ResultsStore(path).records()) == 400
    plines = pred.read_text().splitlines()
    assert len(plines) == 401 and json.loads(plines[0]) == {"header": {"cell": "shared"}}
    assert len(PredictionsWriter(pred).done_ids()) == 400


def test_cell_claims_exclude_other_processes_and_die_with_them(tmp_path):
    """A claimed cell cannot be claimed by another process (timeout 0 raises at once); the claim of a
    process killed with SIGKILL is gone (the OS drops the lock), so the next sweep resumes the cell."""
    path = tmp_path / "results.jsonl"
    key = cell_key(model="m", method="fastv", budget=0.5)
    child = CHILD_PRELUDE + textwrap.dedent(f"""
        st = ResultsStore({str(path)!r})
        with st.claim({key!r}):
            print("CLAIMED", flush=True)
            sys.stdin.readline()                                 # hold it until the parent says so
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "CLAIMED"
        st = ResultsStore(path)
        with pytest.raises(store_mod.CellClaimedError):
            with st.claim(key, timeout=0):
                pass
        with st.claim(cell_key(model="m", method="fastv", budget=0.25), timeout=0):
            pass                                                 # other cells are free
        proc.stdin.write("go\n")
        proc.stdin.flush()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with st.claim(key, timeout=5):                               # released by the kernel
        pass
    assert not path.exists()                                     # claims never create results


def test_failures_are_kept_until_the_cell_has_a_record(tmp_path):
    st = ResultsStore(tmp_path / "results.jsonl")
    a, b = cell_key(m="a"), cell_key(m="b")
    assert st.failures() == {}
    st.add_failure(a, {"message": "first"})
    st.add_failure(a, {"message": "second"})
    st.add_failure(b, {"message": "b failed"})
    assert st.failures() == {a: {"message": "second"}, b: {"message": "b failed"}}
    st.put(a, {"acc": 1.0})
    assert ResultsStore(tmp_path / "results.jsonl").failures() == {b: {"message": "b failed"}}
    assert st.failures_path.name == "results.failures.jsonl" and len(st.failures_path.read_text().splitlines()) == 3
