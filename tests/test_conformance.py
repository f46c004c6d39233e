"""Conformance matrix: every registered method x every model family (and LLaVA-1.5 with a DINOv2 tower) x {SDPA, eager} x {batch 1, batch 2
with padding} x {forward, generate with 10 new tokens} against the hook layer's oracles.

* stage-P selections: the unpatched model fed the explicitly shortened input (kept features in the
  emitted order, same positions convention);
* stage-P merges and stage V: the unpatched model fed the shortened input with the features the patch
  produced (checks ids, masks, positions and the cache; the merge maths is tested per method);
* stage D with one pruning layer: the unpatched model with the dropped keys hidden by the mask from
  that layer on; on hybrid LLMs (Qwen3.5) the unpatched model's layers run one sample at a time with the
  sequence physically shortened from that layer on. Multi-stage in-LLM methods (PyramidDrop, SparseVLM,
  TransPrune) have their stage-by-stage oracles in tests/methods (the mask run, the explicit
  layer-by-layer run, and on Qwen3.5 the physically shortened run), on every family.
Every unsupported combination must raise a ValueError that names what is supported.
"""
from __future__ import annotations

import functools

import pytest
import torch

import vtprune
from vtprune.policy import DecoderPolicy, MergePolicy, VisionPolicy
from vtprune.registry import registered
from vtprune.testing import BUILDERS, FAMILIES, HYBRID_FAMILIES, QWEN3_FAMILIES, VARIANTS, make_inputs, tiny_images

from helpers import assert_inputs_batch_equals_alone
from oracles import last_logits, set_features, shortened_inputs, stage_d_reference

SPECS = {
    "none": "none",
    "random": "random:keep=0.5",
    "pool": "pool:keep=0.25",
    "fastv": "fastv:layer=2,keep=0.5",
    "dart": "dart:layer=2,keep=0.5,pivot_image=2,pivot_text=2",
    "pyramiddrop": "pyramiddrop:layer_list=1|2|3,ratios=0.5|0.25|0.125",
    "sparsevlm": "sparsevlm:layers=1|2,schedule=300|110",  # layer 1: the tiny hybrid Qwen3.5's first full-attention layer
    "hiprune": "hiprune:keep=0.5",
    "visionzip": "visionzip:keep=0.5",
    "todre": "todre:keep=0.5,relevance_layer=1",
    "todre-relevance": "todre-relevance:relevance_layer=1,tau=1.0",
    "pitome": "pitome:keep=8",
    "pitome-p": "pitome-p:keep=0.5",
    "globalcom2": "globalcom2:keep=0.5",
    "transprune": "transprune:prune_layers=1|2|3,keep_ratios=0.75|0.5|0.25",
    "divprune": "divprune:keep=0.5",
    "vispruner": "vispruner:keep=0.5",
    "cdpruner": "cdpruner:keep=0.5",
    "downsample": "downsample:keep=0.25",
}
#: the 4-layer tiny Qwen3.5 has full attention at layers 1 and 3 only, so SparseVLM's second ranking layer (2)
#: reads layer 1's attention, before stage 1's recycled tokens join: a ValueError with recycling. Here it runs
#: without; recycling on a hybrid LLM is proven on an 8-layer model in tests/methods/test_sparsevlm_policy.py.
FAMILY_SPECS = {("sparsevlm", f): SPECS["sparsevlm"] + ",recycle=False" for f in HYBRID_FAMILIES}
UNSUPPORTED = {
    ("pitome", "llava_next"): "supported: llava",
    ("pitome", "qwen2_vl"): "use at='P'",
    ("pitome", "qwen2_5_vl"): "use at='P'",
    ("pitome-p", "llava_next"): "LLaVA-NeXT is not supported",
    ("globalcom2", "llava"): "single view",
    ("globalcom2", "llava_dinov2"): "single view",
    ("globalcom2", "qwen2_vl"): "defined for LLaVA-NeXT",
    ("globalcom2", "qwen2_5_vl"): "defined for LLaVA-NeXT",
    ("pitome", "llava_onevision"): "use at='P'",
    ("globalcom2", "llava_onevision"): "no CLS token.*allow_experimental=True",
    ("pitome", "llava_onevision1_5"): "use at='P'",
    ("globalcom2", "llava_onevision1_5"): "allow_experimental=True",
    **{("pitome", f): "use at='P'" for f in QWEN3_FAMILIES},
    **{("downsample", f): "defined for LLaVA-1.5.*use 'pool'" for f in FAMILIES if f != "llava"},
    **{("globalcom2", f): "defined for LLaVA-NeXT" for f in QWEN3_FAMILIES},
}
QUESTIONS = ["what is it?", "a longer question about the picture here?"]
#: the rows: every family's tiny model, plus LLaVA-1.5 with a DINOv2 tower (the embedded default's layout)
MODELS = FAMILIES + tuple(VARIANTS)
SIZES = {"llava": None, "llava_dinov2": None, "llava_next": [(70, 112), (112, 84)], "qwen2_vl": [(70, 112), (112, 84)],
         "qwen2_5_vl": [(70, 112), (112, 84)], "llava_onevision": [(70, 112), (150, 160)],
         "llava_onevision1_5": [(70, 112), (112, 84)], **{f: [(70, 112), (112, 84)] for f in QWEN3_FAMILIES}}
