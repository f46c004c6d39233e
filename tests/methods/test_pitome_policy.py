"""PiToMe policies on tiny models: stage V inside the CLIP and DINOv2 towers of LLaVA-1.5 and of an
open_clip ``VisionTransformer``, stage P (post-merger) on LLaVA-1.5 / Qwen2-VL / Qwen2.5-VL.

Oracles: stage V == running the encoder layers by hand with the pure kernels applied after each
layer, the tokens then in the kernels' own order (``order="reference"``, the default) or sorted by the
smallest original index they contain (``order="source"``, :func:`source_order`), fed to the unpatched
LLM as an explicitly shortened input: the features in that order in the sorted kept placeholder
columns, each token at the placeholder of the smallest original patch it contains;
stage P == the unpatched model fed the explicitly shortened input with the kernel's merged tokens.
"""
from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune
from vtprune.methods import pitome as P

from helpers import GEN, assert_batch_equals_alone, batch, new_tokens, no_vtprune_hooks
from oracles import image_features, last_logits, shortened_inputs

ATTN = ["sdpa", "eager"]
#: the LLaVA-1.5 builders whose towers run stage V: CLIP (feature layer -2) and DINOv2 (-1, layer scale)
TOWERS = ["llava", "llava_dinov2"]


# ------------------------------------------------------------------ stage V (LLaVA-1.5 CLIP / DINOv2)
def explicit_stage_v(model, inp, *, ratio=None, keep=None, bsm_layers=(0,), mode="mean", prop_attn=False,
                     order="reference"):
    """Run the tiny tower (3 layers; CLIP: ``pre_layrnorm(embeddings)``, feature layer 1; DINOv2:
    ``embeddings`` with its CLS token, feature layer 2) by hand, its own layers one by one with the
    kernels after each layer.

    Returns (projected features per image, kept placeholder indices per image (in the features'
    order), per-layer counts).
    """
    tower = model.model.vision_tower
    dino = model.config.vision_config.model_type == "dinov2"
    layers = tower.encoder.layer if dino else tower.encoder.layers
    depth = len(layers)
    last = model.config.vision_feature_layer % depth
    assert last == (2 if dino else 1)
    margins = P.default_margins("llava", depth)
    emb = tower.embeddings(inp["pixel_values"])
    x = emb if dino else tower.pre_layrnorm(emb)
    v, n, _ = x.shape
    if keep is None:
        plan = P.reference_schedule(ratio, n, depth, last, bsm_layers=bsm_layers, margin=margins)
    else:
        plan = P.budget_schedule(keep, n, depth, last, bsm_layers=bsm_layers, margin=margins)
    sources = P.init_sources(v, n)
    sizes = torch.ones(v, n) if (mode == "wavg" or prop_attn) else None
    counts = []
    for l in range(last + 1):
        counts.append(x.shape[1])
        bias = None if (sizes is None or not prop_attn or l == 0) else torch.log(sizes)[:, None, None, :]
        x = layers[l](x, attention_mask=bias)
        step = plan[l]
        if step.algorithm == "bsm":
            res = P.bsm_merge(x, x, step.r, sizes=sizes, mode=mode, sources=sources)
        else:
            res = P.pitome_merge(x, x, step.r, step.margin, sizes=sizes, mode=mode, sources=sources)
        x, sizes, sources = res.x, res.sizes, res.sources
    if order == "source":
        perm = P.source_order(sources)
        x, sources = P.apply_order(x, perm), P.apply_order(sources, perm)
    first = (sources > 0).to(torch.uint8).argmax(-1)  # smallest original index of each token
    assert bool((first[:, 0] == 0).all())  # the CLS token stays first
    feats = model.model.multi_modal_projector(x[:, 1:])
    return list(feats), [f[1:] - 1 for f in first], counts


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("order", ["reference", "source"])
@pytest.mark.parametrize(
    "params",
    [dict(ratio=0.8, bsm_layers=1), dict(ratio=0.7, bsm_layers=0), dict(keep=5, bsm_layers=1),
     dict(ratio=0.8, bsm_layers=1, mode="wavg", prop_attn=True)],
    ids=["bsm+pitome", "pitome-only", "budget", "wavg+prop_attn"],
)
@pytest.mark.parametrize("tower", TOWERS)
def test_stage_v_equals_explicit_encoder_run(tower, attn, order, params):
    model, inp = batch(tower, n=1, attn=attn)
    extra = {} if order == "reference" else {"order": order}  # reference order is the default
    with vtprune.patch(model, "pitome", **params, **extra) as h:
        with torch.no_grad():
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
    kw = dict(params)
    bsm = tuple(range(kw.pop("bsm_layers")))
    with torch.no_grad():
        feats, kept, counts = explicit_stage_v(model, inp, bsm_layers=bsm, order=order, **kw)
    # every token has its own placeholder slot; the reference order is not the sorted one
    assert kept[0].unique().numel() == kept[0].numel()
    if order == "source":
        assert torch.equal(kept[0], kept[0].sort().values)
    else:
        assert not torch.equal(kept[0], kept[0].sort().values)
    with torch.no_grad():
        short = shortened_inputs(model, "llava", inp, kept, positions="renumber")
        short["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
        ref = model(**short).logits
        gref = model.generate(**short, **GEN)
    assert h.stats.visual_tokens_per_image == [feats[0].shape[0]]
    if "keep" in params:
        assert h.stats.visual_tokens_per_image == [params["keep"]]
    assert h.stats.vision_tokens_per_layer == [counts]
    assert out.shape[1] == short["input_ids"].shape[1]
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert new_tokens(gen, inp["input_ids"].shape[1]) == new_tokens(gref, short["input_ids"].shape[1])


def test_stage_v_counts_follow_the_kernel_schedule():
    model, inp = batch("llava", n=2)
    for params, expect in [(dict(ratio=0.8, bsm_layers=1), 11), (dict(keep=7), 7), (dict(keep=0.5), 8)]:
        with vtprune.patch(model, "pitome", **params) as h:
            with torch.no_grad():
                model(**inp)
        assert h.stats.visual_tokens_per_image == [expect, expect]
    # default schedule on the 3-layer tower: BSM in the first round(13*3/24) = 2 layers
    plan = P.reference_schedule(0.8, 17, 3, 1, bsm_layers=P.default_bsm_layers("llava", 3),
                                margin=P.default_margins("llava", 3))
    with vtprune.patch(model, "pitome", ratio=0.8) as h:
        with torch.no_grad():
            model(**inp)
    assert [s.algorithm for s in plan] == ["bsm", "bsm"]
    assert h.stats.vision_tokens_per_layer == [P.schedule_counts(plan, 17)[:-1]] * 2
    assert h.stats.visual_tokens_per_image == [P.schedule_counts(plan, 17)[-1] - 1] * 2


def test_default_schedule_is_the_reference_on_24_layers():
    assert P.default_bsm_layers("llava", 24) == tuple(range(13))
    assert P.default_margins("llava", 24) == tuple(P.reference_margin(l, 24) for l in range(24))
    assert P.default_bsm_layers("llava", 3) == (0, 1)
    assert P.default_bsm_layers("clip_vit", 12) == ()
    assert P.default_margins("clip_vit", 12)[6] == pytest.approx(0.95 - 0.95 * 6 / 12)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("tower", TOWERS)
def test_stage_v_ratio_one_equals_unpatched(tower, attn):
    model, inp = batch(tower, n=2, attn=attn)
    with torch.no_grad():
        ref = model(**inp).logits
        gref = model.generate(**inp, **GEN)
        with vtprune.patch(model, "pitome", ratio=1.0) as h:
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
    assert h.stats.visual_tokens_per_image == [16, 16]
    assert h.stats.vision_tokens_per_layer == [[17] * (model.config.vision_feature_layer % 3 + 1)] * 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("order", ["reference", "source"])
@pytest.mark.parametrize("tower", TOWERS)
def test_stage_v_batch_equals_each_alone(tower, attn, order):
    assert_batch_equals_alone(tower, "pitome", attn=attn, first=1, ratio=0.8, bsm_layers=1, order=order)


def test_stage_v_on_dinov2_merges_and_remove_restores():
    """DINOv2 tower: merging changes the logits, the tokens shrink layer by layer, and after remove()
    the model is the unpatched one again (same logits, no hook or attribute left)."""
    model, inp = batch("llava_dinov2", n=2)
    with torch.no_grad():
        ref = model(**inp).logits
    h = vtprune.patch(model, "pitome", keep=4)
    with torch.no_grad():
        out = model(**inp).logits
    assert h.stats.visual_tokens_per_image == [4, 4]
    counts = h.stats.vision_tokens_per_layer[0]
    assert counts[0] == 17 and all(b < a for a, b in zip(counts, counts[1:]))
    assert out.shape[1] == ref.shape[1] - 12  # 16 -> 4 visual tokens in each sample
    h.remove()
    assert no_vtprune_hooks(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inp).logits, ref, rtol=0, atol=0)


