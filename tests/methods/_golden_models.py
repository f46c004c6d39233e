"""Tiny models shared by the golden end-to-end fixtures of the in-LLM methods (PyramidDrop, SparseVLM).

The fixtures' README files name this builder: the scripts that made them (outside the repository)
called it to get the LLM input embeddings and the LLM weights they fed to the reference code, and the
tests rebuild the same model here.
"""
from __future__ import annotations

import torch


def mha_llava(num_layers: int = 4, dtype=torch.float64, attn_implementation: str = "sdpa", seed: int = 0):
    """``vtprune.testing.tiny_llava`` with multi-head attention (4 KV heads) and ``num_layers`` LLM layers.

    The references rank with their own q/k code without ``repeat_kv`` (PyramidDrop), so the golden
    model has as many KV heads as query heads.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vtprune.testing import _clip_config, _image_processor_clip, _llama_config, byte_tokenizer

    tok = byte_tokenizer(["<image>"])
    cfg = LlavaConfig(vision_config=_clip_config(),
                      text_config=_llama_config(len(tok), num_key_value_heads=4, num_hidden_layers=num_layers),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    proc = LlavaProcessor(image_processor=_image_processor_clip(), tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=None)
    proc.num_image_tokens = 16
    return model, proc


GOLDEN_PROMPTS = {"q1": ("what is it?", 0), "q2": ("a longer question about the picture here?", 1)}


def golden_inputs(proc, case: str):
    """Processor outputs of golden prompt ``case`` (one prompt, one image of ``tiny_images(2)``)."""
    from vtprune.testing import make_inputs, tiny_images

    question, img = GOLDEN_PROMPTS[case]
    return make_inputs("llava", proc, [question], tiny_images(2)[img:img + 1])
