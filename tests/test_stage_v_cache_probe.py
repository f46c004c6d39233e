"""scripts/stage_v_cache_probe.py runs end to end on the tiny LLaVA shape and times every variant."""
from helpers import load_script


def test_probe_times_the_calls_four_ways(capsys):
    probe = load_script("stage_v_cache_probe")
    assert probe.main(["--shape", "tiny", "--keep", "128", "--rounds", "1", "--flush-mib", "1"]) == 0
    out = capsys.readouterr().out
    assert "pitome:keep=128: 1 after_layer calls" in out  # the tiny tower merges after its one feature layer
    for variant in ("in situ", "replay ", "replay, caches flushed", "replay, flushed, kernels re-run"):
        assert variant in out, variant
    assert "bsm    layers ( 1): fp32" in out and "pitome layers ( 0)" in out  # its one merge layer is a BSM one
