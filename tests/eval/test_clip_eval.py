"""eval/clip_eval.py: vision FLOPs of open_clip ViTs against FlopCounterMode, zero-shot classification
and image-text retrieval on tiny local benchmarks with a tiny random open_clip model (no download)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils import flop_counter

import vtprune
from vtprune.testing import tiny_open_clip
from vtprune.eval.benchmarks import load_benchmark
from vtprune.eval.clip_eval import default_preprocess, retrieval, sweep_clip, vision_flops, zero_shot

open_clip = pytest.importorskip("open_clip")
torch.set_num_threads(1)

# open_clip blocks use nn.MultiheadAttention, which in eval/no-grad takes the fused fast path
# (aten._native_multi_head_attention); torch has no flop formula for it, so attention would be missing.
# CPU SDPA (the slow MHA path) has none either. Registered for this module only (removed afterwards).
_MHA = torch.ops.aten._native_multi_head_attention
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _mha_flop(query, key, value, embed_dim, num_head, *args, out_shape=None, **kwargs):
    b, n, e = query
    s = key[1]
    macs = b * (n * e * e + 2 * s * e * e      # q, k, v projections
                + 2 * n * s * e                  # scores and weighted sum
                + n * e * e)                     # output projection
    return 2 * macs


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


@pytest.fixture(scope="module", autouse=True)
def _flop_formulas():
    added = [op for op in (_MHA, _CPU_SDPA) if op not in flop_counter.flop_registry]
    if _MHA in added:
        flop_counter.register_flop_formula(_MHA)(_mha_flop)
    if _CPU_SDPA in added:
        flop_counter.register_flop_formula(_CPU_SDPA)(_cpu_sdpa_flop)
    yield
    for op in added:
        flop_counter.flop_registry.pop(op, None)


def measured(fn, parts: bool = False):
    with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_flop_counts() if parts else fc.get_total_flops()


def encoder_part(counts) -> int:
    """FLOPs counted inside the patch embedding and the blocks' attention and MLP modules (not the
    merging, which runs in the blocks' forward hooks)."""
    keys = [k for k in counts if k == "VisionTransformer.conv1"
            or k.rsplit(".", 1)[-1] in ("attn", "mlp") and ".resblocks." in k]
    return sum(sum(counts[k].values()) for k in keys)


@pytest.fixture(scope="module")
def clip():
    return tiny_open_clip()


