"""Model-family adapters, selected by ``config.model_type``; the only code touching transformers models."""
from __future__ import annotations

from .base import Adapter
from .llava import LlavaAdapter, LlavaNextAdapter
from .qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    cls.model_types[0]: cls for cls in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter)
}


def get_adapter(model) -> Adapter:
    """The adapter for ``model`` (a ``*ForConditionalGeneration``); ``ValueError`` if unsupported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model {type(model).__name__} (model_type={model_type!r}); vtprune supports "
            "LlavaForConditionalGeneration (llava), LlavaNextForConditionalGeneration (llava_next), "
            "Qwen2VLForConditionalGeneration (qwen2_vl) and Qwen2_5_VLForConditionalGeneration (qwen2_5_vl)"
        )
    if not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        raise ValueError(
            f"{type(model).__name__} is not a supported *ForConditionalGeneration model; "
            "pass the full model returned by from_pretrained"
        )
    return ADAPTERS[model_type](model)


__all__ = ["Adapter", "ADAPTERS", "get_adapter"]