def test_stage_v_features_reach_the_llm_in_kernel_order():
    """order="reference": the LLM receives the encoder's merged tokens in the kernels' order (CLS
    dropped), not re-sorted by placeholder; order="source" sorts them."""
    model, inp = batch("llava", n=2)
    got = {}
    for order in ("reference", "source"):
        cap = {}
        hk = model.model.register_forward_pre_hook(lambda m, a, k: cap.update(k), with_kwargs=True)
        try:
            with vtprune.patch(model, "pitome", ratio=0.8, bsm_layers=1, order=order) as h, torch.no_grad():
                model(**inp)
        finally:
            hk.remove()
        got[order] = cap["mm_encoder_outputs"]["image"].pooler_output
        assert h.policies[0].sorted_output is (order == "source")
        with torch.no_grad():
            feats, _, _ = explicit_stage_v(model, inp, ratio=0.8, bsm_layers=(0,), order=order)
        for g, f in zip(got[order], feats):
            torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got["reference"][0], got["source"][0])
    assert P.PiToMe().order == "reference"


# ------------------------------------------------------------------ stage P (post-merger)
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl"])
def test_stage_p_equals_shortened_input(family, attn):
    model, inp = batch(family, n=1, attn=attn, first=1)
    keep = 5 if family == "llava" else 3
    with vtprune.patch(model, "pitome-p", keep=keep) as h:
        with torch.no_grad():
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
    with torch.no_grad():
        feats = image_features(model, family, inp)
        merged = [P.post_merger_merge(f, keep) for f in feats]
        kept = [rep for _, rep in merged]
        short = shortened_inputs(model, family, inp, kept,
                                 positions="original" if family.startswith("qwen") else "renumber")
        short["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[t for t, _ in merged])}
        ref = model(**short).logits
        gref = model.generate(**short, **GEN)
    assert h.stats.visual_tokens_per_image == [keep]
    assert [k.tolist() for k in h.stats.kept_index_per_image] == [k.tolist() for k in kept]
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert new_tokens(gen, inp["input_ids"].shape[1]) == new_tokens(gref, short["input_ids"].shape[1])


def test_stage_p_dispatch_from_pitome():
    pol = vtprune.registry.build("pitome", {"at": "P", "keep": 4})
    assert isinstance(pol, P.PiToMePost) and pol.keep == 4 and pol.stage == "P"
    with pytest.raises(ValueError, match="stage= is now called at="):  # the old spelling, refused clearly
        vtprune.registry.build("pitome", {"stage": "P", "keep": 4})
    assert isinstance(vtprune.registry.build("pitome", {}), P.PiToMe)
    model, inp = batch("llava", n=1)
    with vtprune.patch(model, "pitome:at=P,keep=4") as h:
        with torch.no_grad():
            model(**inp)
    assert h.stats.visual_tokens_per_image == [4]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_stage_p_batch_equals_each_alone(family):
    assert_batch_equals_alone(family, "pitome-p", attn="sdpa", first=1, keep=0.5)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "family,method,params,match",
    [
        ("qwen2_vl", "pitome", {}, "not supported on 'qwen2_vl'.*at='P'"),
        ("qwen2_5_vl", "pitome", {}, "not supported on 'qwen2_5_vl'.*at='P'"),
        ("llava_next", "pitome", {}, "not supported on 'llava_next'"),
        ("llava_next", "pitome-p", {}, "LLaVA-NeXT is not supported"),
        ("llava", "pitome", {"at": "X"}, "choose 'V'"),
        ("llava", "pitome", {"at": "P", "ratio": 0.9}, "keep and mode only"),
        ("llava", "pitome", {"ratio": 0}, "ratio=0 must be a float > 0"),
        ("llava", "pitome", {"mode": "max"}, "mode='max'"),
        ("llava", "pitome", {"keep": 1.5}, "fraction outside"),
        ("llava", "pitome", {"bsm_layers": -1}, "bsm_layers=-1"),
        ("llava", "pitome", {"order": "raster"}, "order='raster'"),
    ],
)
def test_unsupported_settings_raise(family, method, params, match):
    model, _ = batch(family, n=1)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, method, **params)
    assert not hasattr(model, "_vtprune_patch")


