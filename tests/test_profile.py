"""vtprune.profile / `vtprune bench` on tiny random models: structure only, no timing assertions
(the speed targets live in scripts/efficiency_benchmark.py)."""
import json
import math

import pytest
import torch

import vtprune
from vtprune.eval.profile import PHASES, ProfileResult, build_llava_shape, llava_inputs

METHODS = ["none", "random:keep=64"]


@pytest.fixture(scope="module")
def tiny():
    model, proc = build_llava_shape("tiny")
    return model, llava_inputs(proc, "what is in the picture?")


@pytest.fixture(scope="module")
def result(tiny):
    model, inputs = tiny
    return vtprune.profile(model, inputs, METHODS, repeats=2, warmup=1, new_tokens=4)


def test_lazy_exports():
    assert vtprune.count_flops is vtprune.flops.count_flops
    assert callable(vtprune.profile)


def test_all_phases_for_each_method(result):
    assert isinstance(result, ProfileResult)
    assert result.methods == METHODS
    for m in METHODS:
        for p in PHASES:
            s = result.phases[m][p]
            assert s.n == 2 and len(s.samples) == 2, (m, p)
            assert all(math.isfinite(x) for x in s.samples), (m, p)
            assert s.p10 <= s.median <= s.p90
        for p in ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "generate_ms"):
            assert result.phases[m][p].median > 0, (m, p)
        assert result.tokens[m]["new_tokens"] == 4
        assert result.tokens[m]["schedule_stable"]
    # the phases nest: prefill inside the first forward inside generate
    for m in METHODS:
        ph = result.phases[m]
        assert all(a < b for a, b in zip(ph["prefill_ms"].samples, ph["ttft_ms"].samples))
        assert all(a < b for a, b in zip(ph["ttft_ms"].samples, ph["generate_ms"].samples))


def test_interleaving_order_recorded(result):
    order = result.order
    assert len(order) == 3 * len(METHODS)
    assert [o["warmup"] for o in order] == [True] * 2 + [False] * 4
    for rnd in range(3):  # every round runs every method once
        assert sorted(o["method"] for o in order if o["round"] == rnd) == sorted(METHODS)
    assert [o["method"] for o in order][:4] == ["none", "random:keep=64", "random:keep=64", "none"]  # rotated


def test_flops_and_kv(result, tiny):
    model, inputs = tiny
    fl = result.flops
    assert result.tokens["none"]["visual_tokens_per_image"] == [256]
    assert result.tokens["random:keep=64"]["visual_tokens_per_image"] == [64]
    n = inputs["input_ids"].shape[1]
    ref = vtprune.count_flops(model, vtprune.flops.nominal_schedule(model, 256, n - 256))
    assert fl["none"]["llm_prefill_tflops"] == pytest.approx(ref.llm_prefill_flops / 1e12)
    assert fl["random:keep=64"]["llm_prefill_tflops"] < fl["none"]["llm_prefill_tflops"]
    assert fl["none"]["kv_mib"] == pytest.approx(ref.kv_bytes_prefill / 2**20 * 2)  # fp32 model: 4-byte KV
    assert fl["random:keep=64"]["kv_mib"] < fl["none"]["kv_mib"]
    assert fl["none"]["vision_tflops"] > 0
    assert "vtprune-flops-v1" in fl["none"]["convention"]


def test_environment_and_serialisation(result):
    env = result.environment
    for key in ("torch", "transformers", "dtype", "threads", "attn_implementation", "device", "loadavg_before",
                "loadavg_after"):
        assert key in env, key
    assert env["threads"] == torch.get_num_threads()
    assert env["attn_implementation"] == "sdpa"
    assert env["dtype"] == "float32"
    assert "RSS" in result.settings["memory"]
    d = json.loads(result.to_json())
    assert d["methods"] == METHODS and d["phases"]["none"]["prefill_ms"]["n"] == 2
    table = result.to_table()
    assert table.startswith("| method") and table.count("\n| ") == len(METHODS)
    assert "random:keep=64" in table and "loadavg" in table


def test_model_left_unpatched(tiny):
    model, _ = tiny
    assert getattr(model, "_vtprune_patch", None) is None
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model.model.language_model._forward_pre_hooks
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_cli_bench(capsys, tmp_path):
    from vtprune.eval.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--family", "llava", "--methods", "none", "fastv:layer=2,keep=64", "random:keep=64",
               "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for m in ("| none |", "| fastv:layer=2,keep=64 |", "| random:keep=64 |", "prefill ms", "loadavg"):
        assert m in text
    d = json.loads(out.read_text())
    assert d["methods"] == ["none", "fastv:layer=2,keep=64", "random:keep=64"]
    assert d["flops"]["fastv:layer=2,keep=64"]["eq_visual_tokens"] < 256


def test_cli_still_has_methods_and_demo(capsys):
    from vtprune.eval.cli import main

    assert main(["methods"]) == 0
    assert "fastv" in capsys.readouterr().out


def test_patch_options_per_method(tiny):
    """A (method, patch options) pair runs under its own label; TransPrune's pruning layers are served
    their kept key rows by default and not with reuse_projections=False."""
    model, inputs = tiny
    spec = "transprune:prune_layers=1|2|3,keep_ratios=0.75|0.5|0.25"
    res = vtprune.profile(model, inputs, [spec, (spec, {"reuse_projections": False})], repeats=1, warmup=0,
                          new_tokens=2)
    off = f"{spec} [reuse_projections=False]"
    assert res.methods == [spec, off]
    assert res.tokens[spec]["reused_key_rows"] > 0 and res.tokens[off]["reused_key_rows"] == 0
    assert res.tokens[spec]["llm_tokens_per_layer"] == res.tokens[off]["llm_tokens_per_layer"]
    assert res.phases[spec]["key_proj_ms"].median > 0 and res.phases[off]["key_proj_ms"].median > 0
    with pytest.raises(ValueError, match="patch options"):
        vtprune.profile(model, inputs, [(spec, "reuse_projections=False")], repeats=1, warmup=0)


def test_stage_v_tower_norm_is_vision_time(tiny):
    """CLIP's pre_layrnorm is the tower's own work: under a stage-V method (which runs the encoder
    layer by layer) it counts as vision time, not as the method's overhead."""
    import time

    model, inputs = tiny
    norm = model.model.vision_tower.pre_layrnorm
    h = norm.register_forward_hook(lambda *a: time.sleep(0.05))
    try:
        res = vtprune.profile(model, inputs, ["pitome:keep=128"], repeats=1, warmup=0, new_tokens=1)
    finally:
        h.remove()
    ph = res.phases["pitome:keep=128"]
    assert ph["vision_ms"].median >= 50
    assert ph["signal_ms"].median < 50
