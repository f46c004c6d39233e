"""LLaVA-OneVision: the adapter's layout recovery, video and several images per sample, against the
hook layer's oracles (explicitly shortened input, masked keys, each sample alone)."""
from __future__ import annotations

import functools

import pytest
import torch

import vtprune
from vtprune.adapters import get_adapter
from vtprune.testing import make_inputs, tiny_images, tiny_llava_onevision, tiny_video

from oracles import last_logits, masked_run, shortened_inputs

FAMILY = "llava_onevision"
GEN = dict(max_new_tokens=8, do_sample=False)
SIZES = [(56, 56), (70, 112), (150, 160)]


@functools.lru_cache(maxsize=None)
def _model(attn: str = "sdpa"):
    return tiny_llava_onevision(attn_implementation=attn)


def anyres_batch(n: int = 3):
    """``n`` prompts with one AnyRes image each, of different sizes (the last one's canvas resized)."""
    model, proc = _model()
    return model, make_inputs(FAMILY, proc, ["what?", "a longer question here?", "and?"][:n], tiny_images(n, sizes=SIZES)[:n])


def mixed_batch(which=(0, 1, 2)):
    """Sample 0: two images (single view each); 1: a 4-frame video; 2: a video and an AnyRes image."""
    model, proc = _model()
    imgs = tiny_images(3, sizes=SIZES)
    rows = [("two images?", [imgs[0], imgs[1]], None), ("the video?", [], tiny_video(4, seed=1)),
            ("video and image, longer?", [imgs[2]], tiny_video(4, seed=2))]
    rows = [rows[i] for i in which]
    return model, make_inputs(FAMILY, proc, [r[0] for r in rows], [r[1] for r in rows], videos=[r[2] for r in rows])


def run(model, inp, spec, seed=0):
    with vtprune.patch(model, spec, seed=seed) as h, torch.no_grad():
        logits = model(**inp).logits[:, -1].float()
        gen = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
    return logits, gen, h.stats


# ------------------------------------------------------------------ layout recovery
def test_layout_matches_an_independent_encoder_run():
    """Every token whose layout says "patch p of view v" carries exactly the projected encoder output of
    that patch, and its signal is the patch's own; resized-canvas tokens have no single source."""
    model, inp = anyres_batch()
    ad = get_adapter(model)
    images, sched = ad.encode(dict(inp), {"vit_received@1": None}, [], None)
    tower = model.model.vision_tower
    with torch.no_grad():
        pv = torch.cat([inp["pixel_values"][i, : img.n_views] for i, img in enumerate(images)])
        proj = model.model.multi_modal_projector(tower(pv, output_hidden_states=True).hidden_states[-1])  # (views, 16, D)
    assert len(sched) == sum(img.n_views for img in images)
    view0, resized = 0, 0
    for img in images:
        src = img.source
        exact = src >= 0
        flat = proj[view0 : view0 + img.n_views].reshape(-1, proj.shape[-1])
        torch.testing.assert_close(img.features[exact], flat[src[exact]], rtol=1e-5, atol=1e-6)
        assert bool((img.view[img.candidate] >= 0).all()) and bool((img.view[~img.candidate] == -1).all())
        assert img.grid_shapes[0] == (4, 4) and int((img.view == 0).sum()) == 16  # the base view, no newline
        rows, cols = img.grid_shapes[1]
        assert int((img.view == 1).sum()) == rows * cols and int((~img.candidate).sum()) == rows  # a newline per row
        resized += int((img.candidate & ~exact).sum() > 0)
        view0 += img.n_views
    assert resized == 2  # the 70x112 and 150x160 canvases are resized (anyres_max_2), the 56x56 one is not


def test_signals_are_per_patch_and_cls_signals_are_refused():
    model, inp = anyres_batch(1)
    ad = get_adapter(model)
    captured = {}
    layer = ad.vit_layers()[1]
    hk = layer.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    images, _ = ad.encode(dict(inp), {"vit_received@1": None}, [], None)
    hk.remove()
    from vtprune.adapters.base import vit_qk
    from vtprune.attention import attention_probs, received_attention

    q, k, scale = vit_qk(layer, captured["x"])
    ref = received_attention(attention_probs(q, k, scale)).reshape(-1)  # (views * 16,)
    img = images[0]
    exact = img.source >= 0
    torch.testing.assert_close(img.signals["vit_received@1"][exact], ref[img.source[exact]])
    assert bool((img.signals["vit_received@1"][~img.candidate] == 0).all())
    with pytest.raises(ValueError, match="needs a CLS token.*vit_received"):
        ad.encode(dict(inp), {"vit_cls@1": None}, [], None)


