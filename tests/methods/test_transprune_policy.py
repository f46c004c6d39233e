"""TransPrune policy (stage D) on tiny models of all four families (4-layer LLMs, so the tests pass
explicit layers: prune after 1-based layers 1, 2, 3; accumulation layers 1..3).

Two oracles, one per position convention:

* ``positions="original"`` (Qwen default; LLaVA option): the *unpatched* model, full length and
  original positions, with pre-hooks that hide the dropped keys from each pruning layer on
  (``oracles.masked_run``, one per stage). The dropped sets are computed independently of the hook
  layer, stage by stage, on an eager copy (same weights) run with the masks of the earlier stages: TTV
  with the pure kernel from the ``self_attn``/``mlp`` inputs and outputs of the surviving tokens, IGA
  from ``output_attentions`` of the pruning layer (rows after the image, image columns), the selection
  with :func:`transprune_select`.
* ``positions="renumber"`` (LLaVA/LLaVA-NeXT default, the reference): an explicit layer-by-layer run
  of the eager copy's own decoder modules (:func:`explicit_renumbered_run`): layers 0..p-1 on the full
  sequence, the kept rows gathered before 0-based layer p, every later layer run with contiguous
  positions ``arange(L')`` and cos/sin from the model's own ``rotary_emb``; TTV from the modules'
  inputs/outputs, IGA from the eager attention weights of layer p on the pre-prune sequence. Cached
  generation is compared with a no-cache re-run of the same explicit run on prompt + generated tokens
  with the prefill's selection (so a decode token in a layer after ``p_s`` sits at ``L' + t``).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import vtprune
from vtprune.methods import transprune as TP
from vtprune.testing import FAMILIES, HYBRID_FAMILIES, make_inputs, prompt_for, tiny_images

from _staged_oracle import causal_mask, last_full_attention_layer, layer0_input, shortened_attention
from helpers import GEN, assert_batch_equals_alone, batch, tiny
from oracles import last_logits, masked_run

ATTN = ["sdpa", "eager"]
TINY = dict(prune_layers=(1, 2, 3), keep_ratios=(0.75, 0.5, 0.25))
LLAVA = ("llava", "llava_next", "llava_onevision", "llava_onevision1_5")  # 1-D positions, renumbered by default


def oracle_keeps(family: str, inp, *, prune=(1, 2, 3), ratios=(0.75, 0.5, 0.25), accum=(1, 2, 3),
                 alpha=0.5, score="both", details: list | None = None) -> list[torch.Tensor]:
    """Per stage, the (L,) bool mask of the LLM-input tokens alive after that stage (batch size 1).

    ``details`` (optional list) receives per stage ``(image positions, accumulated TTV, IGA)``.
    """
    model, _ = tiny(family, "eager")
    ids = inp["input_ids"][0]
    L = ids.numel()
    visual = ids == model.config.image_token_id
    n0 = int(visual.sum())
    pos = torch.arange(L)
    layers = model.model.language_model.layers
    keeps: list[torch.Tensor] = []

    def alive_at(layer: int) -> torch.Tensor:  # tokens present in 0-based layer ``layer``
        a = torch.ones(L, dtype=torch.bool)
        for p, k in zip(prune, keeps):
            if layer >= p:
                a = k
        return a

    for s, p in enumerate(prune):
        io: dict = {}
        hooks = []
        for a in accum:
            l = a - 1
            hooks.append(layers[l].self_attn.register_forward_hook(
                lambda m, args, kw, out, l=l: io.__setitem__(("attn", l), (kw["hidden_states"], out[0])), with_kwargs=True))
            hooks.append(layers[l].mlp.register_forward_hook(
                lambda m, args, out, l=l: io.__setitem__(("mlp", l), (args[0], out))))
        with contextlib.ExitStack() as stack, torch.no_grad():
            for t in range(s):
                stack.enter_context(masked_run(model, prune[t], keeps[t][None]))
            out = model(**inp, output_attentions=True)
        for h in hooks:
            h.remove()
        alive = alive_at(p - 1)
        img = torch.nonzero(visual & alive).flatten()
        t_acc = torch.zeros(L)
        for a in accum:
            l = a - 1
            if l < p:
                keep_l = alive_at(l)
                for kind in ("attn", "mlp"):
                    x_in, x_out = io[(kind, l)]
                    t_acc[keep_l] += TP.ttv(x_in[:, keep_l], x_out[:, keep_l])[0]
        att = out.attentions[p][0].float().mean(0)  # (L, L) head mean of 0-based layer p (= 1-based p + 1)
        rows = alive & (pos > int(img.max()))
        iga = att[rows][:, img].mean(0) if rows.any() else torch.zeros(img.numel())
        if details is not None:
            details.append((img, t_acc[img], iga))
        a = {"both": alpha, "ttv": 1.0, "iga": 0.0}[score]
        quota = TP.stage_counts(n0, (ratios[s],))[1]
        local = TP.transprune_select(t_acc[img] if score != "iga" else torch.zeros(img.numel()),
                                     iga if score != "ttv" else torch.zeros(img.numel()), quota, a)
        new = alive.clone()
        new[img] = False
        new[img[local]] = True
        keeps.append(new)
    return keeps


def explicit_renumbered_run(family: str, inp, *, keeps=None, n_prompt=None, prune=(1, 2, 3),
                            ratios=(0.75, 0.5, 0.25), accum=(1, 2, 3), alpha=0.5, score="both"):
    """The reference's renumbered TransPrune, run layer by layer with the eager copy's own modules.

    Batch size 1, no padding. Before 0-based layer ``p`` (= after 1-based layer p) the image tokens are
    cut (selected here from TTV + IGA, or taken from ``keeps``) and every later layer runs on the
    gathered rows with positions ``arange(L')``. ``keeps`` (per stage, (n_prompt,) bool over the prompt)
    replays a selection on ``inp`` = prompt + generated tokens (those are always kept).
    Returns ``(last logits (1, V), keeps, details)``; details per stage = (image positions, accumulated
    TTV, IGA).
    """
    model, _ = tiny(family, "eager")
    lm = model.model.language_model
    ids = inp["input_ids"][0]
    L = ids.numel()
    n_prompt = L if n_prompt is None else n_prompt
    visual = ids == model.config.image_token_id
    n0 = int(visual.sum())
    h = layer0_input(model, inp)
    alive = torch.arange(L)  # LLM-input index of every current row
    ttv_at: dict[int, torch.Tensor] = {}  # 0-based layer -> (L,) TTV in LLM-input coordinates
    new_keeps, details = [], []

    def tables(x):
        pos = torch.arange(x.shape[1])[None]  # contiguous (renumbered) positions
        return pos, lm.rotary_emb(x, pos), causal_mask(model, x.shape[1], x.dtype)

    with torch.no_grad():
        for l, layer in enumerate(lm.layers):
            if l in prune:
                s = prune.index(l)
                if keeps is None:
                    pos, rope, mask = tables(h)
                    _, w = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=rope,
                                           attention_mask=mask)
                    att = w[0].float().mean(0)  # (L', L') head mean of layer p on the pre-prune sequence
                    img = torch.nonzero(visual[alive]).flatten()
                    rows = torch.arange(alive.numel()) > int(img.max())
                    iga = att[rows][:, img].mean(0)
                    t_acc = torch.zeros(img.numel())
                    for a in accum:
                        if a - 1 < l:
                            t_acc += ttv_at[a - 1][alive[img]]
                    details.append((alive[img], t_acc, iga))
                    a_w = {"both": alpha, "ttv": 1.0, "iga": 0.0}[score]
                    quota = TP.stage_counts(n0, (ratios[s],))[1]
                    local = TP.transprune_select(t_acc if score != "iga" else torch.zeros(img.numel()),
                                                 iga if score != "ttv" else torch.zeros(img.numel()), quota, a_w)
                    keep_cur = torch.ones(alive.numel(), dtype=torch.bool)
                    keep_cur[img] = False
                    keep_cur[img[local]] = True
                    full = torch.zeros(L, dtype=torch.bool)
                    full[alive[keep_cur]] = True
                    new_keeps.append(full)
                else:
                    k = torch.ones(L, dtype=torch.bool)
                    k[:n_prompt] = keeps[s]
                    keep_cur = k[alive]
                h, alive = h[:, keep_cur], alive[keep_cur]
            pos, rope, mask = tables(h)
            io = {}
            hooks = []
            if l + 1 in accum:
                hooks.append(layer.self_attn.register_forward_hook(
                    lambda m, a, kw, out: io.__setitem__("attn", (kw["hidden_states"], out[0])), with_kwargs=True))
                hooks.append(layer.mlp.register_forward_hook(lambda m, a, out: io.__setitem__("mlp", (a[0], out))))
            try:
                h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            finally:
                for hk in hooks:
                    hk.remove()
            h = h[0] if isinstance(h, tuple) else h
            if io:
                t = torch.zeros(L)
                t[alive] = (TP.ttv(*io["attn"]) + TP.ttv(*io["mlp"]))[0]
                ttv_at[l] = t
        logits = model.lm_head(lm.norm(h)[:, -1:]).float()[:, -1]
    return logits, (new_keeps if keeps is None else keeps), details


def no_cache_generate(family: str, inp, keeps, n_new: int = 10):
    """Greedy tokens and per-step logits of the explicit renumbered run re-run from scratch at every
    step on prompt + generated tokens, replaying the prefill's selection ``keeps``."""
    ids = inp["input_ids"]
    n_prompt = ids.shape[1]
    tokens, logits = [], []
    for _ in range(n_new):
        cur = torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype)], 1) if tokens else ids
        step = dict(inp, input_ids=cur, attention_mask=torch.ones_like(cur))
        lg, _, _ = explicit_renumbered_run(family, step, keeps=keeps, n_prompt=n_prompt)
        logits.append(lg)
        tokens.append(int(lg.argmax(-1)))
    return tokens, logits


