"""Baseline ``downsample``: kernels with hand-worked cases; the patched model == the unpatched tower run
by hand on the resized pixels (position table interpolated), its features fed to the unpatched LLM as
an explicitly shortened input; keep-all == unpatched; batch == each sample alone; FLOPs follow the
smaller tower run; unsupported families raise naming ``pool``."""
from __future__ import annotations

import functools

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune
from vtprune.methods import downsample as D
from vtprune.testing import BUILDERS, make_inputs, tiny_images, tiny_llava

from helpers import GEN, QUESTIONS, assert_batch_equals_alone, new_tokens, no_vtprune_hooks
from oracles import last_logits, shortened_inputs


# ------------------------------------------------------------------ kernels
@pytest.mark.parametrize("rows,cols,k,out", [
    (8, 8, 16, (4, 4)),   # the embedded default at keep 0.25: 56 px
    (8, 8, 32, (6, 6)),   # round(sqrt(32)) = round(5.66) = 6: 36 tokens, about the budget
    (8, 8, 8, (3, 3)),    # round(2.83) = 3
    (8, 8, 64, (8, 8)),
    (8, 8, 1, (1, 1)),
    (4, 4, 2, (1, 1)),    # round(1.41) = 1
    (6, 12, 18, (3, 6)),  # both sides halved: sqrt(18 / 72) = 0.5
    (2, 40, 20, (1, 20)), # 2 * sqrt(1/4) = 1, 40 * 0.5 = 20
])
def test_downsample_grid_hand_cases(rows, cols, k, out):
    assert D.downsample_grid(rows, cols, k) == out


def test_downsample_grid_rejects_an_empty_budget():
    with pytest.raises(ValueError, match=">= 1"):
        D.downsample_grid(4, 4, 0)


def test_downsample_slots_are_each_cells_top_left_patch():
    assert D.downsample_slots(4, 4, (2, 2)).tolist() == [0, 2, 8, 10]
    # 8 -> 3: cells start at rows/cols 0, 2, 5 (floor(i * 8 / 3))
    assert D.downsample_slots(8, 8, (3, 3)).tolist() == [0, 2, 5, 16, 18, 21, 40, 42, 45]
    assert D.downsample_slots(3, 3, (3, 3)).tolist() == list(range(9))


def test_resize_area_is_the_block_mean_and_filters_keep_constants():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).expand(2, 3, 4, 4)
    out = D.resize_pixels(x, (2, 2), "area")
    assert out[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]  # means of the 2x2 blocks
    assert D.resize_pixels(x, (2, 2), "nearest")[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]
    const = torch.full((1, 3, 8, 8), -0.75, dtype=torch.float64)
    for mode in D.MODES:
        got = D.resize_pixels(const, (3, 5), mode)
        assert got.dtype == torch.float64 and got.shape == (1, 3, 3, 5)
        torch.testing.assert_close(got, torch.full_like(got, -0.75))
    with pytest.raises(ValueError, match="mode='box'"):
        D.resize_pixels(const, (2, 2), "box")


# ------------------------------------------------------------------ the patched model
@functools.lru_cache(maxsize=None)
def _model(vision: str, attn: str = "sdpa"):
    return tiny_llava(attn_implementation=attn, vision=vision)


def _inputs(vision: str, attn: str = "sdpa", n: int = 2, first: int = 0):
    model, proc = _model(vision, attn)
    return model, make_inputs("llava", proc, QUESTIONS[first:first + n], tiny_images(first + n)[first:])


