"""GlobalCom² policy on tiny models: LLaVA-NeXT (native AnyRes layout), LLaVA-1.5 (thumbnail-only
extension), Qwen2/2.5-VL (experimental region-adaptive variant, only with ``allow_experimental``).

Oracle (stage P): the unpatched model fed the explicitly shortened input, where the kept tokens are
computed independently of the adapter: CLS logits recomputed from the vision tower's
``hidden_states[-2]`` with the last layer's own norm and q/k projections (:func:`cls_logit_scores`),
the crop geometry from ``image_sizes`` with HF's grid shape and :func:`valid_region`, the selection by
:func:`globalcom2_select`, and the native token index of every kept (view, patch) derived from the
native layout (thumbnail raster, then each unpadded row followed by its newline). The oracle's kept
list is in emission order: with ``thumbnail_order="score"`` (the reference default) the thumbnail's
tokens come first in descending-score order, then the crop tokens and every newline in native order;
``shortened_inputs`` places the features in that order into the sorted kept placeholder columns.
"""
from __future__ import annotations

import pytest
import torch
from transformers.models.llava_next import modeling_llava_next as mln

import vtprune
from vtprune.methods import globalcom2 as GC

from helpers import GEN, assert_batch_equals_alone, batch, new_tokens
from oracles import image_features, last_logits, shortened_inputs

ATTN = ["sdpa", "eager"]


def cls_scores(model, pixel_values, probs: bool = False) -> torch.Tensor:
    """(V, N) head-mean CLS logits (or softmax probabilities) of the last CLIP layer, per view."""
    tower = model.model.vision_tower
    layer = getattr(tower, "vision_model", tower).encoder.layers[-1]
    hs = tower(pixel_values, output_hidden_states=True).hidden_states[-2]
    attn = layer.self_attn
    h = layer.layer_norm1(hs)
    v, n, _ = h.shape
    q = attn.q_proj(h[:, :1]).view(v, 1, attn.num_heads, -1).transpose(1, 2)
    k = attn.k_proj(h).view(v, n, attn.num_heads, -1).transpose(1, 2)
    if probs:
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1)
        return p.mean(1)[:, 0, 1:]
    return GC.cls_logit_scores(q[:, :, 0], k[:, :, 1:], attn.scale)