GEN = dict(max_new_tokens=10, do_sample=False)
SUPPORTED = [(m, f) for m in SPECS for f in MODELS if (m, f) not in UNSUPPORTED]


def spec(method: str, family: str) -> str:
    return FAMILY_SPECS.get((method, family), SPECS[method])


def test_matrix_covers_every_registered_method():
    assert set(SPECS) == set(registered()), "add new methods to the conformance matrix"


@functools.lru_cache(maxsize=None)
def _model(family: str, attn: str):
    return BUILDERS[family](attn_implementation=attn)


def _inputs(family: str, attn: str, n: int, first: int = 0):
    model, proc = _model(family, attn)
    sizes = SIZES[family]
    imgs = tiny_images(2, sizes=sizes)[first : first + n]
    return model, make_inputs(VARIANTS.get(family, family), proc, QUESTIONS[first : first + n], imgs)


def _run(model, inp, spec):
    cap = {}
    hook = model.model.register_forward_pre_hook(lambda m, a, k: cap.update(k), with_kwargs=True)
    try:
        with vtprune.patch(model, spec, seed=0) as h, torch.no_grad():
            logits = model(**inp).logits[:, -1].float()
            feats = cap.get("mm_encoder_outputs", {}).get("image")
            feats = list(feats.pooler_output) if feats is not None else None
            gen = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
            policies = list(h.policies)
    finally:
        hook.remove()
    return logits, gen, h.stats, feats, policies


