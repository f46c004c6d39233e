"""LLaVA-OneVision-1.5 (RICE-ViT with a CLS token per frame + Qwen3 with 1-D positions): the vision
signal against the tower's own eager attention, videos and several images against the oracles."""
from __future__ import annotations

import functools

import pytest
import torch

import vtprune
from vtprune.adapters import get_adapter
from vtprune.testing import make_inputs, tiny_images, tiny_llava_onevision1_5, tiny_video

from oracles import last_logits, masked_run, shortened_inputs

FAMILY = "llava_onevision1_5"
GEN = dict(max_new_tokens=8, do_sample=False)


@functools.lru_cache(maxsize=None)
def _model(attn: str = "sdpa"):
    return tiny_llava_onevision1_5(attn_implementation=attn)


def mixed_batch(which=(0, 1, 2), attn: str = "sdpa"):
    """Sample 0: two images; 1: a 4-frame video; 2: a video and an image (left padded)."""
    model, proc = _model(attn)
    imgs = tiny_images(3, sizes=[(70, 112), (56, 56), (112, 84)])
    rows = [("two images?", [imgs[0], imgs[1]], None), ("the video?", [], tiny_video(4, seed=1)),
            ("video and image, longer?", [imgs[2]], tiny_video(4, seed=2))]
    rows = [rows[i] for i in which]
    return model, make_inputs(FAMILY, proc, [r[0] for r in rows], [r[1] for r in rows], videos=[r[2] for r in rows])


def run(model, inp, spec, seed=0):
    with vtprune.patch(model, spec, seed=seed) as h, torch.no_grad():
        logits = model(**inp).logits[:, -1].float()
        gen = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
    return logits, gen, h.stats


def test_received_attention_equals_the_towers_eager_attention(monkeypatch):
    """``vit_received@b`` == the eager attention maps of block b (per frame: head mean, sum over all
    queries, the frame's CLS key dropped, mean over each 2x2 merge unit), under SDPA."""
    from transformers.models.llava_onevision1_5 import modeling_llava_onevision1_5 as mod

    model, inp = mixed_batch((0,), attn="eager")
    maps = []
    eager = mod.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = eager(module, *args, **kwargs)
        if module is model.model.visual.blocks[1].attn:
            maps.append(weights[0].float())  # (H, T, T) of one frame
        return out, weights

    monkeypatch.setattr(mod, "eager_attention_forward", recording)
    with torch.no_grad():
        model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    monkeypatch.undo()
    ref = torch.cat([m.mean(0).sum(0)[1:] for m in maps]).view(-1, 4).mean(-1)
    sdpa, _ = _model()
    images, _ = get_adapter(sdpa).encode(dict(inp), {"vit_received@1": None}, [], None)
    got = torch.cat([im.signals["vit_received@1"] for im in images])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_keep_all_equals_unpatched_with_videos_and_several_images():
    model, inp = mixed_batch()
    with torch.no_grad():
        ref = model(**inp).logits[:, -1].float()
        gref = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
    logits, gen, stats = run(model, inp, "none")
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    assert len(stats.visual_tokens_per_image) == 5  # 3 images, then 2 videos
    assert [len(s.vision_tokens_per_layer) for s in stats.schedules] == [2, 4, 5]  # a view per image / frame


@pytest.mark.parametrize("spec,positions", [("random:keep=0.5", "renumber"), ("hiprune:keep=0.5,quota=frame", "renumber"),
                                            ("random:keep=0.5,positions=original", "original")])
def test_stage_p_equals_shortened_input(spec, positions):
    model, inp = mixed_batch()
    logits, gen, stats = run(model, inp, spec, seed=3)
    short = shortened_inputs(model, FAMILY, inp, stats.kept_index_per_image, positions=positions)
    with torch.no_grad():
        ref = last_logits(model(**short).logits)
        gref = model.generate(**short, **GEN)[:, short["input_ids"].shape[1]:]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


def test_stage_d_equals_mask_run_and_batch_equals_alone():
    model, inp = mixed_batch()
    logits, gen, stats = run(model, inp, "fastv:layer=2,keep=0.5")
    kept = stats.llm_kept_index
    keep = torch.zeros_like(inp["attention_mask"], dtype=torch.bool)
    for b in range(kept.shape[0]):
        keep[b, kept[b][kept[b] >= 0]] = True
    with masked_run(model, 2, keep), torch.no_grad():
        ref = last_logits(model(**inp).logits)
        gref = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    for i in range(3):
        _, one = mixed_batch((i,))
        l1, g1, _ = run(model, one, "fastv:layer=2,keep=0.5")
        torch.testing.assert_close(logits[i : i + 1], l1, rtol=1e-4, atol=1e-5)
        assert gen[i].tolist() == g1[0].tolist()