def _png(path, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    for c, name in enumerate(["cat", "dog", "bird"]):
        (root / name).mkdir()
        for i in range(2):
            _png(root / name / f"{i}.png", 10 * c + i)
    return load_benchmark("imagefolder", root)


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
    root = tmp_path_factory.mktemp("karpathy")
    (root / "images").mkdir()
    caps = [["a red car", "a car on a road"], ["a dog running", "a brown dog"],
            ["two birds", "a bird on a branch"], ["a bowl of fruit", "apples and pears"]]
    images = []
    for i, c in enumerate(caps):
        _png(root / "images" / f"im{i}.png", 100 + i)
        images.append({"filename": f"im{i}.png", "imgid": i, "split": "test",
                       "sentences": [{"raw": t} for t in c]})
    (root / "dataset_tiny.json").write_text(json.dumps({"images": images}))
    return load_benchmark("retrieval", root / "dataset_tiny.json")


def _by_hand_flops(visual, counts):
    """FlopCounterMode of the patch embedding plus each block run alone on ``counts[l]`` tokens."""
    c = visual.transformer.width
    pix = torch.randn(1, 3, *visual.image_size)
    total = measured(lambda: visual.conv1(pix))
    for blk, n in zip(visual.transformer.resblocks, counts):
        total += measured(lambda blk=blk, n=n: blk(torch.randn(1, n, c)))
    return total


# ------------------------------------------------------------------------------------------ FLOPs
def test_vision_flops_unpatched_matches_flop_counter(clip):
    visual = clip[0].visual
    x = torch.randn(2, 3, 56, 56)
    parts = measured(lambda: visual(x), parts=True)
    counted = sum(parts["Global"].values()) / 2  # per image
    expected = vision_flops(visual, [50] * 4)
    assert abs(counted - expected) <= 0.01 * expected, (counted, expected)
    assert parts["Global"].get(_MHA, 0) > 0  # the attention term is really counted, not silently missing
    assert abs(_by_hand_flops(visual, [50] * 4) - expected) <= 0.01 * expected


def test_vision_flops_patched_pitome_matches_flop_counter(clip):
    visual = clip[0].visual
    x = torch.randn(2, 3, 56, 56)
    with vtprune.patch(visual, "pitome", ratio=0.8) as h:
        parts = measured(lambda: visual(x), parts=True)
    patched = sum(parts["Global"].values()) / 2
    counts = h.stats.vision_tokens_per_layer
    assert len(counts) == 2 and counts[0] == counts[1]
    assert counts[0][0] == 50 and counts[0][-1] < 50 and counts[0] == sorted(counts[0], reverse=True)
    expected = vision_flops(visual, counts[0])
    assert expected < vision_flops(visual, [50] * 4)
    # the blocks at the recorded token counts cost exactly the formula
    assert abs(_by_hand_flops(visual, counts[0]) - expected) <= 0.01 * expected
    # the patched run: its patch embedding + attention + MLP FLOPs are the formula's
    assert abs(encoder_part(parts) / 2 - expected) <= 0.01 * expected, (encoder_part(parts) / 2, expected)
    # the whole run also counts the merging itself (token similarities), which the formula leaves out
    assert expected < patched < 1.25 * expected


# ---------------------------------------------------------------------------------- benchmarks
def _manual(model, tok, bench, texts):
    pre = default_preprocess(model.visual)
    with torch.no_grad():
        img = model.encode_image(torch.stack([pre(s.load_image()) for s in bench.samples]))
        txt = model.encode_text(tok(texts))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return img @ txt.T


def test_zero_shot_none_equals_manual(clip, folder):
    model, tok = clip
    r = zero_shot(model, tok, folder, batch_size=4)
    for k in ("top1", "primary", "n", "gflops", "tokens_out", "method"):
        assert k in r
    assert "top5" not in r  # only 3 classes: top-5 is not scored
    sim = _manual(model, tok, folder, [f"a photo of a {c}." for c in folder.classes])
    labels = torch.tensor([s.meta["label"] for s in folder.samples])
    assert r["top1"] == pytest.approx((sim.argmax(1) == labels).float().mean().item())
    assert r["gflops"] == pytest.approx(vision_flops(model.visual, [50] * 4) / 1e9)
    assert r["tokens_out"] == 50 and r["method"] == "none" and r["n"] == 6
    # the patch is removed afterwards
    assert not hasattr(model.visual, "_vtprune_patch")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in [model.visual, *model.visual.transformer.resblocks])


def test_zero_shot_top5_and_pitome(clip, folder):
    model, tok = clip
    r = zero_shot(model, tok, folder, "pitome", batch_size=4, ratio=0.8)
    assert r["method"] == "pitome:ratio=0.8"
    assert r["gflops"] < vision_flops(model.visual, [50] * 4) / 1e9 and r["tokens_out"] < 50
    assert 0.0 <= r["top1"] <= 1.0


def test_retrieval_none_equals_manual(clip, karpathy):
    model, tok = clip
    r = retrieval(model, tok, karpathy, batch_size=3)
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "mean_recall", "gflops"):
        assert k in r
    sim = _manual(model, tok, karpathy, karpathy.texts)
    t2i = torch.tensor(karpathy.text_to_image)
    i2t_top = sim.argmax(1)  # best caption of each image
    assert r["i2t_r1"] == pytest.approx((t2i[i2t_top] == torch.arange(4)).float().mean().item())
    assert r["t2i_r1"] == pytest.approx((sim.argmax(0) == t2i).float().mean().item())
    assert r["i2t_r5"] == r["t2i_r5"] == r["t2i_r10"] == 1.0  # 4 images: every image in the top 5


def test_sweep_clip_rows(clip, folder, karpathy):
    model, tok = clip
    rows = sweep_clip(model, tok, folder, ["pitome:ratio=0.8"], batch_size=8)
    assert [r["method"] for r in rows] == ["none", "pitome:ratio=0.8"]
    assert rows[0]["flops_ratio"] == 1.0 and rows[1]["flops_ratio"] < 1.0
    assert rows[1]["gflops"] < rows[0]["gflops"]
    rows = sweep_clip(model, tok, karpathy, ["none", "pitome:ratio=0.8"])
    assert len(rows) == 2 and "i2t_r1" in rows[1] and rows[1]["gflops"] < rows[0]["gflops"]
    assert rows[0]["relative"] in (1.0, None)