# ------------------------------------------------------------------ several images and videos
def test_keep_all_equals_unpatched_with_videos_and_several_images():
    model, inp = mixed_batch()
    assert (inp["attention_mask"] == 0).any()
    with torch.no_grad():
        ref = model(**inp).logits[:, -1].float()
        gref = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
    logits, gen, stats = run(model, inp, "none")
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    # images then videos, as the model scatters them: 2 + 1 single-view/AnyRes images, 2 videos
    n_vid = int((inp["input_ids"] == model.config.video_token_id).sum())
    assert sum(stats.visual_tokens_in_per_image) == int((inp["input_ids"] == model.config.image_token_id).sum()) + n_vid
    assert stats.visual_tokens_per_image[-2:] == [4 * 4 + 1] * 2  # 4 frames x 2x2 pooled + 1 newline


@pytest.mark.parametrize("spec", ["random:keep=0.5", "random:keep=4,quota=frame", "pool:keep=0.25", "hiprune:keep=0.5",
                                  "hiprune:keep=8,quota=frame", "visionzip:keep=0.5", "todre:keep=0.5,relevance=off"])
def test_stage_p_with_videos_equals_shortened_input(spec):
    model, inp = mixed_batch()
    cap = {}

    def first_features(module, args, kwargs):  # the patched prefill's features
        if "mm" not in cap:
            cap["mm"] = kwargs["mm_encoder_outputs"]

    hk = model.model.register_forward_pre_hook(first_features, with_kwargs=True)
    try:
        logits, gen, stats = run(model, inp, spec, seed=3)
    finally:
        hk.remove()
    short = shortened_inputs(model, FAMILY, inp, stats.kept_index_per_image, positions="renumber")
    if spec.split(":")[0] in ("pool", "visionzip"):  # merged features: the patch's, through the slow path
        short["mm_encoder_outputs"] = cap["mm"]
    with torch.no_grad():
        ref = last_logits(model(**short).logits)
        gref = model.generate(**short, **GEN)[:, short["input_ids"].shape[1]:]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    assert all(o < i for o, i in zip(stats.visual_tokens_per_image, stats.visual_tokens_in_per_image))


def test_video_quota_frame_keeps_each_frames_share_and_video_ranks_jointly():
    model, inp = mixed_batch((1,))  # one video: 4 frames of 2x2 tokens + a newline
    frames = lambda stats: torch.div(stats.kept_index_per_image[0][:-1], 4, rounding_mode="floor")  # noqa: E731
    for spec in ("random:keep=0.5,quota=frame", "random:keep=4,quota=frame"):  # keep is the video's budget
        _, _, per_frame = run(model, inp, spec)
        assert torch.bincount(frames(per_frame), minlength=4).tolist() == ([2] * 4 if "0.5" in spec else [1] * 4)
    counts = set()
    for seed in range(6):  # quota="video" (default): 8 of 16 drawn jointly, frames get different shares
        _, _, joint = run(model, inp, "random:keep=0.5", seed=seed)
        assert joint.visual_tokens_per_image == [8 + 1]
        counts.add(tuple(torch.bincount(frames(joint), minlength=4).tolist()))
    assert any(c != (2, 2, 2, 2) for c in counts)
    with pytest.raises(ValueError, match="quota='clip'; choose one of"):
        vtprune.patch(model, "random:quota=clip")
    with pytest.raises(ValueError, match="keep=3 cannot give each of the 4 frames a token"):
        run(model, inp, "random:keep=3,quota=frame")


@pytest.mark.parametrize("spec,layer", [("fastv:layer=2,keep=0.5", 2), ("random:at=D,layer=1,keep=0.3", 1)])
def test_stage_d_with_videos_equals_mask_run(spec, layer):
    model, inp = mixed_batch()
    logits, gen, stats = run(model, inp, spec, seed=5)
    kept = stats.llm_kept_index
    keep = torch.zeros_like(inp["attention_mask"], dtype=torch.bool)
    for b in range(kept.shape[0]):
        keep[b, kept[b][kept[b] >= 0]] = True
    assert all(s.visual_tokens_per_layer[layer] < s.visual_tokens_per_layer[0] for s in stats.schedules)
    with masked_run(model, layer, keep), torch.no_grad():
        ref = last_logits(model(**inp).logits)
        gref = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


@pytest.mark.parametrize("spec", ["hiprune:keep=0.5", "fastv:layer=2,keep=0.5", "pitome-p:keep=0.5,quota=frame"])
def test_mixed_batch_equals_each_sample_alone(spec):
    model, inp = mixed_batch()
    logits, gen, stats = run(model, inp, spec, seed=1)
    k = 0
    for i in range(3):
        _, one = mixed_batch((i,))
        l1, g1, s1 = run(model, one, spec, seed=1)
        torch.testing.assert_close(logits[i : i + 1], l1, rtol=1e-4, atol=1e-5)
        assert gen[i].tolist() == g1[0].tolist()
        assert s1.schedules[0].visual_tokens_per_layer == stats.schedules[i].visual_tokens_per_layer
        k += len(s1.visual_tokens_per_image)
    assert k == len(stats.visual_tokens_per_image)


