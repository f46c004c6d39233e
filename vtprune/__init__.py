"""vtprune: reversible visual-token pruning and merging for stock Hugging Face VLMs.

    handle = vtprune.patch(model, "fastv", layer=2, keep=0.5)   # model.generate(...) as usual
    handle.remove()

The public names are imported on first use (PEP 562), so that ``import vtprune`` and the
``vtprune --help`` / ``--version`` command line do not pay for importing torch and transformers.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> submodule that defines it
_LAZY = {
    "Patch": ".api", "PatchStats": ".api", "patch": ".api",
    "count_flops": ".flops",
    "Context": ".policy", "DecoderPolicy": ".policy", "DecoderView": ".policy", "ImageTokens": ".policy",
    "MergePolicy": ".policy", "Policy": ".policy", "TokenPolicy": ".policy", "VisionPolicy": ".policy",
    "parse_spec": ".registry", "register": ".registry",
    "TokenSchedule": ".schedule",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from . import methods
    from .api import Patch, PatchStats, patch
    from .flops import count_flops
    from .policy import (Context, DecoderPolicy, DecoderView, ImageTokens, MergePolicy, Policy, TokenPolicy,
                         VisionPolicy)
    from .registry import parse_spec, register
    from .schedule import TokenSchedule


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name == "methods":  # the callable subpackage: vtprune.methods() lists the registered methods
        value = importlib.import_module(".methods", __name__)
    else:
        raise AttributeError(f"module 'vtprune' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
