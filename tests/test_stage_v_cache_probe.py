"""scripts/stage_v_cache_probe.py runs end to end on the tiny LLaVA shape and times every variant."""
from helpers import load_script


def test_probe_times_the_calls_four_ways(capsys):
    probe = load_script("stage_v_cache_probe")
    assert probe.main(["--shape", "tiny", "--keep", "128", "--rounds", "1", "--flush-mib", "1"]) == 0
    out = capsys.readouterr().out
    assert "pitome:keep=128: 1 after_layer calls" in out  # the tiny tower merges after its one feature layer
    for variant in ("in situ", "replay ", "replay, caches flushed", "replay, flushed, kernels re-run"):
        assert variant in out, variant
    assert "in situ, minor page faults inside the calls: median" in out
    assert "bsm    layers ( 1): fp32" in out and "pitome layers ( 0)" in out  # its one merge layer is a BSM one


def test_probe_compares_the_bf16_energy_order_of_pitome_layers(capsys):
    import torch

    from vtprune.methods.pitome import PiToMe
    from vtprune.policy import ViTInfo

    probe = load_script("stage_v_cache_probe")
    vit = ViTInfo(layers=24, last_layer=22, tokens=577, drop_cls=True)
    policy = PiToMe(keep=64)  # layers 13..22 are PiToMe layers, 0..12 BSM
    g = torch.Generator().manual_seed(0)
    calls = [(3, torch.randn(1, 40, 16, generator=g)),  # a BSM layer: not compared
             (13, torch.randn(1, 40, 16, generator=g)), (14, torch.randn(1, 30, 16, generator=g))]
    probe._bf16_energy_order(policy, vit, calls)
    out = capsys.readouterr().out
    assert "bf16 energies: same order as fp32 in " in out and " of 2 PiToMe layers; median neighbour gap " in out
    probe._bf16_energy_order(policy, vit, calls[:1])
    assert capsys.readouterr().out == ""  # no PiToMe layer, nothing to say
