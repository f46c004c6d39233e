"""The AnyRes embedded VLM (``embedded-anyres``) and its benchmark: the documented visual-token order
equals what vtprune's LLaVA-NeXT adapter recovers, relevant tokens sit on the objects, the shipped split
regenerates, the oracle selections keep what they claim, the builtin is registered, and (when the
converted DINOv2 tower is cached) the committed checkpoint answers through the stock processor path.
"""
import json

import numpy as np
import pytest
import torch
from vtprune.eval.embedded import anyres as A
from vtprune.eval.embedded import generator as G

torch.set_num_threads(1)


def _tiny_layout_model():
    """A LlavaNext built from the embedded-anyres config with a 1-layer narrow tower and LLM (layout only)."""
    from transformers import LlavaNextForConditionalGeneration

    tok = A.build_tokenizer()
    cfg = A.build_config(tok)
    vc = cfg.vision_config
    vc.num_hidden_layers, vc.hidden_size, vc.num_attention_heads = 1, 48, 2
    tc = cfg.text_config
    tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads = 1, 32, 64, 2, 2
    tc.head_dim = 16
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(cfg).eval(), A.build_processor(tok)


@pytest.mark.parametrize("size", A.IMAGE_SIZES)
def test_token_order_matches_adapter(size):
    """token_views / crop_token (the order relevant_tokens use) == the adapter's recovered native layout,
    and the processor inserts exactly that many placeholders."""
    from helpers import image_tokens

    model, proc = _tiny_layout_model()
    h, w = size
    img = G.Image.new("RGB", (w, h), (200, 200, 200))
    inp = proc(images=[img], text=[A.M.prompt("what color is the circle ?")], return_tensors="pt")
    views = A.token_views(h, w)
    assert int((inp.input_ids == model.config.image_token_id).sum()) == len(views)
    it = image_tokens(model, inp)[0]
    assert torch.equal(it.view, torch.from_numpy(views))
    assert torch.equal(it.candidate, torch.from_numpy(views >= 0))
    nph, npw = A.grid_shape(h, w)
    for r in range(nph * A.SIDE):
        for c in range(npw * A.SIDE):
            t = A.crop_token(r, c, w)
            assert tuple(it.grid[t].tolist()) == (r, c)
            assert views[t] == 1 + (r // A.SIDE) * npw + c // A.SIDE
    assert it.grid[:64].tolist() == [[t // 8, t % 8] for t in range(64)]


def test_shipped_split_regenerates_and_tokens_sit_on_objects(tmp_path):
    from PIL import Image

    A.write_split(tmp_path)
    for name in ("questions.jsonl", "scenes.jsonl", "meta.json"):
        assert (tmp_path / name).read_text() == (A.DEFAULT_BENCH_DIR / name).read_text(), name
    scenes = [json.loads(l) for l in (A.DEFAULT_BENCH_DIR / "scenes.jsonl").read_text().splitlines()]
    assert len(scenes) == A.HELDOUT_IMAGES
    uneven = []
    for s in scenes:
        img = np.asarray(Image.open(A.DEFAULT_BENCH_DIR / s["image"]).convert("RGB")).astype(int)
        assert np.array_equal(img, np.asarray(Image.open(tmp_path / s["image"]).convert("RGB"))), s["image"]
        h, w = s["size"]
        sat = (img.max(-1) - img.min(-1)) > 85  # object pixels
        base = sat.reshape(8, h // 8, 8, w // 8).mean(axis=(1, 3)).reshape(-1)
        crop = sat.reshape(h // 14, 14, w // 14, 14).mean(axis=(1, 3))
        views = A.token_views(h, w)
        frac, box = np.zeros(len(views)), {}  # box: a patch's footprint (y0, y1, x0, x1) on the image
        frac[:64] = base
        for t in range(64):
            box[t] = (t // 8 * h // 8, (t // 8 + 1) * h // 8, t % 8 * w // 8, (t % 8 + 1) * w // 8)
        for r in range(h // 14):
            for c in range(w // 14):
                frac[A.crop_token(r, c, w)] = crop[r, c]
                box[A.crop_token(r, c, w)] = (r * 14, r * 14 + 14, c * 14, c * 14 + 14)
        obj = s["object_tokens"]
        assert views[obj].min() >= 0  # never a newline slot
        # object pixels on every object token (a base-view patch spans 28 px of a large image: the patch
        # holding a small object's centre may see only a corner of it)
        assert frac[[t for t in obj if t < 64]].min(initial=1) > 0.05, s["image"]
        assert frac[[t for t in obj if t >= 64]].min(initial=1) >= 0.1, s["image"]
        # a patch off every object's tokens holds < MIN_COVER object pixels, unless several objects each
        # cover less than MIN_COVER of it (the rule is per object)
        for t in set(np.flatnonzero(frac >= G.MIN_COVER)) - set(obj):
            y0, y1, x0, x1 = box[t]
            near = [o for o in s["objects"] if abs(o["center"][0] - (x0 + x1) / 2) < A.OBJ_SIZES[o["size"]] + (x1 - x0) / 2
                    and abs(o["center"][1] - (y0 + y1) / 2) < A.OBJ_SIZES[o["size"]] + (y1 - y0) / 2]
            assert len(near) >= 2, (s["image"], t)
        per_crop = np.bincount([o["crop"] for o in s["objects"]], minlength=1 + np.prod(s["grid"]))[1:]
        if len(per_crop) > 1:
            uneven.append(per_crop.max() / per_crop.sum())
    assert np.mean(uneven) > 0.6  # most objects of a multi-crop image share one crop


def test_selections():
    rng = np.random.default_rng(0)
    views = A.token_views(224, 224)
    rel = [A.crop_token(r, c, 224) for r in range(8, 12) for c in range(8, 13)]  # 20 tokens in crop 4
    n = 5 * 64
    for mode in A.SELECTIONS:
        kept = A.select_tokens(mode, 0.25, rel, views, rng)
        assert kept == sorted(set(kept))
        assert set(np.flatnonzero(views < 0)) <= set(kept)  # newlines always kept
        assert int((views[kept] >= 0).sum()) == (n if mode == "all" else n // 4)
        per_view = np.bincount(views[kept][views[kept] >= 0], minlength=5)
        if mode.startswith("equal"):
            assert per_view.tolist() == [16] * 5
        if mode.startswith("crop_aware"):
            assert per_view.tolist() == [4, 4, 4, 4, 64]  # the overflow over the full crop, shared equally
        if mode.endswith("oracle"):
            assert set(rel) <= set(kept) or mode == "equal_oracle"
    assert len(set(rel) & set(A.select_tokens("equal_oracle", 0.25, rel, views, rng))) == 16
    with pytest.raises(ValueError, match="unknown selection"):
        A.select_tokens("bogus", 0.25, rel, views, rng)


def test_builtin_and_benchmark():
    from vtprune.eval.benchmarks import load_benchmark
    from vtprune.eval.sweep.models import BUILTIN_MODELS, builtin_skeleton

    bench = load_benchmark("embedded", A.DEFAULT_BENCH_DIR)
    assert len(bench.samples) == len(A.load_split())
    assert bench.samples[0].meta["relevant_tokens"]
    BUILTIN_MODELS["embedded-anyres"].check()
    sk = builtin_skeleton("embedded-anyres")
    assert type(sk).__name__ == "LlavaNextForConditionalGeneration"
    assert sk.config.image_grid_pinpoints == A.PINPOINTS and sk.config.text_config.num_hidden_layers >= 4
    size = sum(p.stat().st_size for p in A.MODEL_DIR.iterdir())
    assert size <= 10 * 2**20


def test_checkpoint_smoke():
    """The committed checkpoint through the stock processor + forward path answers held-out questions
    like the packed-feature evaluation path (skipped when the converted tower is not cached)."""
    from vtprune.eval.embedded.dinov2_from_onnx import CACHE_NAME, DEFAULT_CACHE_DIR
    from vtprune.eval.embedded.evaluate import answer_prior, evaluate

    if not (DEFAULT_CACHE_DIR / CACHE_NAME).exists():
        pytest.skip(f"no converted DINOv2 tower in {DEFAULT_CACHE_DIR}")
    from PIL import Image
    from vtprune.eval.embedded import load_embedded_anyres

    model, proc = load_embedded_anyres()
    recs = A.load_split()[:24]
    images = [Image.open(r["image_path"]).convert("RGB") for r in recs]
    proc.tokenizer.padding_side = "left"
    inp = proc(images=images, text=[A.M.prompt(r["question"]) for r in recs], return_tensors="pt", padding=True)
    with torch.no_grad():
        pred = model(**inp).logits[:, -1].argmax(-1)
    stock = proc.tokenizer.convert_ids_to_tokens(pred.tolist())
    paths = sorted({r["image_path"] for r in recs})
    feats = A.image_features(model, proc, [Image.open(p).convert("RGB") for p in paths])
    res = evaluate(model, proc, recs, budgets=(("all", 1.0),), feats=feats, select=A.select_record)
    acc_stock = np.mean([p == r["answer"] for p, r in zip(stock, recs)])
    # it sees: better than the image-blind majority answer per type of the training distribution
    rng = np.random.default_rng(11)
    train_like = [q for _ in range(300) for q in G.make_questions(A.make_scene(rng), 6, rng)]
    assert acc_stock > answer_prior(recs, train_like)["acc"] + 0.05
    assert abs(acc_stock - res[("all", 1.0)]["acc"]) <= 1 / 24 + 1e-9  # both paths agree


def test_anyres_checkpoint_accuracy():
    """Regression guard on the committed checkpoint (its card: keep-all 0.956, random at 12.5 % 0.601 on the
    whole shipped split, 3 draws): keep-all >= 0.90 and random pruning to 12.5 % costs >= 20 points
    (skipped when the converted tower is not cached)."""
    from vtprune.eval.embedded.dinov2_from_onnx import CACHE_NAME, DEFAULT_CACHE_DIR
    from vtprune.eval.embedded.evaluate import evaluate

    if not (DEFAULT_CACHE_DIR / CACHE_NAME).exists():
        pytest.skip(f"no converted DINOv2 tower in {DEFAULT_CACHE_DIR}")
    from PIL import Image
    from vtprune.eval.embedded import load_embedded_anyres

    model, proc = load_embedded_anyres()
    recs = A.load_split()
    paths = sorted({r["image_path"] for r in recs})
    feats = A.image_features(model, proc, [Image.open(p).convert("RGB") for p in paths])
    res = evaluate(model, proc, recs, budgets=(("all", 1.0), ("random", 0.125)), feats=feats, select=A.select_record)
    keep_all, rnd = res[("all", 1.0)]["acc"], res[("random", 0.125)]["acc"]
    assert keep_all >= 0.90, res[("all", 1.0)]
    assert rnd <= keep_all - 0.20, (keep_all, rnd)
