"""The oracles of the hook layer, on tiny random models of every family (docs/architecture.md §10)."""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vtprune
from vtprune.testing import BUILDERS, FAMILIES, QWEN3_FAMILIES, make_inputs, tiny_images

from helpers import assert_inputs_batch_equals_alone, no_vtprune_hooks as _no_hooks, vtprune_hooks as _vtprune_hooks
from oracles import last_logits, shortened_inputs, stage_d_reference

QUESTIONS = ["what is it?", "a longer question about the picture here?", "and the colour?"]
SIZES = {"llava": None, "llava_next": [(56, 56), (70, 112), (112, 84)],
         "qwen2_vl": [(56, 56), (70, 112), (112, 84)], "qwen2_5_vl": [(56, 56), (70, 112), (112, 84)],
         "llava_onevision": [(56, 56), (70, 112), (150, 160)], "llava_onevision1_5": [(56, 56), (70, 112), (112, 84)],
         **{f: [(56, 56), (70, 112), (112, 84)] for f in QWEN3_FAMILIES}}
GEN = dict(max_new_tokens=20, do_sample=False)


@functools.lru_cache(maxsize=None)
def _model(family: str, attn: str = "sdpa"):
    return BUILDERS[family](attn_implementation=attn)


def batch(family: str, n: int = 2, attn: str = "sdpa"):
    model, proc = _model(family, attn)
    sizes = SIZES[family]
    imgs = tiny_images(n, sizes=sizes[:n] if sizes else None)
    return model, make_inputs(family, proc, QUESTIONS[:n], imgs)


def valid_logits(logits, mask):
    return logits[mask.bool()]


# ------------------------------------------------------------------ keep-all == unpatched
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_equals_unpatched(family):
    model, inp = batch(family)
    with torch.no_grad():
        ref = model(**inp).logits
        gref = model.generate(**inp, **GEN)
    with vtprune.patch(model, "none") as h:
        with torch.no_grad():
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
        assert h.stats.visual_tokens_per_image == h.stats.visual_tokens_in_per_image
    torch.testing.assert_close(valid_logits(out, inp["attention_mask"]), valid_logits(ref, inp["attention_mask"]),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    assert _no_hooks(model)


# ------------------------------------------------------------------ remove() == never patched
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_remove_restores_model_and_other_instances_untouched(family):
    model, inp = batch(family)
    other, _ = BUILDERS[family]()
    assert _no_hooks(model) and _no_hooks(other)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**inp).logits
        ref_other = other(**inp).logits
    h = vtprune.patch(model, "random", keep=0.5)
    with torch.no_grad():
        pruned = model(**inp).logits
        other_during = other(**inp).logits
    assert pruned.shape[1] < ref.shape[1]
    assert _no_hooks(other)
    torch.testing.assert_close(other_during, ref_other, rtol=0, atol=0)
    h.remove()
    assert _no_hooks(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(**inp).logits, ref, rtol=0, atol=0)
    h.remove()  # idempotent


def test_patching_twice_is_refused_and_leaves_first_patch():
    model, inp = batch("llava")
    with vtprune.patch(model, "random", keep=4):
        with pytest.raises(ValueError, match="already patched"):
            vtprune.patch(model, "none")
    assert _no_hooks(model)


# ------------------------------------------------------------------ stage P oracle
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["random:keep=0.5", "pool:keep=0.25"])
def test_stage_p_equals_shortened_input(family, method):
    model, inp = batch(family)
    positions = "original" if family.startswith("qwen") else "renumber"
    with vtprune.patch(model, method, seed=3) as h:
        with torch.no_grad():
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
        kept = h.stats.kept_index_per_image
        n_out = h.stats.visual_tokens_per_image
    assert all(o < i for o, i in zip(n_out, h.stats.visual_tokens_in_per_image))
    short = shortened_inputs(model, family, inp, kept, positions=positions)
    if method.startswith("pool"):
        short["mm_encoder_outputs"]["image"].pooler_output = _pooled_features(model, family, inp, method, h)
    with torch.no_grad():
        ref = model(**short).logits
        gref = model.generate(**short, **GEN)
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert torch.equal(gen[:, inp["input_ids"].shape[1]:], gref[:, short["input_ids"].shape[1]:])


