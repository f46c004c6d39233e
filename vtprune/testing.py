"""Tiny randomly initialised VLMs of every supported family, built from config objects (no downloads).

Used by the test suite and the demo. Each builder returns ``(model, processor)`` with a real
processor (``LlavaProcessor``, ``LlavaNextProcessor``, ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``,
``LlavaOnevisionProcessor`` with its image and video processors, ``Qwen3VLProcessor`` for Qwen3-VL and
Qwen3.5) and a byte-level tokenizer that needs no files. :func:`make_inputs` builds prompts with images
(several per prompt) and videos; :func:`make_video_inputs` Qwen video prompts with frame timestamps.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_onevision1_5", "qwen3_vl",
            "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
#: families whose LLM mixes Gated DeltaNet (linear attention) layers with full attention
HYBRID_FAMILIES = ("qwen3_5", "qwen3_5_moe")


def byte_tokenizer(specials: list[str]):
    """A byte-level BPE tokenizer without merges; ``specials`` are added as special tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<eos>", pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def tiny_video(frames: int = 4, seed: int = 0, size: tuple[int, int] = (56, 56)) -> np.ndarray:
    """A random RGB video, (frames, H, W, 3) uint8."""
    rng = np.random.default_rng(1000 + seed)
    return rng.integers(0, 255, (frames, *size, 3), dtype=np.uint8)


def tiny_images(n: int = 3, seed: int = 0, sizes=None) -> list[Image.Image]:
    """``n`` random RGB PIL images (different sizes when ``sizes`` is given)."""
    rng = np.random.default_rng(seed)
    sizes = sizes or [(56, 56)] * n
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for (h, w) in sizes[:n]]


def _llama_config(vocab: int, **kw):
    from transformers import LlamaConfig

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=2048, pad_token_id=0,
               rms_norm_eps=1e-6)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def _clip_config(**kw):
    from transformers import CLIPVisionConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               image_size=56, patch_size=14, projection_dim=32)
    cfg.update(kw)
    return CLIPVisionConfig(**cfg)


def _image_processor_clip(size: int = 56):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def tiny_llava(attn_implementation: str = "sdpa", seed: int = 0, vision: str = "clip", dtype=torch.float32):
    """LLaVA-1.5-shaped model: a tiny CLIP (56 px, patch 14 -> 16 patches + CLS) + tiny Llama (4 layers)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = byte_tokenizer(["<image>"])
    vocab = len(tok)
    if vision == "clip":
        vcfg, strategy, feat_layer = _clip_config(), "default", -2
    elif vision == "siglip":
        from transformers import SiglipVisionConfig

        vcfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=56, patch_size=14)
        strategy, feat_layer = "full", -1
    elif vision == "dinov2":
        from transformers import Dinov2Config

        vcfg = Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=56, patch_size=14, mlp_ratio=2)
        strategy, feat_layer = "default", -1
    else:
        raise ValueError(f"vision={vision!r}")
    cfg = LlavaConfig(
        vision_config=vcfg,
        text_config=_llama_config(vocab),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=feat_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    n_tokens = 16 if strategy == "default" or vision == "siglip" else 17
    proc = LlavaProcessor(image_processor=_image_processor_clip(), tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy=strategy, num_additional_image_tokens=0 if vision == "siglip" else 1,
                          chat_template=None)
    proc.num_image_tokens = n_tokens
    return model, proc


def tiny_llava_next(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    """LLaVA-NeXT-shaped model with AnyRes pinpoints [[56,112],[112,56],[112,112]]."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    tok = byte_tokenizer(["<image>"])
    pins = [[56, 112], [112, 56], [112, 112]]
    cfg = LlavaNextConfig(
        vision_config=_clip_config(),
        text_config=_llama_config(len(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pins,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_grid_pinpoints=pins)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)
    return model, proc


def tiny_llava_onevision(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    """LLaVA-OneVision-shaped model: a tiny SigLIP (56 px, patch 14 -> 4x4 patches, no CLS, strategy
    'full') + tiny Qwen2 (4 layers); AnyRes pinpoints up to 168 px and ``anyres_max_2``, so that a
    square image of 112 px or more is resized down (the AnyRes-max branch) and smaller ones are not;
    videos pooled to 2x2 tokens per frame."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tok = byte_tokenizer(["<image>", "<video>"])
    pins = [[56, 56], [56, 112], [112, 56], [112, 112], [112, 168], [168, 112]]
    vcfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, vision_use_head=False)
    tcfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=0,
                       rms_norm_eps=1e-6)
    cfg = LlavaOnevisionConfig(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pins,
        vision_aspect_ratio="anyres_max_2",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    ip = LlavaOnevisionImageProcessor(size={"height": 56, "width": 56}, image_grid_pinpoints=pins)
    vp = LlavaOnevisionVideoProcessor(size={"height": 56, "width": 56})
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, num_image_tokens=16,
                                   vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2")
    return model, proc


def tiny_llava_onevision1_5(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    """LLaVA-OneVision-1.5-shaped model: a tiny RICE-ViT (3 blocks, a CLS token per frame, 2x2 merger)
    + tiny Qwen3 (4 layers, 1-D positions), with the checkpoint's processor classes (Qwen2-VL image
    and video processors without temporal patches, the Exaone-4.5 processor)."""
    from transformers import LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration, Qwen2VLImageProcessor
    from transformers import Qwen2VLVideoProcessor
    from transformers.models.exaone4_5.processing_exaone4_5 import Exaone4_5_Processor

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = byte_tokenizer(specials)
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    text = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=0,
                rms_norm_eps=1e-6)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, in_channels=3)
    cfg = LlavaOnevision15Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                                 video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                                 vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = LlavaOnevision15ForConditionalGeneration(cfg).to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    pix = dict(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=1)
    proc = Exaone4_5_Processor(image_processor=Qwen2VLImageProcessor(**pix), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor(**pix, cap_pixels_per_frame=True))
    return model, proc


def _qwen(kind: str, attn_implementation: str, seed: int, dtype):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = byte_tokenizer(specials)
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration as M

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration as M

        vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1, 3], in_channels=3)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    torch.manual_seed(seed)
    model = M(cfg).to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                               temporal_patch_size=2)
    if kind == "qwen2_vl":
        proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=_video_processor())
    else:  # Qwen2.5-VL's own processor also returns second_per_grid_ts for videos (temporal M-RoPE)
        from transformers import Qwen2_5_VLProcessor

        proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=_video_processor())
    return model, proc


def _video_processor():
    """Qwen2-VL's video processor: small frames (at most 112 x 112 px), frames taken as given."""
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, do_sample_frames=False,
                                 cap_pixels_per_frame=False,
                                 size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112 * 4})


