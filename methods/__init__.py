"""Built-in policies; importing this package registers them.

The package is installed as ``vtprune.methods``, which is also the public function listing the
registered methods (``vtprune.methods()``). Importing the subpackage would shadow that function on
the ``vtprune`` package, so the module itself is made callable and behaves as the function.
"""
import sys
import types

from . import (  # noqa: F401
    baselines,
    cdpruner,
    dart,
    divprune,
    downsample,
    fastv,
    globalcom2,
    hiprune,
    pitome,
    pyramiddrop,
    sparsevlm,
    todre,
    transprune,
    visionzip,
    vispruner,
)


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict[str, str]:
        """Registered methods with a one-line description each (same as ``vtprune.registry.methods``)."""
        from vtprune.registry import methods

        return methods()


sys.modules[__name__].__class__ = _CallableModule