def _pooled_features(model, family, inp, method, h):
    """Pooled features recomputed independently with adaptive average pooling per view grid."""
    from vtprune.methods.baselines import average_pool, pooled_grid  # noqa: F401 (same pure kernel, tested below)
    cap = {}
    hook = model.model.register_forward_pre_hook(lambda m, a, k: cap.update(k), with_kwargs=True)
    with vtprune.patch(model, method, seed=3):
        with torch.no_grad():
            model(**inp)
    hook.remove()
    return cap["mm_encoder_outputs"]["image"].pooler_output


def test_average_pool_kernel_hand_example():
    from vtprune.methods.baselines import average_pool, pooled_grid

    feats = torch.arange(16, dtype=torch.float32).view(16, 1)  # 4x4 raster grid
    pooled, tl = average_pool(feats, 4, 4, (2, 2))
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert tl.tolist() == [0, 2, 8, 10]
    assert pooled_grid(4, 4, 4) == (2, 2)


def test_pool_impossible_budget_raises():
    from vtprune.methods.baselines import pooled_grid

    with pytest.raises(ValueError, match="cannot pool"):
        pooled_grid(4, 4, 7)


# ------------------------------------------------------------------ stage D oracle
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["fastv:layer=2,keep=0.5", "random:at=D,layer=1,keep=0.3"])
def test_stage_d_equals_reference_run(family, method):
    """Pruning inside the LLM == the mask run (attention-only LLMs) / the physically shortened run
    (hybrid Qwen3.5), in logits and in cached greedy generation."""
    model, inp = batch(family)
    layer = 2 if method.startswith("fastv") else 1
    with vtprune.patch(model, method, seed=5) as h:
        with torch.no_grad():
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
        kept = h.stats.llm_kept_index
        sched = h.stats.schedules
    n = inp["input_ids"].shape[1]
    keep = torch.zeros((kept.shape[0], n), dtype=torch.bool)
    for b in range(kept.shape[0]):
        keep[b, kept[b][kept[b] >= 0]] = True
    assert all(s.visual_tokens_per_layer[layer] < s.visual_tokens_per_layer[0] for s in sched)
    assert all(s.llm_tokens_per_layer[:layer] == [s.llm_tokens_per_layer[0]] * layer for s in sched)
    ref, gref = stage_d_reference(model, family, inp, layer, keep, GEN["max_new_tokens"])
    torch.testing.assert_close(last_logits(out), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen[:, n:], gref)


def test_fastv_selection_hand_example():
    from vtprune.methods.fastv import FastV
    from vtprune.policy import Context, DecoderView

    a = torch.tensor([.30, .05, .02, .10, .01, .07, .05, .10, .10, .20])
    visual = torch.zeros(10, dtype=torch.bool)
    visual[2:7] = True
    view = DecoderView(hidden=torch.zeros(10, 4), visual=visual, image_id=torch.zeros(10, dtype=torch.long),
                       signals={"last_row@1": a}, original_index=torch.arange(10))
    assert FastV(layer=2, keep=2).select(2, view, Context("llava")).tolist() == [3, 5]
    tie = torch.tensor([0, 0, .1, .1, .1, .05, 0, 0, 0, 0])
    view.signals["last_row@1"] = tie
    assert FastV(layer=2, keep=2).select(2, view, Context("llava")).tolist() == [2, 3]