@contextlib.contextmanager
def masked_stages(model, prune, keeps):
    with contextlib.ExitStack() as stack:
        for p, k in zip(prune, keeps):  # registered in stage order: the last applicable hook wins
            stack.enter_context(masked_run(model, p, k[None]))
        yield


def recording(pol: TP.TransPrune, log: list) -> TP.TransPrune:
    """Wrap ``pol.select`` to log (layer, image positions, accumulated TTV, IGA, kept positions)."""
    select = pol.select

    def wrapped(layer, view, ctx):
        kept = select(layer, view, ctx)
        vis = view.visual
        t_acc = sum(view.signals[f"{k}@{l}"] for k in ("attn_io", "mlp_io") for l in range(layer))
        log.append((layer, view.original_index[vis], t_acc[vis], view.signals[f"post_visual_rows@{layer}"][vis],
                    view.original_index[kept]))
        return kept

    pol.select = wrapped
    return pol


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in HYBRID_FAMILIES])  # a mask cannot hide a
def test_physical_removal_equals_mask_run(family, attn):  # token from a Gated DeltaNet layer (see test_conformance)
    """Original positions (Qwen default; LLaVA option) == the unpatched model with masked keys."""
    model, inp = batch(family, n=1, attn=attn, first=1)
    log: list = []
    params = dict(TINY, positions="original") if family in LLAVA else TINY
    with vtprune.patch(model, recording(TP.TransPrune(**params), log)) as h:
        with torch.no_grad():
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
        kept_last = h.stats.llm_kept_index
        sched = h.stats.schedules[0]
    details: list = []
    keeps = oracle_keeps(family, inp, details=details)
    # the signals themselves equal the eager recomputation (TTV from module I/O, IGA = output_attentions)
    assert [entry[0] for entry in log] == [1, 2, 3] * 2  # forward, then generate's prefill
    assert all(torch.equal(a[-1], b[-1]) for a, b in zip(log[:3], log[3:]))
    for (layer, img, t_acc, iga, kept), (o_img, o_t, o_iga), keep in zip(log[:3], details, keeps):
        assert img.tolist() == o_img.tolist()
        torch.testing.assert_close(t_acc.float(), o_t, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(iga.float(), o_iga, rtol=1e-4, atol=1e-7)
        assert kept.tolist() == torch.nonzero(keep & (inp["input_ids"][0] == model.config.image_token_id)).flatten().tolist()
    n0 = int((inp["input_ids"] == model.config.image_token_id).sum())
    expect = list(TP.stage_counts(n0, TINY["keep_ratios"]))
    assert sched.visual_tokens_per_layer == expect  # layer 0 full, then one stage per layer
    assert kept_last[0].tolist() == torch.nonzero(keeps[-1]).flatten().tolist()
    with masked_stages(model, TINY["prune_layers"], keeps), torch.no_grad():
        ref = model(**inp).logits
        gref = model.generate(**inp, **GEN)
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_physical_removal_equals_physically_shortened_stages(family):
    """Qwen3.5 (Gated DeltaNet + full attention): the three stages == the unpatched model's own layers run
    with the sequence physically shortened at each stage (a mask cannot hide a token from a linear
    layer). IGA rows come from the last full-attention layer at or before each pruning layer, as it runs
    (checked against its eager attention in the physically shortened run of the earlier stages)."""
    from oracles import physically_shortened_run

    model, inp = batch(family, n=1, first=1)
    log: list = []
    with vtprune.patch(model, recording(TP.TransPrune(**TINY), log)) as h:
        with torch.no_grad():
            out = last_logits(model(**inp).logits)
            gen = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
    assert [entry[0] for entry in log[:3]] == [1, 2, 3]
    n0 = int((inp["input_ids"] == model.config.image_token_id).sum())
    assert h.stats.schedules[0].visual_tokens_per_layer == list(TP.stage_counts(n0, TINY["keep_ratios"]))
    text = inp["attention_mask"][0].bool() & (inp["input_ids"][0] != model.config.image_token_id)
    stages = {}
    eager, _ = tiny(family, "eager")
    for layer, img, _, iga, kept in log[:3]:
        # IGA == the eager attention of the last full-attention layer at or before this one, as it runs in
        # the physically shortened run of the earlier stages (after its own cut when it is itself one)
        probs, cols, _ = shortened_attention(eager, inp, dict(stages), last_full_attention_layer(eager, layer))
        visual = inp["input_ids"][0, cols] == model.config.image_token_id
        rows = torch.arange(cols.numel()) > int(torch.nonzero(visual).max())
        want = probs.mean(0)[rows].mean(0)[torch.searchsorted(cols, img)]
        torch.testing.assert_close(iga.float(), want, rtol=1e-4, atol=1e-7)
        keep = text.clone()
        keep[kept] = True
        stages[layer] = keep[None]
    ref, gref = physically_shortened_run(model, inp, stages, None, GEN["max_new_tokens"])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", LLAVA)
def test_renumbered_equals_explicit_layer_run(family, attn):
    """LLaVA default (reference): renumbered positions == the explicit layer-by-layer run; cached
    generate(10) == the no-cache re-run applying the same selection and renumbering."""
    model, inp = batch(family, n=1, attn=attn, first=1)
    log: list = []
    pol = recording(TP.TransPrune(**TINY), log)
    assert pol.positions == "auto" and pol.resolved_positions(family) == "renumber"
    with vtprune.patch(model, pol) as h:
        with torch.no_grad():
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN, output_logits=True, return_dict_in_generate=True)
        sched = h.stats.schedules[0]
    ref, keeps, details = explicit_renumbered_run(family, inp)
    assert [entry[0] for entry in log] == [1, 2, 3] * 2
    for (layer, img, t_acc, iga, kept), (o_img, o_t, o_iga), keep in zip(log[:3], details, keeps):
        assert img.tolist() == o_img.tolist()
        torch.testing.assert_close(t_acc.float(), o_t, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(iga.float(), o_iga, rtol=1e-4, atol=1e-6)
        assert kept.tolist() == torch.nonzero(keep & (inp["input_ids"][0] == model.config.image_token_id)).flatten().tolist()
    n0 = int((inp["input_ids"] == model.config.image_token_id).sum())
    assert sched.visual_tokens_per_layer == list(TP.stage_counts(n0, TINY["keep_ratios"]))
    torch.testing.assert_close(last_logits(out), ref, rtol=1e-4, atol=1e-5)
    # the renumbered run differs from the original-position one (the convention matters here)
    with vtprune.patch(model, "transprune", **TINY, positions="original"), torch.no_grad():
        orig = model(**inp).logits
    assert not torch.allclose(last_logits(orig), ref, rtol=1e-5, atol=1e-5)
    tokens, step_logits = no_cache_generate(family, inp, keeps, GEN["max_new_tokens"])
    assert gen.sequences[0, inp["input_ids"].shape[1]:].tolist() == tokens
    for got, want in zip(gen.logits, step_logits):
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("score", ["ttv", "iga"])
def test_ttv_only_and_iga_only_modes(score):
    model, inp = batch("llava", n=1, first=1)
    selections = []
    pol = TP.TransPrune(**TINY, score=score)
    select = pol.select
    pol.select = lambda layer, view, ctx: selections.append(view.original_index[s := select(layer, view, ctx)]) or s
    with vtprune.patch(model, pol) as h:
        with torch.no_grad():
            out = model(**inp).logits
    ref, keeps, _ = explicit_renumbered_run("llava", inp, score=score)
    img = inp["input_ids"][0] == model.config.image_token_id
    for sel, keep in zip(selections, keeps):
        assert sel.tolist() == torch.nonzero(keep & img).flatten().tolist()
    torch.testing.assert_close(last_logits(out), ref, rtol=1e-4, atol=1e-5)
    if score == "ttv":
        assert h.stats.schedules[0].visual_tokens_per_layer == [16, 12, 8, 4]


def test_high_schedule_counts_and_accumulation_default():
    pol = TP.TransPrune(prune_layers=(1, 2, 3))
    assert pol._accum() == (1, 2, 3) and TP.TransPrune()._accum() == (7, 8, 9, 10, 11, 12)
    assert pol.pruning_layers(4) == [1, 2, 3] and pol.prune_layers == (1, 2, 3)
    model, inp = batch("llava", n=2)
    with vtprune.patch(model, pol) as h, torch.no_grad():
        model(**inp)
    assert [s.visual_tokens_per_layer for s in h.stats.schedules] == [[16, 14, 10, 2]] * 2  # int(16 * r)
    spec = vtprune.registry.build("transprune", {"prune_layers": "1/2/3", "keep_ratios": "0.5/0.25/0.125"})
    assert spec.prune_layers == (1, 2, 3) and spec.keep_ratios == (0.5, 0.25, 0.125)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_keep_ratios_one_equals_unpatched(family):
    model, inp = batch(family, n=2)
    with torch.no_grad():
        ref = model(**inp).logits
        gref = model.generate(**inp, **GEN)
        with vtprune.patch(model, "transprune", prune_layers=(1, 2, 3), keep_ratios=(1.0, 1.0, 1.0)):
            out = model(**inp).logits
            gen = model.generate(**inp, **GEN)
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


@pytest.mark.parametrize("family,attn", [(f, "sdpa") for f in FAMILIES] + [("llava", "eager"), ("qwen2_5_vl", "eager")])
def test_batch_equals_each_alone(family, attn):
    assert_batch_equals_alone(family, "transprune", attn=attn, first=1, **TINY)  # LLaVA: renumbered (default)


@pytest.mark.parametrize("family", LLAVA)
def test_batch_equals_each_alone_original_positions(family):
    assert_batch_equals_alone(family, "transprune", attn="sdpa", first=1, **TINY, positions="original")


# ------------------------------------------------------------------ decode offsets (spec recipe 4)
def llava_576(n_layers: int = 32):
    """A LLaVA-1.5-shaped model with the real geometry (336 px, 576 image tokens, 32 LLM layers) and
    tiny widths, and its processor."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vtprune.testing import _clip_config, _image_processor_clip, _llama_config, byte_tokenizer

    tok = byte_tokenizer(["<image>"])
    cfg = LlavaConfig(vision_config=_clip_config(image_size=336, num_hidden_layers=2),
                      text_config=_llama_config(len(tok), num_hidden_layers=n_layers),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    proc = LlavaProcessor(image_processor=_image_processor_clip(336), tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=None)
    proc.num_image_tokens = 576
    return model, proc


def first_decode_positions(model, inp, method, **params):
    """Per decoder layer: the prefill position ids and the position id of the first decode token,
    captured by pre-hooks that run after the patch's own; also checks each layer's cos/sin equal the
    model's rotary tables for those positions."""
    lm = model.model.language_model
    seen: list[list] = [[] for _ in lm.layers]

    def grab(l, m, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        pid = kwargs["position_ids"]
        cos, sin = kwargs["position_embeddings"]
        rc, rs = lm.rotary_emb(hidden, pid)
        torch.testing.assert_close((cos, sin), (rc, rs), rtol=0, atol=1e-6)
        seen[l].append(pid.clone())

    with vtprune.patch(model, method, **params):
        hooks = [layer.register_forward_pre_hook(lambda m, a, k, l=l: grab(l, m, a, k), with_kwargs=True)
                 for l, layer in enumerate(lm.layers)]
        try:
            with torch.no_grad():
                model.generate(**inp, max_new_tokens=2, do_sample=False)
        finally:
            for hk in hooks:
                hk.remove()
    return [s[0] for s in seen], [s[1] for s in seen]


def test_decode_offsets_recipe_576():
    """Spec recipe 4: L_full = 651, n_0 = 576, High schedule: the first decode token sees positions
    651 / 579 / 435 / 147 in layers 1-7 / 8-9 / 10-12 / 13-32 (1-based); the prefill of those layers is
    numbered arange(651 / 579 / 435 / 147)."""
    from PIL import Image

    model, proc = llava_576()
    question = "q" * 57  # USER: <image>\n{57} ASSISTANT: -> 75 text tokens + 576 image tokens
    img = Image.fromarray(torch.randint(0, 255, (336, 336, 3), generator=torch.Generator().manual_seed(0),
                                        dtype=torch.uint8).numpy())
    inp = make_inputs("llava", proc, [question], [img])
    assert inp["input_ids"].shape[1] == 651
    assert int((inp["input_ids"] == model.config.image_token_id).sum()) == 576
    prefill, decode = first_decode_positions(model, inp, "transprune")
    offsets = TP.decode_offsets(576)
    want = [651] * 7 + [579] * 2 + [435] * 3 + [147] * 20
    assert [651 + o for o in offsets] == want
    assert [int(p.flatten()) for p in decode] == want
    assert [p.tolist() for p in prefill] == [[list(range(n))] for n in want]
    # original positions (our extension): no offsets; the gathered positions keep their gaps
    prefill_o, decode_o = first_decode_positions(model, inp, "transprune", positions="original")
    assert [int(p.flatten()) for p in decode_o] == [651] * 32
    assert prefill_o[12].shape[-1] == 147 and int(prefill_o[12].max()) == 650


def test_decode_positions_per_sample_with_left_padding():
    """Batch of 2 (left padded, different image-token cuts): each sample's layers continue at its
    own renumbered length; padding never shifts a sample's numbering."""
    model, inp = batch("llava", n=2, first=1)
    mask = inp["attention_mask"]
    prefill, decode = first_decode_positions(model, inp, "transprune", **TINY)
    n_real = mask.sum(-1)
    n0 = int((inp["input_ids"][0] == model.config.image_token_id).sum())
    counts = TP.stage_counts(n0, TINY["keep_ratios"])
    for l, d in enumerate(decode):
        removed = n0 - counts[min(l, 3)]
        assert d[:, 0].tolist() == (n_real - removed).tolist()
    for l in (1, 2, 3):  # prefill: contiguous over the real tokens, 0 on padding
        removed = n0 - counts[l]
        p = prefill[l]
        for i in range(2):
            n = int(n_real[i]) - removed
            assert p[i, p.shape[1] - n:].tolist() == list(range(n))
            assert not bool(p[i, : p.shape[1] - n].any())


def test_two_images_per_sample_get_per_image_quotas():
    model, proc = tiny("llava")
    inp = proc(text=[prompt_for("llava", "compare them", n_images=2)], images=tiny_images(2), return_tensors="pt")
    selections = []
    pol = TP.TransPrune(**TINY)
    select = pol.select
    pol.select = lambda layer, view, ctx: selections.append((view.image_id, s := select(layer, view, ctx))) or s
    with vtprune.patch(model, pol) as h, torch.no_grad():
        model(**inp)
    assert h.stats.schedules[0].visual_tokens_per_layer == [32, 24, 16, 8]
    for (image_id, sel), per_image in zip(selections, (12, 8, 4)):
        assert torch.bincount(image_id[sel], minlength=2).tolist() == [per_image, per_image]


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "params,match",
    [
        ({}, r"prune_layers=\(7, 9, 12\) must lie in 1..3"),
        ({"prune_layers": (1, 2, 3), "positions": "contiguous"}, "positions='contiguous'"),
        ({"prune_layers": (1, 2), "keep_ratios": (0.5,)}, "one ratio per prune layer"),
        ({"prune_layers": (2, 1), "keep_ratios": (0.5, 0.25)}, "strictly increasing"),
        ({"prune_layers": (1, 2, 3), "keep_ratios": (0.5, 0, 0.1)}, r"must lie in \(0, 1\]"),
        ({"prune_layers": (1, 2, 3), "accum_layers": (0, 1)}, "accum_layers"),
        ({"prune_layers": (1, 2, 3), "score": "ttv-iga"}, "score='ttv-iga'"),
        ({"prune_layers": (1, 2, 3), "ttv_norm_scope": "global"}, "ttv_norm_scope='global'"),
        ({"prune_layers": (1, 2, 3), "alpha": 2.0}, "alpha=2.0"),
        ({"prune_layers": (1, 2, 3), "keep": 0.5}, "use prune_layers"),
        ({"prune_layers": "1/x/3"}, "numbers separated by '/'"),
    ],
)
def test_bad_settings_raise(params, match):
    model, _ = batch("llava", n=1)
    with pytest.raises(ValueError, match=match):
        vtprune.patch(model, "transprune", **params)
    assert not hasattr(model, "_vtprune_patch")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_positions(family):
    """Qwen: "auto" resolves to the original M-RoPE positions; contiguous renumbering is refused."""
    model, _ = batch(family, n=1)
    assert TP.TransPrune(**TINY).resolved_positions(family) == "original"
    assert TP.TransPrune(**TINY).position_handling(4, family) == {1: "original", 2: "original", 3: "original"}
    with pytest.raises(ValueError, match="positions='renumber' is defined for LLaVA"):
        vtprune.patch(model, "transprune", **TINY, positions="renumber")
    assert not hasattr(model, "_vtprune_patch")

