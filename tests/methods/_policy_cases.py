"""Shared set-up of the model-level policy tests (PiToMe, GlobalCom², TransPrune): cached tiny models,
request batches, and the comparisons every oracle test makes."""
from __future__ import annotations

import functools

import torch

from vtprune.testing import BUILDERS, FAMILIES, make_inputs, tiny_images

QUESTIONS = ["what is it?", "a longer question about the picture here?", "and the colour?"]
SIZES = {"llava": None, **{f: [(56, 56), (70, 112), (112, 84)] for f in FAMILIES if f != "llava"}}
GEN = dict(max_new_tokens=10, do_sample=False)


@functools.lru_cache(maxsize=None)
def model_and_proc(family: str, attn: str = "sdpa"):
    return BUILDERS[family](attn_implementation=attn)


def batch(family: str, n: int = 1, attn: str = "sdpa", start: int = 0):
    """(model, processor outputs) for ``n`` prompts with one image each (left padded)."""
    model, proc = model_and_proc(family, attn)
    sizes = SIZES[family]
    imgs = tiny_images(start + n, sizes=sizes[: start + n] if sizes else None)[start:]
    return model, make_inputs(family, proc, QUESTIONS[start : start + n], imgs)


def new_tokens(gen: torch.Tensor, n_prompt: int) -> list[list[int]]:
    return gen[:, n_prompt:].tolist()


def assert_batch_equals_alone(family: str, attn: str, method, **params) -> None:
    """Batch of 2 (left padded, different lengths) == each sample alone: last logits and 10 new tokens."""
    import vtprune

    model, inp = batch(family, n=2, attn=attn, start=1)
    assert (inp["attention_mask"] == 0).any(), "the batch must contain left padding"
    with vtprune.patch(model, method, **params):
        with torch.no_grad():
            logits = model(**inp).logits[:, -1]
            gen = model.generate(**inp, **GEN)
    for i in range(2):
        _, one = batch(family, n=1, attn=attn, start=1 + i)
        with vtprune.patch(model, method, **params):
            with torch.no_grad():
                l1 = model(**one).logits[:, -1]
                g1 = model.generate(**one, **GEN)
        torch.testing.assert_close(logits[i : i + 1], l1, rtol=1e-4, atol=1e-5)
        assert new_tokens(gen, inp["input_ids"].shape[1])[i] == new_tokens(g1, one["input_ids"].shape[1])[0]
