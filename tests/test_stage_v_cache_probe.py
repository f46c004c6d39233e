"""scripts/stage_v_cache_probe.py runs end to end on the tiny LLaVA shape and times every variant."""
import importlib.util
from pathlib import Path


def _probe():
    path = Path(__file__).resolve().parents[1] / "scripts" / "stage_v_cache_probe.py"
    spec = importlib.util.spec_from_file_location("stage_v_cache_probe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_times_the_calls_four_ways(capsys):
    assert _probe().main(["--shape", "tiny", "--keep", "128", "--rounds", "1", "--flush-mib", "1"]) == 0
    out = capsys.readouterr().out
    assert "pitome:keep=128: 1 after_layer calls" in out  # the tiny tower merges after its one feature layer
    for variant in ("in situ", "replay ", "replay, caches flushed", "replay, flushed, kernels re-run"):
        assert variant in out, variant