def explicit_downsample(model, inp, keep, mode="bilinear"):
    """The tower run by hand on the resized pixels: (features per image, kept placeholder indices, grid)."""
    cfg = model.config
    vc = cfg.vision_config
    pv = inp["pixel_values"]
    side = pv.shape[-1] // vc.patch_size
    k = round(keep * side * side) if isinstance(keep, float) else keep
    r = max(1, round(k ** 0.5))
    small = D.resize_pixels(pv, (r * vc.patch_size, r * vc.patch_size), mode)
    tower = model.model.vision_tower
    kw = {} if vc.model_type == "dinov2" else {"interpolate_pos_encoding": True}
    hs = tower(small, output_hidden_states=True, **kw).hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        hs = hs[:, 1:]
    assert hs.shape[1] == r * r
    feats = model.model.multi_modal_projector(hs)
    slots = D.downsample_slots(side, side, (r, r))
    return list(feats), [slots] * pv.shape[0], r


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("vision", ["clip", "siglip", "dinov2"])
@pytest.mark.parametrize("keep,mode", [(0.25, "bilinear"), (9, "bicubic"), (0.5, "area")])
def test_downsample_equals_the_tower_on_the_resized_image(vision, attn, keep, mode):
    model, inp = _inputs(vision, attn)
    with vtprune.patch(model, "downsample", keep=keep, mode=mode) as h, torch.no_grad():
        out = last_logits(model(**inp).logits)
        gen = model.generate(**inp, **GEN)
    with torch.no_grad():
        feats, kept, r = explicit_downsample(model, inp, keep, mode)
        short = shortened_inputs(model, "llava", inp, kept, positions="renumber")
        short["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
        ref = last_logits(model(**short).logits)
        gref = model.generate(**short, **GEN)
    cls = 0 if vision == "siglip" else 1
    assert h.stats.visual_tokens_per_image == [r * r] * 2
    assert h.stats.vision_tokens_per_layer == [[r * r + cls] * 3] * 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert new_tokens(gen, inp["input_ids"].shape[1]) == new_tokens(gref, short["input_ids"].shape[1])


@pytest.mark.parametrize("vision", ["clip", "siglip", "dinov2"])
def test_keep_all_equals_unpatched_and_remove_restores(vision):
    model, inp = _inputs(vision)
    with torch.no_grad():
        ref = model(**inp).logits
        gref = model.generate(**inp, **GEN)
    with vtprune.patch(model, "downsample", keep=4), torch.no_grad():
        assert not torch.equal(model(**inp).logits[:, -1], ref[:, -1])
    h = vtprune.patch(model, "downsample", keep=1.0)
    with torch.no_grad():
        out = model(**inp).logits
        gen = model.generate(**inp, **GEN)
    assert h.stats.visual_tokens_per_image == [16, 16]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert torch.equal(gen, gref)
    h.remove()
    assert no_vtprune_hooks(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inp).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("vision", ["clip", "siglip", "dinov2"])
def test_each_token_takes_its_cells_top_left_placeholder(vision):
    from vtprune.adapters import get_adapter
    from vtprune.policy import Context

    model, inp = _inputs(vision, n=1)
    ad = get_adapter(model)
    with torch.no_grad():
        images, sched = ad.encode(dict(inp), {}, [D.Downsample(keep=9)], Context("llava"))
    assert images[0].n_placeholders == 16 and images[0].num_tokens == 9
    assert images[0].placeholder_index.tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]  # 4 -> 3: rows/cols 0, 1, 2
    assert images[0].grid_shapes == [(3, 3)]
    assert sched == [[9 + (0 if vision == "siglip" else 1)] * 3]


@pytest.mark.parametrize("tower", ["llava", "llava_dinov2"])
def test_batch_equals_each_alone(tower):
    assert_batch_equals_alone(tower, "downsample", keep=0.25)


def test_composes_with_stage_v_merging_on_dinov2():
    """downsample then PiToMe inside the encoder: the merge runs on the smaller grid (5 -> 3 tokens)."""
    model, inp = _inputs("dinov2", n=1)
    with vtprune.patch(model, ["downsample:keep=4", "pitome:keep=3"]) as h, torch.no_grad():
        model(**inp)
    assert h.stats.vision_tokens_per_layer[0][0] == 5 and h.stats.visual_tokens_per_image == [3]


def test_tower_flops_follow_the_smaller_grid():
    model, inp = _inputs("dinov2")
    reports = {}
    for keep in (1.0, 0.25):
        with vtprune.patch(model, "downsample", keep=keep) as h, torch.no_grad():
            model(**inp)
        reports[keep] = vtprune.count_flops(model, h.stats.schedules[0])
    vc = model.config.vision_config
    c, m, patch_in = vc.hidden_size, int(vc.hidden_size * vc.mlp_ratio), 3 * vc.patch_size ** 2
    for keep, n in ((1.0, 17), (0.25, 5)):  # 3 layers of n tokens (CLS included) + the patch embedding
        layer = 4 * n * c * c + 2 * n * n * c + 2 * n * c * m
        assert reports[keep].vision_flops == 2 * (3 * layer + (n - 1) * patch_in * c)
    assert reports[0.25].projector_flops * 4 == reports[1.0].projector_flops
    assert reports[0.25].llm_prefill_flops < reports[1.0].llm_prefill_flops


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "llava_onevision"])
def test_other_families_raise_naming_pool(family):
    model, _ = BUILDERS[family]()
    with pytest.raises(ValueError, match="downsample is defined for LLaVA-1.5.*use 'pool'"):
        vtprune.patch(model, "downsample")
    assert not hasattr(model, "_vtprune_patch")


@pytest.mark.parametrize("params,match", [
    ({"keep": 0}, "keep=0"), ({"keep": 1.5}, "keep=1.5"), ({"keep": 17}, "keep=17"), ({"mode": "box"}, "mode='box'"),
])
def test_bad_settings_leave_the_model_unpatched(params, match):
    model, _ = _model("clip")
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "downsample", **params)
    assert not hasattr(model, "_vtprune_patch")