def next_oracle_kept(model, inp, r: float, probs: bool = False, order: str = "score"):
    """Kept native token indices of the single image of ``inp`` (LLaVA-NeXT) in emission order
    (thumbnail in ``order``, then crops and newlines ascending) and the expected count."""
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    size = inp["image_sizes"][0]
    n_views = mln.image_size_to_num_patches(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                                            patch_size=cfg.vision_config.image_size)
    scores = cls_scores(model, inp["pixel_values"][0, :n_views], probs)
    nph, npw = mln.get_anyres_image_grid_shape(size.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    valid = GC.valid_region(int(size[0]), int(size[1]), nph, npw, side, rounding="hf")
    sel = GC.globalcom2_select(scores[0], scores[1:], valid, r=r, tau=10.0, thumbnail_order=order)
    hw = side * side
    row_len = valid.W_u + 1  # kept tokens of a row, then its newline
    thumb = [int(p) for p in sel.thumbnail]
    kept = []
    for c, keep_c in enumerate(sel.crops):
        ci, cj = divmod(c, npw)
        for patch in GC.crop_valid_indices(valid, c)[keep_c].tolist():
            y, x = ci * side + patch // side, cj * side + patch % side
            kept.append(hw + (y - valid.top) * row_len + (x - valid.left))
    kept += [hw + y * row_len + valid.W_u for y in range(valid.H_u)]  # every newline
    n_visual = len(sel.thumbnail) + sum(sel.budgets)
    assert n_visual == int(hw * r) + sum(int(n * float(s)) for n, s in zip(valid.n_valid(), sel.scales))
    return torch.tensor(thumb + sorted(kept)), n_visual + valid.H_u


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("order", ["score", "raster"])
@pytest.mark.parametrize("image", [0, 1, 2], ids=["56x56-colpad", "70x112-rowpad", "112x84-colpad"])
def test_llava_next_equals_shortened_input(image, order, attn):
    model, inp = batch("llava_next", n=1, attn=attn, first=image)
    params = {} if order == "score" else {"thumbnail_order": order}  # score order is the default
    with vtprune.patch(model, "globalcom2", keep=0.5, **params) as h:
        with torch.no_grad():
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
    with torch.no_grad():
        kept, n_expected = next_oracle_kept(model, inp, 0.5, order=order)
        short = shortened_inputs(model, "llava_next", inp, [kept], positions="renumber")
        ref = model(**short).logits
        gref = model.generate(**short, **GEN)
    assert h.stats.visual_tokens_per_image == [n_expected] == [kept.numel()]
    assert h.stats.kept_index_per_image[0].tolist() == kept.tolist()
    k_g = int(16 * 0.5)
    thumb = kept[:k_g]
    assert bool((thumb < 16).all()) and bool((kept[k_g:] >= 16).all())
    if order == "raster":
        assert torch.equal(kept, torch.sort(kept).values)
    else:  # descending thumbnail score, the rest ascending
        assert not torch.equal(thumb, torch.sort(thumb).values)
        assert torch.equal(kept[k_g:], torch.sort(kept[k_g:]).values)
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert new_tokens(gen, inp["input_ids"].shape[1]) == new_tokens(gref, short["input_ids"].shape[1])


def test_llava_next_score_order_reaches_the_llm():
    """The features handed to the LLM are the thumbnail's kept tokens by descending score, then the
    crop tokens and newlines in native order (the reference sequence), in the sorted placeholder slots."""
    model, inp = batch("llava_next", n=1, first=1)
    cap = {}
    hk = model.model.register_forward_pre_hook(lambda m, a, k: cap.update(k), with_kwargs=True)
    try:
        with vtprune.patch(model, "globalcom2", keep=0.5), torch.no_grad():
            model(**inp)
    finally:
        hk.remove()
    with torch.no_grad():
        kept, _ = next_oracle_kept(model, inp, 0.5)
        feats = image_features(model, "llava_next", inp)[0]
        g = cls_scores(model, inp["pixel_values"][0, :1])[0]
    got = cap["mm_encoder_outputs"]["image"].pooler_output[0]
    torch.testing.assert_close(got, feats[kept])
    thumb_scores = g[kept[:8]]
    assert bool((thumb_scores[:-1] >= thumb_scores[1:]).all())


def test_llava_next_probability_scores():
    model, inp = batch("llava_next", n=1, first=1)
    with vtprune.patch(model, "globalcom2", keep=0.25, crop_score="probs") as h:
        with torch.no_grad():
            model(**inp)
    with torch.no_grad():
        kept, n_expected = next_oracle_kept(model, inp, 0.25, probs=True)
    assert h.stats.kept_index_per_image[0].tolist() == kept.tolist()
    assert h.stats.visual_tokens_per_image == [n_expected]


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("order", ["score", "raster"])
def test_llava_thumbnail_only_equals_shortened_input(order, attn):
    model, inp = batch("llava", n=1, attn=attn)
    with vtprune.patch(model, "globalcom2", keep=0.3, thumbnail_order=order, allow_single_view=True) as h:
        with torch.no_grad():
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
    with torch.no_grad():
        g = cls_scores(model, inp["pixel_values"])[0]
        kept = GC.select_thumbnail(g, 0.3, order=order)
        short = shortened_inputs(model, "llava", inp, [kept], positions="renumber")
        ref = model(**short).logits
        gref = model.generate(**short, **GEN)
    assert h.stats.visual_tokens_per_image == [int(16 * 0.3)] == [kept.numel()]
    assert h.stats.kept_index_per_image[0].tolist() == kept.tolist()
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert new_tokens(gen, inp["input_ids"].shape[1]) == new_tokens(gref, short["input_ids"].shape[1])


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_forced_keep_all_equals_unpatched(family, monkeypatch):
    """Spec recipe 6: every s_c forced to 1, thumbnail complete, raster order -> the unpatched model."""
    monkeypatch.setattr(GC, "crop_scales", lambda g, nph, npw, r=0.25, tau=10.0: torch.ones(nph * npw, dtype=torch.float64))
    model, inp = batch(family, n=2)
    with torch.no_grad():
        ref = model(**inp).logits
        gref = model.generate(**inp, **GEN)
        extra = {"allow_single_view": True} if family == "llava" else {}
        with vtprune.patch(model, "globalcom2", keep=1.0, thumbnail_order="raster", **extra) as h:
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
    assert h.stats.visual_tokens_per_image == h.stats.visual_tokens_in_per_image
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", ["llava_next", "llava"])
def test_batch_equals_each_alone(family, attn):
    extra = {"allow_single_view": True} if family == "llava" else {}
    assert_batch_equals_alone(family, "globalcom2", attn=attn, first=1, keep=0.25, **extra)


def test_single_view_model_is_a_clear_error_unless_opted_in():
    model, _ = batch("llava", n=1)
    with pytest.raises(ValueError, match="single view .*allow_single_view=True"):
        vtprune.patch(model, "globalcom2")
    assert not hasattr(model, "_vtprune_patch")


def test_score_order_is_the_default_and_declares_unsorted_output():
    pol = GC.GlobalCom2()
    assert pol.thumbnail_order == "score" and pol.sorted_output is False
    assert GC.GlobalCom2(thumbnail_order="raster").sorted_output is True
    assert GC.GlobalCom2.sorted_output is not False  # per instance, not a class-wide switch


# ------------------------------------------------------------------ Qwen (experimental)
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_needs_allow_experimental(family):
    model, _ = batch(family, n=1)
    with pytest.raises(ValueError, match="allow_experimental=True"):
        vtprune.patch(model, "globalcom2")
    assert not hasattr(model, "_vtprune_patch")


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_experimental_equals_shortened_input(family, attn):
    from vtprune.adapters import get_adapter

    model, inp = batch(family, n=1, attn=attn, first=1)  # a 4 x 2 merged grid
    params = dict(keep=0.5, allow_experimental=True, region_tokens=2)
    with vtprune.patch(model, "globalcom2", **params) as h:
        with torch.no_grad():
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
    adapter = get_adapter(model)
    name = f"vit_received@{adapter.full_attention_blocks()[-1]}"
    with torch.no_grad():
        images, _ = adapter.encode(dict(inp), {name: None}, [], None)
        g = images[0].signals[name].view(*images[0].grid_shapes[0])
        kept, scales = GC.region_adaptive_select(g, 0.5, 10.0, 2)
        short = shortened_inputs(model, family, inp, [kept], positions="original")
        ref = model(**short).logits
        gref = model.generate(**short, **GEN)
    assert scales.numel() == 2  # two virtual crops on the 4 x 2 grid
    assert h.stats.kept_index_per_image[0].tolist() == kept.tolist()
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert new_tokens(gen, inp["input_ids"].shape[1]) == new_tokens(gref, short["input_ids"].shape[1])


def test_qwen_experimental_batch_equals_each_alone():
    assert_batch_equals_alone("qwen2_vl", "globalcom2", attn="sdpa", first=1, keep=0.5, allow_experimental=True, region_tokens=2)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "params,match",
    [
        ({"thumbnail_order": "zigzag"}, "thumbnail_order='zigzag'"),
        ({"next_layout": "reference"}, "next_layout='reference'"),
        ({"keep": 64}, "retention ratio r, a float"),
        ({"keep": 1.5}, r"fraction outside \(0, 1\]"),
        ({"crop_score": "energy"}, "crop_score='energy'"),
        ({"tau": 0.0}, "tau=0.0"),
    ],
)
def test_bad_settings_raise(params, match):
    model, _ = batch("llava_next", n=1)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "globalcom2", **params)
    assert not hasattr(model, "_vtprune_patch")
