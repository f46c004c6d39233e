"""Text signals (``vtprune.signals.TEXT_SIGNALS``): what each kind selects, that it equals the model's own
input embeddings, that a padded batch gives each sample what it gets alone, and that the hook layer
hands the value to every image of the sample without the adapters ever seeing the name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.adapters import get_adapter
from vtprune.policy import Context, ImageTokens, TokenPolicy
from vtprune.signals import TEXT_SIGNALS, SampleText, TextTokens
from vtprune.testing import BUILDERS, make_inputs, prompt_for, tiny_images

QUESTIONS = ["what is it?", "a longer question about the picture here?"]


def _batch(family, n=2):
    model, proc = BUILDERS[family]()
    sizes = None if family == "llava" else [(70, 112), (112, 84)]
    return model, proc, make_inputs(family, proc, QUESTIONS[:n], tiny_images(n, sizes=sizes))


def text_of(model, inp, kind):
    """Per sample, the text signal ``kind`` computed directly from the registry."""
    ad = get_adapter(model)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    return [TEXT_SIGNALS[kind](SampleText(ids[b], mask[b].bool(), ad.image_token_id, ad.text_embeddings))
            for b in range(ids.shape[0])]


def test_registry():
    assert set(TEXT_SIGNALS) == {"instruction_embeds", "text_embeds"}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_kinds_select_the_right_tokens_and_embed_them_with_the_model(family):
    model, proc, inp = _batch(family)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    assert (mask == 0).any()  # left padding present
    for b, (ins, txt) in enumerate(zip(text_of(model, inp, "instruction_embeds"), text_of(model, inp, "text_embeds"))):
        valid = ids[b][mask[b].bool()]
        is_img = valid == model.config.image_token_id
        last = int(torch.nonzero(is_img).max())
        assert ins.ids.tolist() == valid[last + 1:].tolist()
        assert txt.ids.tolist() == valid[~is_img].tolist()
        assert proc.tokenizer.decode(ins.ids).endswith(QUESTIONS[b] + " ASSISTANT:")  # question + template tail
        with torch.no_grad():
            torch.testing.assert_close(ins.embeds, model.get_input_embeddings()(ins.ids))
        assert ins.embeds.shape == (ins.num_tokens, model.config.text_config.hidden_size)


def test_padded_batch_equals_each_sample_alone():
    model, proc, inp = _batch("llava")
    both = text_of(model, inp, "instruction_embeds")
    for b in range(2):
        one = make_inputs("llava", proc, QUESTIONS[b : b + 1], tiny_images(2)[b : b + 1])
        alone = text_of(model, one, "instruction_embeds")[0]
        assert torch.equal(both[b].ids, alone.ids) and torch.equal(both[b].embeds, alone.embeds)


def test_sample_without_image_gets_all_its_text():
    model, proc, _ = _batch("llava")
    ids = proc.tokenizer(["USER: hello ASSISTANT:"], return_tensors="pt")["input_ids"]
    sig = text_of(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "instruction_embeds")[0]
    assert sig.ids.tolist() == ids[0].tolist()


@dataclass
class _Recorder(TokenPolicy):
    """Keeps everything; records the text signals each image received."""

    name: ClassVar[str] = "_text_recorder"
    keep: float = 1.0
    seen: ClassVar[list] = []

    def required_signals(self, adapter):
        return {"instruction_embeds": None, "text_embeds": None}

    def select(self, image: ImageTokens, n_keep: int, ctx: Context):
        _Recorder.seen.append((image.sample_index, image.signals["instruction_embeds"], image.signals["text_embeds"]))
        return image.candidate_index()


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_hook_layer_hands_every_image_its_samples_text(family):
    """Adapters never see text-signal names (they reject unknown signals); each image gets its own
    sample's value; keep-all stays the unpatched model."""
    model, _, inp = _batch(family)
    _Recorder.seen.clear()
    with torch.no_grad():
        ref = model(**inp).logits[:, -1]
        with vtprune.patch(model, _Recorder()):
            out = model(**inp).logits[:, -1]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    expected = text_of(model, inp, "instruction_embeds")
    assert [s for s, _, _ in _Recorder.seen] == [0, 1]
    for sample, ins, txt in _Recorder.seen:
        assert isinstance(ins, TextTokens) and isinstance(txt, TextTokens)
        assert torch.equal(ins.ids, expected[sample].ids)
        assert txt.num_tokens > ins.num_tokens


def test_multi_image_sample_shares_the_instruction():
    model, proc = BUILDERS["llava"]()
    text = prompt_for("llava", "compare them?", n_images=2)
    inp = proc(text=[text], images=tiny_images(2), return_tensors="pt", padding=True)
    _Recorder.seen.clear()
    with torch.no_grad(), vtprune.patch(model, _Recorder()):
        model(**inp)
    assert len(_Recorder.seen) == 2
    (s0, a, _), (s1, b, _) = _Recorder.seen
    assert s0 == s1 == 0 and torch.equal(a.ids, b.ids)
    assert proc.tokenizer.decode(a.ids).endswith("compare them? ASSISTANT:")
