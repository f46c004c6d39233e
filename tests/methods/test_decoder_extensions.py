"""Hook-layer extensions used by the in-LLM methods, tested on their own with minimal policies:

* recycled tokens (``DecoderSelection``): a recycled token takes the slot of a dropped visual token;
  - at its slot, original positions: oracle = the *unpatched* model where that slot's hidden state is
    replaced at the pruning layer and the other dropped keys are masked from that layer on, or on the
    hybrid Qwen3.5 the physically shortened run with the slot's state replaced (every family, SDPA and
    eager, batch of 2 with left padding, cached ``generate``);
  - after an anchor with renumbered positions (LLaVA): oracle = the explicit layer-by-layer run;
  - on Qwen3-VL it gets its slot's DeepStack rows at the levels added after the pruning layer;
* the policy-defined signal kinds: ``hidden_reduce`` sees the layer input; ``policy_rows`` gives the
  head-wise attention of the chosen rows (== eager ``output_attentions``) and is computed on the
  sequence the layer runs on, after that layer's own pruning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.policy import DecoderPolicy, DecoderSelection
from vtprune.testing import FAMILIES, HYBRID_FAMILIES

from helpers import GEN, batch, tiny
from _staged_oracle import Decision, explicit_run, replaced_rows
from oracles import last_logits, masked_run, physically_shortened_run


@dataclass
class MeanRecycler(DecoderPolicy):
    """At ``layer`` keep the first half of the visual tokens; the mean of the dropped ones is recycled
    into the last dropped slot (``anchor=True``: right after the last visual token instead)."""

    name: ClassVar[str] = "mean-recycler"
    layer: int = 2
    keep: float = 0.5
    anchor: bool = False
    renumber: bool = False

    def position_handling(self, num_layers, family):
        return {self.layer: "renumber" if self.renumber else "original"}

    def budget_view(self, view, layer):
        return int(view.visual.sum()) // 2

    def select(self, layer, view, ctx):
        vis = torch.nonzero(view.visual).flatten()
        k = vis.numel() // 2
        dropped = vis[k:]
        feat = view.hidden[dropped].mean(0, keepdim=True)
        return DecoderSelection(keep=vis[:k], recycled=feat, slots=dropped[-1:],
                                after=vis[-1:] if self.anchor else None)


def mean_recycler_plan(model, inp):
    """What :class:`MeanRecycler` does to ``inp``: ``(keep (B, L) bool: text, the first half of the visual
    tokens and the recycled token's slot; slots[b]: that slot, the sample's last visual token;
    dropped[b]: the visual tokens averaged into it)``."""
    ids, mask = inp["input_ids"], inp["attention_mask"].bool()
    visual = (ids == model.config.image_token_id) & mask
    keep = mask & ~visual
    slots, dropped = [], []
    for b in range(ids.shape[0]):
        vis = torch.nonzero(visual[b]).flatten()
        k = vis.numel() // 2
        keep[b, vis[:k]] = True
        keep[b, vis[-1]] = True  # the recycled token's slot
        slots.append(int(vis[-1]))
        dropped.append(vis[k:])
    return keep, slots, dropped


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_recycled_token_at_its_slot_equals_replaced_and_masked_run(family, attn):
    model, inp = batch(family, n=2, attn=attn, first=1)
    assert (inp["attention_mask"] == 0).any()
    with vtprune.patch(model, MeanRecycler()) as h, torch.no_grad():
        out = model(**inp).logits
        gen = model.generate(**inp, **GEN)
        sched = h.stats.schedules
    keep, slots, dropped = mean_recycler_plan(model, inp)
    for b in range(keep.shape[0]):  # half the visual tokens + the recycled one
        n_visual = int((inp["input_ids"][b] == model.config.image_token_id).sum())
        assert sched[b].visual_tokens_per_layer[2:] == [n_visual // 2 + 1] * 2
    if family in HYBRID_FAMILIES:  # a mask cannot hide a token from a Gated DeltaNet layer: physical removal
        def means(b, hid, cols):
            rows = [int(torch.nonzero(cols == c)) for c in dropped[b]]
            return {slots[b]: hid[rows].mean(0)}

        ref, gref = physically_shortened_run(model, inp, 2, keep, GEN["max_new_tokens"], replace={2: means})
    else:
        means = replaced_rows(model, 2, lambda hid: [(b, s, hid[b, d].mean(0)) for b, (s, d) in enumerate(zip(slots, dropped))])
        with means, masked_run(model, 2, keep), torch.no_grad():
            ref = last_logits(model(**inp).logits)
            gref = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
    torch.testing.assert_close(last_logits(out), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen[:, inp["input_ids"].shape[1]:], gref)


class slot_without_deepstack:
    """Context manager: the unpatched Qwen3-VL gets zeros instead of DeepStack level ``level``'s rows at the
    LLM-input positions ``cols[b]`` of each sample (a pre-hook on its language model)."""

    def __init__(self, model, level: int, cols: list[int]):
        self.lm, self.level, self.cols = model.model.language_model, level, cols

    def _hook(self, module, args, kwargs):
        vis, embeds = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if embeds is None:
            return None
        row = (vis.flatten().long().cumsum(0) - 1).view(vis.shape)  # row of each visual position in a level
        embeds = list(embeds)
        embeds[self.level] = embeds[self.level].clone()
        for b, c in enumerate(self.cols):
            embeds[self.level][row[b, c]] = 0
        kwargs["deepstack_visual_embeds"] = embeds
        return args, kwargs

    def __enter__(self):
        self.handle = self.lm.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_recycled_token_gets_its_slots_deepstack_rows(family):
    """Qwen3-VL: a recycled token is a merged visual token that takes its slot's identity, so the DeepStack
    levels added after the pruning layer add the slot's rows to it (as a stage-P merge takes its
    representative's rows). Pruning at layer 1 (the tiny model adds levels after layers 0 and 1): the
    oracle is the unpatched model with the slot's state replaced and the other dropped keys masked, where
    the model itself adds level 1 at the slot; giving the slot no level-1 row instead changes the run."""
    model, inp = batch(family, n=2, first=1)
    assert len(model.config.vision_config.deepstack_visual_indexes) == 2
    with vtprune.patch(model, MeanRecycler(layer=1)), torch.no_grad():
        out = last_logits(model(**inp).logits)
        gen = model.generate(**inp, **GEN)
    keep, slots, dropped = mean_recycler_plan(model, inp)
    fill = lambda hid: [(b, s, hid[b, d].mean(0)) for b, (s, d) in enumerate(zip(slots, dropped))]
    with replaced_rows(model, 1, fill), masked_run(model, 1, keep), torch.no_grad():
        ref = last_logits(model(**inp).logits)
        gref = model.generate(**inp, **GEN)
        with slot_without_deepstack(model, 1, slots):
            other = last_logits(model(**inp).logits)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    assert not torch.allclose(out, other, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_recycled_token_after_an_anchor_with_renumbering_equals_explicit_run(family):
    model, inp = batch(family, n=1, first=1)
    eager, _ = tiny(family, "eager")
    visual_in = inp["input_ids"][0] == model.config.image_token_id

    def decide(l, hid, index, tables, inputs):
        vis = torch.nonzero(visual_in[index]).flatten()
        k = vis.numel() // 2
        rows = [r for r in range(hid.shape[1]) if not visual_in[index[r]] or r in vis[:k].tolist()]
        at = sum(1 for r in rows if r <= int(vis[-1]))
        new_rows = rows[:at] + [int(vis[-1])] + rows[at:]
        return Decision(new_rows, index[torch.tensor(new_rows)].tolist(), {at: hid[0, vis[k:]].mean(0)})

    with vtprune.patch(model, MeanRecycler(anchor=True, renumber=True)) as h, torch.no_grad():
        out = model(**inp).logits
    ref, decisions = explicit_run(eager, inp, decide, (2,))
    assert h.stats.llm_kept_index[0].tolist() == decisions[0].index
    torch.testing.assert_close(last_logits(out), ref, rtol=1e-4, atol=1e-5)


@dataclass
class RowsRecorder(DecoderPolicy):
    """Requests ``hidden_reduce`` at layer 0 (the norm of each input token) and ``policy_rows`` at
    ``rows_layer`` (rows: the last token; reduction: head mean of that row), prunes at ``layer``."""

    name: ClassVar[str] = "rows-recorder"
    layer: int = 1
    keep: float = 0.5
    rows_layer: int = 1
    seen: list = field(default_factory=list)

    def signal_layers(self, num_layers):
        out = {0: ("hidden_reduce",)}
        out[self.rows_layer] = out.get(self.rows_layer, ()) + ("policy_rows",)
        return out

    def reduce_hidden(self, layer, hidden, key_mask, visual):
        return hidden.float().norm(dim=-1) * key_mask

    def query_rows(self, layer, aligned, key_mask, visual):
        n = key_mask.shape[1]
        last = (key_mask.long() * torch.arange(n)).argmax(-1)
        return torch.arange(n)[None] == last[:, None]

    def reduce_rows(self, layer, attention):
        self.seen.append(("rows", attention))
        return attention.probs.mean(1)[:, 0]

    def select(self, layer, view, ctx):
        self.seen.append(("view", view))
        vis = torch.nonzero(view.visual).flatten()
        return vis[: self.budget(vis.numel(), layer)]


def test_policy_signal_kinds_equal_the_eager_model():
    model, inp = batch("llava", n=1, attn="eager", first=1)
    pol = RowsRecorder(layer=3, rows_layer=2)
    with vtprune.patch(model, pol), torch.no_grad():
        model(**inp)
    with torch.no_grad():
        out = model(**inp, output_attentions=True, output_hidden_states=True)
    view = [v for kind, v in pol.seen if kind == "view"][0]
    att = [a for kind, a in pol.seen if kind == "rows"][0]
    torch.testing.assert_close(view.signals["hidden_reduce@0"], out.hidden_states[0][0].norm(dim=-1))
    torch.testing.assert_close(att.probs[0, :, 0], out.attentions[2][0][:, -1].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(view.signals["policy_rows@2"], out.attentions[2][0][:, -1].float().mean(0),
                               rtol=1e-5, atol=1e-6)


def test_policy_rows_is_computed_after_the_layers_own_pruning():
    """Requested at the layer where the policy prunes: the attention of the pruned sequence (what the
    layer itself computes), not of the sequence before the cut."""
    model, inp = batch("llava", n=1, attn="eager", first=1)
    pol = RowsRecorder(layer=2, rows_layer=2)
    with vtprune.patch(model, pol) as h, torch.no_grad():
        model(**inp)
    kept = h.stats.llm_kept_index[0]
    keep = torch.zeros(inp["input_ids"].shape[1], dtype=torch.bool)
    keep[kept] = True
    with masked_run(model, 2, keep[None]), torch.no_grad():
        out = model(**inp, output_attentions=True)
    att = [a for kind, a in pol.seen if kind == "rows"][0]
    assert att.probs.shape[-1] == kept.numel()
    torch.testing.assert_close(att.probs[0, :, 0], out.attentions[2][0][:, -1][:, kept].float(), rtol=1e-5, atol=1e-6)


def test_two_policies_cannot_share_a_policy_kind_at_one_layer():
    model, _ = batch("llava", n=1)
    with pytest.raises(ValueError, match="two policies request the 'hidden_reduce' signal of decoder layer 0"):
        vtprune.patch(model, [RowsRecorder(layer=2), RowsRecorder(layer=3)])
    assert not hasattr(model, "_vtprune_patch")
    assert not model._forward_pre_hooks and not model._forward_hooks  # nothing left installed
