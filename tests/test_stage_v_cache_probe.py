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

    from vtprune.methods.pitome import LayerMerge

    probe = load_script("stage_v_cache_probe")

    def unit(t):
        return t / t.norm(dim=-1, keepdim=True)

    g = torch.Generator().manual_seed(0)
    bsm = (LayerMerge("bsm", 3, None), unit(torch.randn(1, 40, 16, generator=g)))
    pitome = (LayerMerge("pitome", 3, 0.4), unit(torch.randn(1, 40, 16, generator=g)))
    # unit vectors bf16 holds exactly (rows of the identity, permuted and repeated): bf16 products are
    # the fp32 ones, so the energy order must agree
    exact = (LayerMerge("pitome", 3, 0.4), torch.eye(16)[torch.arange(40) % 16 * 5 % 16][None].clone())
    probe._bf16_energy_order([bsm, exact])
    assert "bf16 energies: same order as fp32 in 1 of 1 PiToMe layers; median neighbour gap " in capsys.readouterr().out
    probe._bf16_energy_order([bsm, pitome, exact])
    assert " of 2 PiToMe layers" in capsys.readouterr().out  # the BSM layer is not compared
    probe._bf16_energy_order([bsm])
    assert capsys.readouterr().out == ""  # no PiToMe layer, nothing to say
