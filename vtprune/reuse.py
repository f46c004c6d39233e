"""A pruning layer's key projection, computed once across its own cut.

A signal read at a pruning layer before its cut (TransPrune's and PyramidDrop's instruction rows) runs the
layer's input norm and key projection on the uncut sequence; the layer then runs on the rows it keeps
and projects them again. While patched, the decoder records that first projection
(:class:`ProjectionCapture`) and serves the kept rows to the layer's own call
(:class:`ServedProjection`). A row is served only where the layer's input row is bitwise the recorded
input row; every other row (padding, a recycled token) is projected by the module itself. The
module's forward code is not copied: the served call is a temporary instance attribute ``forward``,
gone after one call, at the next decoder layer, or at ``Patch.remove()``.

Exactness: a served row is bitwise the module's own output for that row when a row's projection does
not depend on the other rows of the GEMM it was computed in. On the CPU kernels that holds from 4 rows
on (fp32 takes another kernel for 1-3 rows; tested in ``tests/test_projection_reuse.py``), so calls of
fewer than :data:`MIN_ROWS` rows are not served; another GEMM library may round a row differently in
the last bit. ``vtprune.patch(..., reuse_projections=False)`` turns serving off.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn


#: fewest rows (batch x sequence) of both the recorded and the served call
MIN_ROWS = 16

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def rows_bitwise_equal(x: Tensor, y: Tensor) -> Tensor:
    """(..., D) tensors of one shape and dtype -> (...) bool, True where the two rows hold the same bits.

    The rows are compared as integers of the widest width (up to 8 bytes) that tiles a row, several
    elements per comparison (4-5x faster than a float ``==`` for bf16 rows of 2048). Unlike a float
    ``==``, +0 and -0 differ and a NaN row equals itself: the bits, not the values, decide.
    """
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"rows_bitwise_equal: shapes/dtypes differ ({tuple(x.shape)} {x.dtype}, {tuple(y.shape)} {y.dtype})")
    row_bytes = x.shape[-1] * x.element_size()
    for width in (8, 4, 2, 1):
        if row_bytes % width == 0:
            try:
                return (x.view(_INT_OF_SIZE[width]) == y.view(_INT_OF_SIZE[width])).all(dim=-1)
            except RuntimeError:  # the row is not contiguous (or not aligned) for this width
                continue
    return (x.contiguous().view(torch.uint8) == y.contiguous().view(torch.uint8)).all(dim=-1)


class ProjectionCapture:
    """Context manager: the last (input (B, L, D), output (B, L, F)) of ``module`` called on an input
    of leading shape ``shape`` = (B, L) while inside."""

    def __init__(self, module: nn.Module, shape: tuple[int, int]):
        self.module = module
        self.shape = tuple(shape)
        self.inputs: Tensor | None = None
        self.outputs: Tensor | None = None
        self._handle = None

    def _hook(self, mod, args, out) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and isinstance(out, Tensor) and tuple(x.shape[:2]) == self.shape:
            self.inputs, self.outputs = x, out

    def __enter__(self) -> "ProjectionCapture":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class ServedProjection:
    """Serve ``outputs`` (B, L', F) for the rows of the module's next call whose input equals
    ``inputs`` (B, L', D) where ``usable`` (B, L') is True; one call, then the module is itself again."""

    def __init__(self, module: nn.Module, inputs: Tensor, outputs: Tensor, usable: Tensor):
        self.module = module
        self.inputs, self.outputs, self.usable = inputs, outputs, usable.bool()
        self.served_rows = 0
        self.ms = 0.0
        self._own = module.__dict__.get("forward")  # an instance-level forward already there (accelerate)
        self._active = False

    def install(self) -> "ServedProjection":
        self.module.forward = self._forward
        self._active = True
        return self

    def remove(self) -> None:
        if not self._active:
            return
        self._active = False
        if self._own is None:
            del self.module.forward
        else:
            self.module.forward = self._own

    def _original(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self._own(x, *args, **kwargs) if self._own is not None else type(self.module).forward(self.module, x, *args, **kwargs)

    def _forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        self.remove()
        if args or kwargs or x.shape != self.inputs.shape:
            return self._original(x, *args, **kwargs)
        t0 = time.perf_counter()
        same = self.usable & rows_bitwise_equal(x, self.inputs)
        n = int(same.sum())
        if n == 0:
            return self._original(x)
        out = self.outputs
        if n < same.numel():
            out[~same] = self._original(x[~same]).to(out.dtype)
        self.served_rows = n
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        self.ms = (time.perf_counter() - t0) * 1e3
        return out