@pytest.mark.parametrize("spec", ["pitome", "random:at=V"])
def test_siglip_tower_raises_naming_the_alternative(spec):
    from vtprune.testing import tiny_llava

    model, _ = tiny_llava(vision="siglip")
    with pytest.raises(ValueError, match="clip_vision_model and dinov2 .*'siglip_vision_model'.*pitome-p"):
        vtprune.patch(model, spec)
    assert not hasattr(model, "_vtprune_patch")


# ------------------------------------------------------------------ open_clip VisionTransformer
@pytest.fixture(scope="module")
def open_clip_visual():
    pytest.importorskip("open_clip")
    from vtprune.testing import tiny_open_clip

    model, _ = tiny_open_clip()
    visual = model.visual.eval()
    return visual, torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))


def _open_clip_by_hand(visual, pixels, ratio, prop_attn=False, mode="mean", order="reference"):
    blocks = visual.transformer.resblocks
    depth = len(blocks)
    x = visual._embeds(pixels)
    v, n, _ = x.shape
    plan = P.reference_schedule(ratio, n, depth, depth - 1, bsm_layers=(), margin=P.default_margins("clip_vit", depth))
    sources, sizes = P.init_sources(v, n), (torch.ones(v, n) if (prop_attn or mode == "wavg") else None)
    for l, blk in enumerate(blocks):
        mask = None
        if prop_attn and l > 0:
            h = blk.attn.num_heads
            m = x.shape[1]
            mask = torch.log(sizes)[:, None, None, :].expand(v, h, m, m).reshape(v * h, m, m)
        x = blk(x, attn_mask=mask)
        step = plan[l]
        res = P.pitome_merge(x, x, step.r, step.margin, sizes=sizes, mode=mode, sources=sources)
        x, sizes, sources = res.x, res.sizes, res.sources
    if order == "source":
        x = P.apply_order(x, P.source_order(sources))
    pooled, tokens = visual._pool(x)
    return pooled @ visual.proj, tokens