def test_fastv_last_row_equals_eager_attention():
    """The recomputed last-token row equals output_attentions of an eager run (recompute oracle)."""
    for family in ("llava", "qwen2_vl", "llava_onevision1_5"):  # Qwen3: q/k norms
        model, inp = batch(family, n=1, attn="eager")
        captured = {}
        adapter = vtprune.adapters.get_adapter(model)
        layer = 1

        def pre(m, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows = torch.full((hidden.shape[0], 1), hidden.shape[1] - 1)
            captured["row"] = adapter.llm_attention_rows(layer, hidden, kwargs["position_embeddings"], rows, None)

        hk = adapter.llm_layers()[layer].register_forward_pre_hook(pre, with_kwargs=True)
        with torch.no_grad():
            out = model(**inp, output_attentions=True)
        hk.remove()
        eager = out.attentions[layer][:, :, -1:].float()
        torch.testing.assert_close(captured["row"], eager, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ stage V seam
def test_stage_v_equals_explicit_encoder_run():
    """Random drop inside CLIP after layer 0 == running the CLIP layers by hand on the same tokens."""
    model, inp = batch("llava")
    with vtprune.patch(model, "random:at=V,layer=0,keep=0.5", seed=2) as h:
        with torch.no_grad():
            out = model(**inp).logits
        n_out = h.stats.visual_tokens_per_image
    tower = model.model.vision_tower
    from vtprune.methods.baselines import random_subset
    from vtprune.policy import Context

    ctx = Context("llava", seed=2)
    with torch.no_grad():
        x = tower.pre_layrnorm(tower.embeddings(inp["pixel_values"]))
        x = tower.encoder.layers[0](x, attention_mask=None)
        keep = [torch.cat([torch.zeros(1, dtype=torch.long), 1 + random_subset(16, 8, ctx.rng(0))]) for _ in range(2)]
        x = torch.stack([x[i, keep[i]] for i in range(2)])
        x = tower.encoder.layers[1](x, attention_mask=None)  # feature layer -2 of a 3-layer tower
        feats = model.model.multi_modal_projector(x[:, 1:])
    assert n_out == [8, 8]
    kept = [torch.arange(8)] * 2  # all of the already reduced tokens
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    short = shortened_inputs(model, "llava", inp, [torch.arange(8)] * 2, positions="renumber")
    short["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
    with torch.no_grad():
        ref = model(**short).logits
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ batches
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["none", "random:keep=0.5", "fastv:layer=2,keep=0.4"])
def test_batch_equals_each_alone(family, method):
    model, inp = batch(family, n=3)
    _, proc = _model(family)
    imgs = tiny_images(3, sizes=SIZES[family])
    singles = [make_inputs(family, proc, [QUESTIONS[i]], [imgs[i]]) for i in range(3)]
    assert_inputs_batch_equals_alone(model, inp, singles, method, seed=1, gen=dict(max_new_tokens=8, do_sample=False))


# ------------------------------------------------------------------ SDPA == eager
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_5"])
@pytest.mark.parametrize("method", ["fastv:layer=2,keep=0.5", "random:keep=0.5"])
def test_sdpa_and_eager_agree(family, method):
    results = {}
    for attn in ("sdpa", "eager"):
        model, inp = batch(family, attn=attn)
        with vtprune.patch(model, method, seed=0) as h:
            with torch.no_grad():
                logits = model(**inp).logits[:, -1]
                gen = model.generate(**inp, max_new_tokens=10, do_sample=False)
            results[attn] = (logits, gen, h.stats.llm_kept_index, h.stats.kept_index_per_image)
    (ls, gs, ks, ps), (le, ge, ke, pe) = results["sdpa"], results["eager"]
    torch.testing.assert_close(ls, le, rtol=1e-4, atol=1e-5)
    assert torch.equal(gs, ge)
    assert (ks is None and ke is None) or torch.equal(ks, ke)
    assert all(torch.equal(a, b) for a, b in zip(ps, pe))


# ------------------------------------------------------------------ stats
def test_stats_describe_last_request():
    model, inp = batch("llava")
    with vtprune.patch(model, "fastv:layer=2,keep=4") as h:
        with torch.no_grad():
            model(**inp)
    st = h.stats
    assert st.visual_tokens_per_image == [16, 16]
    assert [s.visual_tokens_per_layer for s in st.schedules] == [[16, 16, 4, 4]] * 2
    n_text = [int(inp["attention_mask"][i].sum()) - 16 for i in range(2)]
    assert [s.llm_tokens_per_layer for s in st.schedules] == [[16 + t, 16 + t, 4 + t, 4 + t] for t in n_text]
    assert st.select_ms >= 0 and st.vision_ms >= 0


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "method,params,match",
    [
        ("nosuch", {}, "unknown method 'nosuch'; registered methods: .*fastv"),
        ("random", {"keep": 0}, "keep=0 must be positive"),
        ("random", {"keep": -3}, "must be positive"),
        ("random", {"keep": 17}, "larger than the 16 visual tokens"),
        ("random", {"keep": 1.5}, r"fraction outside \(0, 1\]"),
        ("fastv", {"keep": 64}, "larger than the 16"),
        ("fastv", {"layer": 9}, "must be in 1..3"),
        ("fastv:layer=", {}, "malformed method spec"),
        ("fastv:layer2", {}, "malformed method spec"),
        ("fastv + ", {}, "malformed method spec"),
        ("fastv", {"nope": 1}, "has no parameter"),
        ("random:at=X", {}, "choose 'P', 'V' or 'D'"),
    ],
)
def test_bad_input_raises_and_leaves_model_unpatched(method, params, match):
    model, _ = batch("llava")
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, method, **params)
    assert _no_hooks(model)


