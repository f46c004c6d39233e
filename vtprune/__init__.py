"""vtprune: reversible visual-token pruning and merging for stock Hugging Face VLMs.

    handle = vtprune.patch(model, "fastv", layer=2, keep=0.5)   # model.generate(...) as usual
    handle.remove()
"""
from .api import Patch, PatchStats, patch
from .policy import (
    Context,
    DecoderPolicy,
    DecoderView,
    ImageTokens,
    MergePolicy,
    Policy,
    TokenPolicy,
    VisionPolicy,
)
from .registry import methods, parse_spec, register
from .schedule import TokenSchedule

from . import methods  # noqa: E402,F811  (the callable subpackage; vtprune.methods() lists methods)

__version__ = "0.1.0"

__all__ = [
    "Context", "DecoderPolicy", "DecoderView", "ImageTokens", "MergePolicy", "Patch", "PatchStats",
    "Policy", "TokenPolicy", "TokenSchedule", "VisionPolicy", "methods", "parse_spec", "patch", "register",
]
