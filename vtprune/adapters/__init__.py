"""Model-family adapters, selected by ``config.model_type``; the only code touching transformers models."""
from __future__ import annotations

from .base import Adapter
from .clip_vit import OpenClipViTAdapter, is_open_clip_vit
from .llava import LlavaAdapter, LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .llava_onevision1_5 import LlavaOnevision15Adapter
from .qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from .qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter
from .qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    cls.model_types[0]: cls
    for cls in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter, LlavaOnevisionAdapter,
                LlavaOnevision15Adapter, Qwen3VLAdapter, Qwen3VLMoeAdapter, Qwen3_5Adapter, Qwen3_5MoeAdapter)
}


def get_adapter(model) -> Adapter:
    """The adapter for ``model`` (a ``*ForConditionalGeneration``); ``ValueError`` if unsupported."""
    if is_open_clip_vit(model):  # open_clip ``VisionTransformer`` (e.g. ``clip_model.visual``): stage V only
        return OpenClipViTAdapter(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); vtprune supports "
            "LlavaForConditionalGeneration (llava), LlavaNextForConditionalGeneration (llava_next), "
            "Qwen2VLForConditionalGeneration (qwen2_vl), Qwen2_5_VLForConditionalGeneration (qwen2_5_vl), "
            "LlavaOnevisionForConditionalGeneration (llava_onevision), "
            "LlavaOnevision15ForConditionalGeneration (llava_onevision1_5), "
            "Qwen3VLForConditionalGeneration (qwen3_vl), Qwen3VLMoeForConditionalGeneration (qwen3_vl_moe), "
            "Qwen3_5ForConditionalGeneration (qwen3_5), Qwen3_5MoeForConditionalGeneration (qwen3_5_moe) "
            "and open_clip VisionTransformer (pass open_clip_model.visual)"
        )
    if not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        raise ValueError(
            f"{type(model).__name__} is not a supported *ForConditionalGeneration model; "
            "pass the full model returned by from_pretrained"
        )
    return ADAPTERS[model_type](model)


__all__ = ["Adapter", "ADAPTERS", "OpenClipViTAdapter", "get_adapter"]