def tiny_qwen2_vl(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    return _qwen("qwen2_vl", attn_implementation, seed, dtype)


def tiny_qwen2_5_vl(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    return _qwen("qwen2_5_vl", attn_implementation, seed, dtype)


def tiny_llava_dinov2(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    """LLaVA-1.5 with a tiny DINOv2 tower, laid out as the embedded default (CLS token, layer scale,
    feature layer -1, strategy ``default``): 56 px, patch 14 -> 16 patch tokens + CLS."""
    return tiny_llava(attn_implementation, seed, vision="dinov2", dtype=dtype)


BUILDERS = {"llava": tiny_llava, "llava_next": tiny_llava_next, "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl,
            "llava_onevision": tiny_llava_onevision, "llava_onevision1_5": tiny_llava_onevision1_5,
            "llava_dinov2": tiny_llava_dinov2}
#: builders that are another vision tower of a family, not a family of their own: name -> the family
#: (its adapter, prompts and oracles)
VARIANTS = {"llava_dinov2": "llava"}


def prompt_for(family: str, question: str, n_images: int = 1, n_videos: int = 0) -> str:
    """A prompt with ``n_images`` image and ``n_videos`` video placeholders in the family's syntax."""
    if family.startswith("qwen") or family == "llava_onevision1_5":
        img = "<|vision_start|><|image_pad|><|vision_end|>"
        vid = "<|vision_start|><|video_pad|><|vision_end|>"
    else:
        img, vid = "<image>", "<video>"
    return "USER: " + vid * n_videos + img * n_images + "\n" + question + " ASSISTANT:"


def make_inputs(family: str, proc, questions: list[str], images: list, padding_side: str = "left", videos=None):
    """Processor outputs for a batch, padded on ``padding_side``.

    ``images[i]`` is the image of prompt ``i``, or a list of images (several placeholders; ``[]``:
    none); ``videos[i]`` (optional) a video array, a list of them, or None.
    """
    proc.tokenizer.padding_side = padding_side
    per = [im if isinstance(im, (list, tuple)) else [im] for im in images]
    vids = [[] if v is None else (list(v) if isinstance(v, (list, tuple)) else [v]) for v in (videos or [None] * len(per))]
    texts = [prompt_for(family, q, len(p), len(v)) for q, p, v in zip(questions, per, vids)]
    kw = {}
    if any(per):
        # the LLaVA-OneVision processor takes one list per prompt (it decides AnyRes vs single view)
        kw["images"] = [p for p in per if p] if family == "llava_onevision" else [im for p in per for im in p]
    if any(vids):
        kw["videos"] = [v for vs in vids for v in vs]
    return proc(text=texts, return_tensors="pt", padding=True, **kw)


def make_video_inputs(family: str, proc, questions: list[str], videos: list[np.ndarray], images=None,
                      padding_side: str = "left", fps: float = 2.0):
    """Processor outputs for a batch of Qwen prompts with one video each (and, with ``images``, one image
    before the video), frames taken as given at ``fps`` frames per second."""
    if not family.startswith("qwen"):
        raise ValueError(f"make_video_inputs: video prompts are built for the Qwen families, not {family!r}")
    proc.tokenizer.padding_side = padding_side
    img = "<|vision_start|><|image_pad|><|vision_end|>" if images is not None else ""
    texts = [f"USER: {img}<|vision_start|><|video_pad|><|vision_end|>\n{q} ASSISTANT:" for q in questions]
    meta = [{"fps": fps, "total_num_frames": len(v), "frames_indices": list(range(len(v)))} for v in videos]
    kwargs = {"images": images} if images is not None else {}
    return proc(text=texts, videos=videos, video_metadata=meta, return_tensors="pt", padding=True, **kwargs)


def tiny_open_clip(seed: int = 0):
    """A tiny open_clip CLIP (ViT 56 px, patch 8 -> 49 patches + CLS, width 32, 4 blocks) and its
    tokenizer, random weights, no download."""
    import logging

    import open_clip

    logging.disable(logging.WARNING)  # "no pretrained weights loaded" is the point here
    try:
        torch.manual_seed(seed)
        model = open_clip.create_model(
            "ViT-B-32", pretrained=None, embed_dim=32,
            vision_cfg=dict(image_size=56, patch_size=8, width=32, layers=4, head_width=8, mlp_ratio=2.0),
            text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=1),
        )
    finally:
        logging.disable(logging.NOTSET)
    return model.eval(), open_clip.get_tokenizer("ViT-B-32", context_length=16)


# ---------------------------------------------------------------------------- Qwen3-VL and Qwen3.5
QWEN3_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def _qwen3_processor(tok):
    """A real ``Qwen3VLProcessor`` (Qwen3-VL and Qwen3.5 share it): 14 px patches, 2x2 merge, frames
    taken as given (no resampling), one timestamp per temporal patch."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                               temporal_patch_size=2)
    vp = Qwen3VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, do_sample_frames=False,
                               cap_pixels_per_frame=False,
                               size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112 * 4})
    return Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp)


def _qwen3(kind: str, attn_implementation: str, seed: int, dtype, num_layers: int = 4):
    """Tiny Qwen3-VL / Qwen3.5 (dense or MoE): 3-block ViT (DeepStack from blocks 0 and 1 on Qwen3-VL),
    4-layer LLM (Qwen3.5: Gated DeltaNet layers 0 and 2, full attention at 1 and 3; ``num_layers`` (even)
    repeats that pair)."""
    import transformers

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = byte_tokenizer(specials)
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, in_channels=3)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=2048,
                pad_token_id=0, initializer_range=0.05)
    if kind.startswith("qwen3_vl"):
        vision["deepstack_visual_indexes"] = [0, 1]
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}
    else:  # Qwen3.5: partial rotary (half the head dim here), hybrid layers
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1],
                                   "mrope_interleaved": True, "partial_rotary_factor": 0.5}
        text.update(layer_types=["linear_attention", "full_attention"] * (num_layers // 2), linear_conv_kernel_dim=4,
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4)
    if kind.endswith("moe"):
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        if kind == "qwen3_5_moe":
            text["shared_expert_intermediate_size"] = 32
        else:
            text["decoder_sparse_step"] = 1
    names = {"qwen3_vl": "Qwen3VL", "qwen3_vl_moe": "Qwen3VLMoe", "qwen3_5": "Qwen3_5", "qwen3_5_moe": "Qwen3_5Moe"}
    cfg_cls = getattr(transformers, names[kind] + "Config")
    model_cls = getattr(transformers, names[kind] + "ForConditionalGeneration")
    cfg = cfg_cls(text_config=text, vision_config=vision, **common)
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    return model, _qwen3_processor(tok)


def tiny_qwen3_vl(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    return _qwen3("qwen3_vl", attn_implementation, seed, dtype)


def tiny_qwen3_vl_moe(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    return _qwen3("qwen3_vl_moe", attn_implementation, seed, dtype)


def tiny_qwen3_5(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32, num_layers: int = 4):
    return _qwen3("qwen3_5", attn_implementation, seed, dtype, num_layers)


def tiny_qwen3_5_moe(attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32, num_layers: int = 4):
    return _qwen3("qwen3_5_moe", attn_implementation, seed, dtype, num_layers)


BUILDERS.update({"qwen3_vl": tiny_qwen3_vl, "qwen3_vl_moe": tiny_qwen3_vl_moe, "qwen3_5": tiny_qwen3_5,
                 "qwen3_5_moe": tiny_qwen3_5_moe})
