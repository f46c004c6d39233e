"""TransPrune policy (stage D) on tiny models of all four families (4-layer LLMs, so the tests pass
explicit layers: prune after 1-based layers 1, 2, 3; accumulation layers 1..3).

Oracle: the *unpatched* model, full length and original positions, with pre-hooks that hide the
dropped keys from each pruning layer on (``oracles.masked_run``, one per stage). The dropped sets are
computed independently of the hook layer, stage by stage, on an eager copy (same weights) run with
the masks of the earlier stages: TTV with the pure kernel from the ``self_attn``/``mlp`` inputs and
outputs of the surviving tokens, IGA from ``output_attentions`` of the pruning layer (rows after the
image, image columns), the selection with :func:`transprune_select`.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import vtprune
from vtprune.methods import transprune as TP
from vtprune.testing import FAMILIES, prompt_for, tiny_images

from _policy_cases import GEN, assert_batch_equals_alone, batch, model_and_proc
from oracles import last_logits, masked_run

ATTN = ["sdpa", "eager"]
TINY = dict(prune_layers=(1, 2, 3), keep_ratios=(0.75, 0.5, 0.25))


def oracle_keeps(family: str, inp, *, prune=(1, 2, 3), ratios=(0.75, 0.5, 0.25), accum=(1, 2, 3),
                 alpha=0.5, score="both", details: list | None = None) -> list[torch.Tensor]:
    """Per stage, the (L,) bool mask of the LLM-input tokens alive after that stage (batch size 1).

    ``details`` (optional list) receives per stage ``(image positions, accumulated TTV, IGA)``.
    """
    model, _ = model_and_proc(family, "eager")
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
@pytest.mark.parametrize("family", FAMILIES)
def test_physical_removal_equals_mask_run(family, attn):
    model, inp = batch(family, n=1, attn=attn, start=1)
    log: list = []
    with vtprune.patch(model, recording(TP.TransPrune(**TINY), log)) as h:
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


@pytest.mark.parametrize("score", ["ttv", "iga"])
def test_ttv_only_and_iga_only_modes(score):
    model, inp = batch("llava", n=1, start=1)
    selections = []
    pol = TP.TransPrune(**TINY, score=score)
    select = pol.select
    pol.select = lambda layer, view, ctx: selections.append(view.original_index[s := select(layer, view, ctx)]) or s
    with vtprune.patch(model, pol) as h:
        with torch.no_grad():
            out = model(**inp).logits
    keeps = oracle_keeps("llava", inp, score=score)
    img = inp["input_ids"][0] == model.config.image_token_id
    for sel, keep in zip(selections, keeps):
        assert sel.tolist() == torch.nonzero(keep & img).flatten().tolist()
    with masked_stages(model, TINY["prune_layers"], keeps), torch.no_grad():
        ref = model(**inp).logits
    torch.testing.assert_close(last_logits(out), last_logits(ref), rtol=1e-5, atol=1e-5)
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
    assert_batch_equals_alone(family, attn, "transprune", **TINY)


def test_two_images_per_sample_get_per_image_quotas():
    model, proc = model_and_proc("llava")
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
        ({"prune_layers": (1, 2, 3), "positions": "renumber"}, "positions='renumber'.*not implemented"),
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