def test_stats_and_flops_count_video_tokens():
    from vtprune.flops import count_flops

    model, inp = mixed_batch((1,))
    _, _, full = run(model, inp, "none")
    _, _, pruned = run(model, inp, "random:keep=0.5")
    s, p = full.schedules[0], pruned.schedules[0]
    n_vid = int((inp["input_ids"] == model.config.video_token_id).sum())
    assert s.visual_tokens_in == n_vid == 17 and s.visual_tokens_per_layer == [17] * 4
    assert p.visual_tokens_in == 17 and p.visual_tokens_per_layer == [9] * 4
    assert s.vision_tokens_per_layer == [[16] * 3] * 4  # one SigLIP view of 16 patches per frame
    assert s.projector_tokens == 4 * 16
    a, b = count_flops(model, s), count_flops(model, p)
    assert a.vision_flops == b.vision_flops > 0 and a.projector_flops > 0
    assert b.llm_prefill_flops < a.llm_prefill_flops


def test_methods_without_their_signals_raise_naming_the_alternative():
    model, _ = anyres_batch(1)
    for spec, match in [("pitome", "SigLIP.*pitome-p"), ("globalcom2", "no CLS token.*hiprune or visionzip"),
                        ("todre:pivot=cls", "pivot='farthest'"), ("hiprune:score=cls", "score='received'"),
                        ("random:at=V,layer=0", "supported families: llava")]:
        with pytest.raises(ValueError, match=match):
            vtprune.patch(model, spec)
        assert not hasattr(model, "_vtprune_patch")


# ------------------------------------------------------------------ several images on LLaVA-1.5 and NeXT
@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("spec", ["random:keep=0.5", "fastv:layer=2,keep=0.5"])
def test_several_images_per_prompt(family, spec):
    """Two ``<image>`` in one prompt (NeXT: AnyRes images of different sizes) next to a one-image
    prompt: per-image quotas at stage P, oracles, and the batch == each sample alone."""
    from vtprune.testing import BUILDERS

    model, proc = BUILDERS[family]()
    sizes = None if family == "llava" else [(70, 112), (112, 84), (56, 56)]
    imgs = tiny_images(3, sizes=sizes)
    rows = [("two pictures?", [imgs[0], imgs[1]]), ("one, with a longer question?", [imgs[2]])]
    inp = make_inputs(family, proc, [r[0] for r in rows], [r[1] for r in rows])
    logits, gen, stats = run(model, inp, spec, seed=2)
    if spec.startswith("random"):  # every image keeps half of its own candidates (newlines kept)
        images, _ = get_adapter(model).encode(dict(inp), {}, [], None)
        assert len(images) == 3 and stats.visual_tokens_per_image == [
            round(im.num_candidates / 2) + im.num_tokens - im.num_candidates for im in images]
        short = shortened_inputs(model, family, inp, stats.kept_index_per_image, positions="renumber")
        ctx = None
    else:
        kept = stats.llm_kept_index
        keep = torch.zeros_like(inp["attention_mask"], dtype=torch.bool)
        for b in range(kept.shape[0]):
            keep[b, kept[b][kept[b] >= 0]] = True
        short, ctx = dict(inp), masked_run(model, 2, keep)
    with torch.no_grad():
        if ctx is not None:
            ctx.__enter__()
        try:
            ref = last_logits(model(**short).logits)
            gref = model.generate(**short, **GEN)[:, short["input_ids"].shape[1]:]
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    for i, r in enumerate(rows):
        one = make_inputs(family, proc, [r[0]], [r[1]])
        l1, g1, _ = run(model, one, spec, seed=2)
        torch.testing.assert_close(logits[i : i + 1], l1, rtol=1e-4, atol=1e-5)
        assert gen[i].tolist() == g1[0].tolist()


@pytest.mark.parametrize("family", ["llava_onevision", "llava_onevision1_5"])
def test_demo_runs_on_the_family(family, capsys):
    from vtprune.eval.cli import main

    assert main(["demo", "--family", family, "--new-tokens", "3", "--methods", "none", "random:keep=0.5"]) == 0
    out = capsys.readouterr().out
    assert f"tiny random {family}" in out and "random:keep=0.5" in out
    assert out.splitlines()[2].split()[-2] == "True"  # "none" generates the vanilla ids