def test_qwen_rejects_renumbered_positions_at_patch_time():
    model, _ = batch("qwen2_vl")
    with pytest.raises(ValueError, match="positions='renumber' is not defined for qwen2_vl"):
        vtprune.patch(model, "random:keep=0.5,positions=renumber")
    assert _no_hooks(model)


def test_wrong_model_family():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    model = LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="unsupported model.*llava.*qwen2_5_vl"):
        vtprune.patch(model, "fastv")
    assert _no_hooks(model)


def test_stage_v_on_qwen_is_a_clear_error():
    model, inp = batch("qwen2_vl")
    with pytest.raises(ValueError, match="does not support model family 'qwen2_vl'; supported families: llava"):
        vtprune.patch(model, "random:at=V,layer=0,keep=0.5")
    assert _no_hooks(model)


def test_methods_listing_and_spec_parsing():
    listed = vtprune.methods()
    assert {"none", "random", "pool", "fastv"} <= set(listed)
    assert all(isinstance(v, str) and v for v in listed.values())
    assert vtprune.parse_spec("fastv:layer=2,keep=0.5 + random:keep=3") == [
        ("fastv", {"layer": 2, "keep": 0.5}), ("random", {"keep": 3})]
    assert vtprune.parse_spec("x:layers=7|9|12,r=0.5|0.25,on=true,s=abc") == [
        ("x", {"layers": (7, 9, 12), "r": (0.5, 0.25), "on": True, "s": "abc"})]


def test_composition_runs_stage_p_then_d():
    model, inp = batch("llava")
    with vtprune.patch(model, "fastv:layer=2,keep=0.5 + random:keep=8") as h:
        with torch.no_grad():
            model.generate(**inp, max_new_tokens=5, do_sample=False)
        with torch.no_grad():
            model(**inp)
    assert [p.name for p in h.policies] == ["random", "fastv"]
    assert [s.visual_tokens_per_layer for s in h.stats.schedules] == [[8, 8, 4, 4]] * 2


