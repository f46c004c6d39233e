"""The FLOPs a patched request reports are the FLOPs that ran: count_flops(model, Patch.stats
schedule) == torch's FlopCounterMode around the patched forward (within 1 %), on every family,
unpruned, pruned before the LLM and pruned inside it."""
from __future__ import annotations

import pytest
import torch
from torch.utils import flop_counter

import vtprune
from vtprune.flops import count_flops
from vtprune.testing import BUILDERS, FAMILIES, make_inputs, tiny_images

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_counter.flop_registry:  # otherwise attention FLOPs are silently missing

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

_TRI_SOLVE = torch.ops.aten.linalg_solve_triangular
if _TRI_SOLVE not in flop_counter.flop_registry:  # Gated DeltaNet's chunked rule (Qwen3.5): two solves per chunk

    @flop_counter.register_flop_formula(_TRI_SOLVE)
    def _tri_solve_flop(a_shape, b_shape, *args, out_shape=None, **kwargs):
        """Unit-triangular forward substitution: n(n-1)/2 multiply-adds per right-hand column."""
        n, cols = a_shape[-1], b_shape[-1]
        batch = 1
        for x in b_shape[:-2]:
            batch *= x
        return 2 * batch * cols * n * (n - 1) // 2

_GROUPED_MM = torch.ops.aten._grouped_mm
if _GROUPED_MM not in flop_counter.flop_registry:  # MoE experts (transformers' default "grouped_mm" implementation)

    @flop_counter.register_flop_formula(_GROUPED_MM)
    def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs):
        """(T, K) rows split over experts times per-expert (K, N) weights: 2*T*K*N."""
        return 2 * a_shape[0] * a_shape[-1] * out_shape[-1]


@pytest.mark.parametrize("spec", ["none", "random:keep=0.5", "random:at=D,layer=1,keep=0.3"])
@pytest.mark.parametrize("family", FAMILIES)
def test_reported_flops_equal_counted_flops(family, spec):
    model, proc = BUILDERS[family]()
    model.requires_grad_(False)  # FlopCounterMode's module tracker trips on the kernel-hub wrappers (Qwen3.5) otherwise
    sizes = None if family == "llava" else [(112, 84)]
    inp = make_inputs(family, proc, ["what is in the picture here?"], tiny_images(1, sizes=sizes))
    with vtprune.patch(model, spec) as h:
        with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as fc:
            model(**inp, logits_to_keep=1)
    (sched,) = h.stats.schedules
    rep = count_flops(model, sched)
    expected = rep.vision_flops + rep.projector_flops + rep.llm_prefill_flops + rep.lm_head_flops_per_token
    counted = fc.get_total_flops()
    assert abs(counted - expected) <= 0.01 * expected, (counted, expected, rep.as_dict())


@pytest.mark.parametrize("spec", ["none", "random:keep=0.5,quota=frame"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5_moe"])
def test_reported_flops_equal_counted_flops_with_video(family, spec):
    """An image and a video in one prompt: vision per frame, merger (and DeepStack), LLM all counted."""
    from vtprune.testing import make_video_inputs, tiny_video

    model, proc = BUILDERS[family]()
    model.requires_grad_(False)
    inp = make_video_inputs(family, proc, ["what happens here?"], [tiny_video(6, 1, (84, 56))],
                            images=tiny_images(1, sizes=[(70, 112)]))
    with vtprune.patch(model, spec) as h:
        with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as fc:
            model(**inp, logits_to_keep=1)
    (sched,) = h.stats.schedules
    assert sched.visual_tokens_in == 8 + 18
    rep = count_flops(model, sched)
    expected = rep.vision_flops + rep.projector_flops + rep.llm_prefill_flops + rep.lm_head_flops_per_token
    counted = fc.get_total_flops()
    assert abs(counted - expected) <= 0.01 * expected, (counted, expected, rep.as_dict())