def _oracle(model, family, inp, stats, feats, policies):
    """Logits and generated ids of the slow, obviously-correct computation for these policies."""
    family = VARIANTS.get(family, family)
    stage_d = [p for p in policies if isinstance(p, DecoderPolicy)]
    before = [p for p in policies if not isinstance(p, DecoderPolicy)]
    n = model.model.language_model.config.num_hidden_layers
    if len({l for p in stage_d for l in p.pruning_layers(n)}) > 1:
        return None  # multi-stage in-LLM pruning: stage-by-stage oracle in tests/methods
    positions = "original" if family.startswith("qwen") else "renumber"
    kept = stats.kept_index_per_image
    short = shortened_inputs(model, family, inp, kept, positions=positions)
    merged = any(isinstance(p, (MergePolicy, VisionPolicy)) for p in before)
    if merged:  # the features the patch produced, placed through the slow path
        set_features(short, feats)
    if not stage_d:
        with torch.no_grad():
            logits = last_logits(model(**short).logits)
            gen = model.generate(**short, **GEN)[:, short["input_ids"].shape[1]:]
        return logits, gen
    layer = stage_d[0].pruning_layers(n)[0]
    keep = torch.zeros_like(short["attention_mask"], dtype=torch.bool)
    idx = stats.llm_kept_index
    if idx is None:  # nothing was dropped in the LLM
        keep = short["attention_mask"].bool()
    else:
        for b in range(idx.shape[0]):
            keep[b, idx[b][idx[b] >= 0]] = True
    return stage_d_reference(model, family, short, layer, keep, GEN["max_new_tokens"])


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,family", SUPPORTED)
def test_method_family_satisfies_oracle(method, family, attn, n):
    model, inp = _inputs(family, attn, n)
    impls = {name: m.config._attn_implementation for name, m in model.named_modules() if hasattr(m, "config")}
    logits, gen, stats, feats, policies = _run(model, inp, spec(method, family))
    # no method switches any sub-model's attention implementation (signals are recomputed rows)
    assert impls == {name: m.config._attn_implementation for name, m in model.named_modules() if hasattr(m, "config")}
    assert len(stats.schedules) == n
    for s in stats.schedules:  # text is never dropped, visual tokens never grow
        text = s.llm_tokens_per_layer[0] - s.visual_tokens_per_layer[0]
        assert all(t - v == text for t, v in zip(s.llm_tokens_per_layer, s.visual_tokens_per_layer))
        assert all(b <= a for a, b in zip(s.visual_tokens_per_layer, s.visual_tokens_per_layer[1:]))
    for k in stats.kept_index_per_image:
        assert torch.unique(k).numel() == k.numel()
    assert all(o <= i for o, i in zip(stats.visual_tokens_per_image, stats.visual_tokens_in_per_image))
    ref = _oracle(model, family, inp, stats, feats, policies)
    if ref is None:
        pytest.skip("multi-stage in-LLM pruning: stage-by-stage oracles in tests/methods/test_<method>_policy.py")
    torch.testing.assert_close(logits, ref[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, ref[1])


@pytest.mark.parametrize("method,family", SUPPORTED)
def test_batch_with_padding_equals_each_alone(method, family):
    model, inp = _inputs(family, "sdpa", 2)
    singles = [_inputs(family, "sdpa", 1, first=i)[1] for i in range(2)]
    assert_inputs_batch_equals_alone(model, inp, singles, spec(method, family))


@pytest.mark.parametrize("method,family", SUPPORTED)
def test_sdpa_and_eager_select_the_same_tokens(method, family):
    out = {}
    for attn in ("sdpa", "eager"):
        model, inp = _inputs(family, attn, 2)
        out[attn] = _run(model, inp, spec(method, family))
    (ls, gs, ss, _, _), (le, ge, se, _, _) = out["sdpa"], out["eager"]
    assert [k.tolist() for k in ss.kept_index_per_image] == [k.tolist() for k in se.kept_index_per_image]
    assert (ss.llm_kept_index is None) == (se.llm_kept_index is None)
    if ss.llm_kept_index is not None:
        assert torch.equal(ss.llm_kept_index, se.llm_kept_index)
    torch.testing.assert_close(ls, le, rtol=1e-4, atol=1e-5)
    assert torch.equal(gs, ge)


@pytest.mark.parametrize("method,family", sorted(UNSUPPORTED))
def test_unsupported_combination_raises_clearly(method, family):
    model, _ = _inputs(family, "sdpa", 1)
    with pytest.raises(ValueError, match=UNSUPPORTED[(method, family)]):
        vtprune.patch(model, spec(method, family))
    assert not hasattr(model, "_vtprune_patch")


@pytest.mark.parametrize("method,family", SUPPORTED)
def test_deterministic_for_a_fixed_seed(method, family):
    model, inp = _inputs(family, "sdpa", 2)
    runs = []
    for _ in range(2):
        with vtprune.patch(model, spec(method, family), seed=7) as h, torch.no_grad():
            logits = model(**inp).logits[:, -1]
        runs.append((logits, [k.tolist() for k in h.stats.kept_index_per_image], h.stats.llm_kept_index))
    (l1, k1, d1), (l2, k2, d2) = runs
    assert k1 == k2 and torch.equal(l1, l2)
    assert (d1 is None and d2 is None) or torch.equal(d1, d2)
