"""Tiny models shared by the golden end-to-end fixtures of the in-LLM methods (PyramidDrop, SparseVLM).

The fixtures' README files name this builder: the scripts that made them (outside the repository)
called it to get the LLM input embeddings and the LLM weights they fed to the reference code, and the
tests rebuild the same model here.
"""
from __future__ import annotations

import torch


def mha_llava(num_layers: int = 4, dtype=torch.float64, attn_implementation: str = "sdpa", seed: int = 0,
              image_size: int = 56, num_heads: int = 4):
    """``vtprune.testing.tiny_llava`` with multi-head attention (4 KV heads), ``num_layers`` LLM layers and
    ``image_size`` px images (patch 14: 56 px -> 16 visual tokens, 112 px -> 64), ``num_heads`` heads
    (SparseVLM+'s 14 priority heads need 32).

    The references rank with their own q/k code without ``repeat_kv`` (PyramidDrop), so the golden
    model has as many KV heads as query heads.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vtprune.testing import _clip_config, _image_processor_clip, _llama_config, byte_tokenizer

    tok = byte_tokenizer(["<image>"])
    cfg = LlavaConfig(vision_config=_clip_config(image_size=image_size),
                      text_config=_llama_config(len(tok), num_attention_heads=num_heads, num_key_value_heads=num_heads,
                                                num_hidden_layers=num_layers),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    proc = LlavaProcessor(image_processor=_image_processor_clip(image_size), tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=None)
    proc.num_image_tokens = (image_size // 14) ** 2
    return model, proc


GOLDEN_PROMPTS = {"q1": ("what is it?", 0), "q2": ("a longer question about the picture here?", 1)}


def golden_inputs(proc, case: str):
    """Processor outputs of golden prompt ``case`` (one prompt, one image of ``tiny_images(2)``)."""
    from vtprune.testing import make_inputs, tiny_images

    question, img = GOLDEN_PROMPTS[case]
    return make_inputs("llava", proc, [question], tiny_images(2)[img:img + 1])
