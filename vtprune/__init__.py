"""vtprune: reversible visual-token pruning and merging for stock Hugging Face VLMs.

    handle = vtprune.patch(model, "fastv", layer=2, keep=0.5)   # model.generate(...) as usual
    handle.remove()
"""
from .api import Patch, PatchStats, patch
from .flops import count_flops
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
from .registry import parse_spec, register
from .schedule import TokenSchedule

from . import methods  # noqa: E402  (the callable subpackage: vtprune.methods() lists the methods)

__version__ = "0.1.0"


def profile(model, inputs, methods, **kwargs):
    """Interleaved latency / memory / FLOPs profile of patched ``generate()`` calls.

    Lazy wrapper of :func:`vtprune.eval.profile.profile` (imported on call; see there for the phases).
    """
    from vtprune.eval.profile import profile as _profile

    return _profile(model, inputs, methods, **kwargs)


__all__ = [
    "Context", "DecoderPolicy", "DecoderView", "ImageTokens", "MergePolicy", "Patch", "PatchStats",
    "Policy", "TokenPolicy", "TokenSchedule", "VisionPolicy", "count_flops", "methods", "parse_spec", "patch",
    "profile", "register",
]