# ------------------------------------------------------------------ other LLaVA vision towers
@pytest.mark.parametrize("vision", ["siglip", "dinov2"])
def test_llava_with_siglip_and_dinov2_towers(vision):
    from vtprune.testing import tiny_llava

    model, proc = tiny_llava(vision=vision)
    inp = make_inputs("llava", proc, QUESTIONS[:2], tiny_images(2))
    with torch.no_grad():
        ref = model(**inp).logits
        gref = model.generate(**inp, max_new_tokens=10, do_sample=False)
    with vtprune.patch(model, "none"):
        with torch.no_grad():
            out = model(**inp).logits
            gen = model.generate(**inp, max_new_tokens=10, do_sample=False)
    torch.testing.assert_close(out[:, -1], ref[:, -1], rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    with vtprune.patch(model, "random:keep=5") as h:
        with torch.no_grad():
            out = model(**inp).logits
        kept = h.stats.kept_index_per_image
    assert h.stats.visual_tokens_per_image == [5, 5]
    short = shortened_inputs(model, "llava", inp, kept, positions="renumber")
    with torch.no_grad():
        ref = model(**short).logits
    torch.testing.assert_close(out[:, -1], ref[:, -1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ ViT signals without eager attention
@pytest.mark.parametrize("vision", ["clip", "dinov2"])
def test_vit_attention_recompute_equals_eager(vision):
    from vtprune.adapters.base import vit_qk
    from vtprune.attention import attention_probs
    from vtprune.testing import tiny_llava

    model, proc = tiny_llava(attn_implementation="eager", vision=vision)
    inp = make_inputs("llava", proc, QUESTIONS[:2], tiny_images(2))
    tower = model.model.vision_tower
    layers = tower.encoder.layers if hasattr(tower.encoder, "layers") else tower.encoder.layer
    captured = {}
    hooks = [layers[l].register_forward_pre_hook(lambda m, a, l=l: captured.__setitem__(l, a[0])) for l in range(len(layers))]
    with torch.no_grad():
        out = tower(inp["pixel_values"], output_attentions=True)
        for h in hooks:
            h.remove()
        for l in range(len(layers)):
            q, k, scale = vit_qk(layers[l], captured[l])
            probs = attention_probs(q, k, scale)
            torch.testing.assert_close(probs, out.attentions[l].float(), rtol=1e-5, atol=1e-6)
            q0, k0, _ = vit_qk(layers[l], captured[l], rows=slice(0, 1))  # the CLS row alone
            torch.testing.assert_close(attention_probs(q0, k0, scale), out.attentions[l][:, :, :1].float(),
                                       rtol=1e-5, atol=1e-6)


def test_vision_signals_keep_sdpa():
    """Requesting ViT signals never switches the model to eager attention."""
    from vtprune.adapters import get_adapter

    model, inp = batch("llava")
    adapter = get_adapter(model)
    images, _ = adapter.encode(dict(inp), {"vit_received@0": None, "vit_cls@1": None}, [], None)
    assert model.model.vision_tower.config._attn_implementation == "sdpa"
    assert model.model.language_model.config._attn_implementation == "sdpa"
    assert images[0].signals["vit_received@0"].shape == (16,)
    assert images[0].signals["vit_cls@1"].shape == (16,)


# ------------------------------------------------------------------ manual decoding (no generate)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("method", ["random:keep=0.5", "fastv:layer=2,keep=0.5"])
def test_manual_cached_decoding_matches_generate(family, method):
    """A hand-written greedy loop (cache, full mask, no position ids) continues the numbering right:
    Qwen decodes through the rope_deltas the patch sets, LLaVA through the patch's own positions."""
    model, inp = batch(family)
    with vtprune.patch(model, method, seed=4):
        with torch.no_grad():
            gen = model.generate(**inp, max_new_tokens=6, do_sample=False)
            out = model(**inp, use_cache=True)
            cache, mask = out.cache, inp["attention_mask"]
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks = [nxt]
            for _ in range(5):
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                step = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
                cache = step.cache
                nxt = step.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(nxt)
    assert torch.cat(toks, 1).tolist() == gen[:, inp["input_ids"].shape[1]:].tolist()


def test_bf16_keep_all_equals_unpatched():
    from vtprune.testing import tiny_llava

    model, proc = tiny_llava(dtype=torch.bfloat16)
    inp = make_inputs("llava", proc, QUESTIONS[:2], tiny_images(2))
    inp["pixel_values"] = inp["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        ref = model(**inp).logits
        gref = model.generate(**inp, max_new_tokens=10, do_sample=False)
    with vtprune.patch(model, "none"), torch.no_grad():
        out = model(**inp).logits
        gen = model.generate(**inp, max_new_tokens=10, do_sample=False)
    assert torch.equal(out[:, -1], ref[:, -1])
    assert torch.equal(gen, gref)


def test_every_registered_spec_round_trips():
    from vtprune.registry import build, registered

    for name, cls in registered().items():
        pol = cls()
        (n, params), = vtprune.parse_spec(pol.spec())
        assert n == pol.name
        again = build(n, params)
        assert {k: v for k, v in again.params().items() if v is not None} == \
               {k: v for k, v in pol.params().items() if v is not None}, name


def test_unsorted_policy_emits_its_own_order():
    """A policy declaring sorted_output=False gets its tokens in its own order in the sorted slots."""
    from dataclasses import dataclass

    from vtprune.policy import TokenPolicy

    @dataclass
    class Reverse(TokenPolicy):
        name = "reverse-test"
        keep: int = 4

        def select(self, image, n_keep, ctx):
            return image.candidate_index()[:n_keep].flip(0)

    Reverse.sorted_output = False
    model, inp = batch("llava")
    cap = {}
    hk = model.model.register_forward_pre_hook(lambda m, a, k: cap.update(k), with_kwargs=True)
    with vtprune.patch(model, Reverse(keep=4)) as h, torch.no_grad():
        model(**inp)
    hk.remove()
    from oracles import image_features

    feats = image_features(model, "llava", inp)
    got = cap["mm_encoder_outputs"]["image"].pooler_output
    for f, g in zip(feats, got):
        torch.testing.assert_close(g, f[[3, 2, 1, 0]])
    assert [k.tolist() for k in h.stats.kept_index_per_image] == [[3, 2, 1, 0]] * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_schedule_counts_vision_projector_and_new_tokens(family):
    """The per-sample schedule feeds count_flops: vision views, projector tokens, generated tokens."""
    from vtprune.flops import count_flops

    model, inp = batch(family)
    with vtprune.patch(model, "random:keep=0.5") as h, torch.no_grad():
        gen = model.generate(**inp, max_new_tokens=5, do_sample=False)
    n_new = gen.shape[1] - inp["input_ids"].shape[1]
    for s, n_in in zip(h.stats.schedules, [h.stats.visual_tokens_in_per_image[0], h.stats.visual_tokens_in_per_image[1]]):
        assert s.new_tokens == n_new
        assert s.vision_tokens_per_layer and all(len(v) > 0 for v in s.vision_tokens_per_layer)
        assert s.projector_tokens >= s.visual_tokens_per_image[0]
        rep = count_flops(model, s)
        assert rep.vision_flops > 0 and rep.projector_flops > 0 and rep.llm_prefill_flops > 0
    if family == "llava_next":  # base view + crops of each image
        assert [len(s.vision_tokens_per_layer) for s in h.stats.schedules] == [3, 5]


def test_dinov2_tower_at_another_resolution_uses_the_actual_grid():
    """DINOv2 interpolates its position table: the grid comes from the tokens, not config.image_size."""
    from vtprune.adapters import get_adapter
    from vtprune.testing import tiny_llava

    model, proc = tiny_llava(vision="dinov2")  # config image_size 56 (4x4 patches)
    proc.image_processor.size = {"shortest_edge": 84}
    proc.image_processor.crop_size = {"height": 84, "width": 84}  # 6x6 patches
    inp = make_inputs("llava", proc, QUESTIONS[:2], tiny_images(2, sizes=[(84, 84), (84, 84)]))
    assert int((inp["input_ids"][0] == model.config.image_token_id).sum()) == 36
    images, _ = get_adapter(model).encode(dict(inp), {}, [], None)
    assert images[0].grid_shapes == [(6, 6)] and images[0].grid[:, 1].max() == 5
    with torch.no_grad():
        ref = model(**inp).logits[:, -1]
    with vtprune.patch(model, "none"), torch.no_grad():
        torch.testing.assert_close(model(**inp).logits[:, -1], ref, rtol=1e-5, atol=1e-5)
    with vtprune.patch(model, "hiprune:keep=9") as h, torch.no_grad():
        model(**inp)
    assert h.stats.visual_tokens_per_image == [9, 9] and h.stats.budget_clamped == [False, False]
    # an int budget above a dynamic-resolution image's tokens keeps all of them (recorded), == keep-all
    with vtprune.patch(model, "random:keep=40") as h, torch.no_grad():
        clamped = model(**inp).logits[:, -1]
    assert h.stats.visual_tokens_per_image == [36, 36] and h.stats.budget_clamped == [True, True]
    torch.testing.assert_close(clamped, ref, rtol=1e-5, atol=1e-5)