def test_open_clip_ratio_one_equals_unpatched(open_clip_visual):
    visual, pixels = open_clip_visual
    with torch.no_grad():
        ref = visual(pixels)
        with vtprune.patch(visual, "pitome", ratio=1.0) as h:
            out = visual(pixels)
    assert torch.equal(out, ref)
    assert h.stats.vision_tokens_per_layer == [[50] * 4] * 2


@pytest.mark.parametrize("params", [dict(ratio=0.9), dict(ratio=0.85, mode="wavg", prop_attn=True),
                                    dict(ratio=0.9, order="source")],
                         ids=["mean", "wavg+prop_attn", "source-order"])
def test_open_clip_merging_equals_kernel_steps(open_clip_visual, params):
    visual, pixels = open_clip_visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            with vtprune.patch(visual, "pitome", **params) as h:
                pooled, tokens = visual(pixels)
            ref_pooled, ref_tokens = _open_clip_by_hand(visual, pixels, **params)
    finally:
        visual.output_tokens = False
    assert tokens.shape == ref_tokens.shape and tokens.shape[1] < 49
    assert h.stats.visual_tokens_per_image == [tokens.shape[1]] * 2
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-5, atol=1e-6)
    # remove() leaves no hook behind
    mods = [visual, *visual.transformer.resblocks]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in mods)
    assert not hasattr(visual, "_vtprune_patch")


def test_open_clip_budget_mode_and_errors(open_clip_visual):
    visual, pixels = open_clip_visual
    with torch.no_grad(), vtprune.patch(visual, "pitome", keep=10) as h:
        visual(pixels)
    assert h.stats.visual_tokens_per_image == [10, 10]
    with pytest.raises(ValueError, match="does not support model family 'clip_vit'"):
        vtprune.patch(visual, "fastv")
    with pytest.raises(ValueError, match="open_clip VisionTransformer"):
        vtprune.patch(torch.nn.Linear(2, 2), "pitome")
