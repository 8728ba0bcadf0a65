"""Relax emitters for integer codes between layers: the glue of the integer NHWC stream that the exporter
(export.py) writes and the transition chains (layers.py) time.

A tensor on a quantizer's grid (:class:`Grid`: scale, code range) is held as its codes, NHWC when it
is 4-d. Every conversion computes exactly what torch's fake-quant model computes, in float32 and in the
same order, so the codes are torch's: dequantize ``float32(c) * s``, quantize
``clip(round_half_even(x / s))``, and a change of grid (requantize) is the two one after the other.
These are elementwise (with at most one transpose), so TVM fuses each chain of them into one loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .int_params import code_dtype

TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


@dataclass(frozen=True)
class Grid:
    """A quantizer's grid: step ``scale`` and codes ``lo..hi`` (zero point 0), stored as int8 or uint8."""

    name: str
    scale: float
    lo: int
    hi: int

    @property
    def dtype(self) -> str:
        return code_dtype((self.lo, self.hi))

    @property
    def signed(self) -> bool:
        return self.lo < 0


def _op():
    from tvm import relax

    return relax.op, relax.const


def quantize(bb, x, grid: Grid):
    """float32 values -> codes on ``grid`` (layout unchanged)."""
    op, const = _op()
    codes = op.clip(op.round(op.divide(x, const(np.float32(grid.scale)))), grid.lo, grid.hi)
    return bb.emit(op.astype(codes, grid.dtype))


def dequantize(bb, codes, grid: Grid):
    """Codes on ``grid`` -> float32 values ``codes * scale`` (layout unchanged)."""
    op, const = _op()
    return bb.emit(op.multiply(op.astype(codes, "float32"), const(np.float32(grid.scale))))


def requantize(bb, codes, src: Grid, dst: Grid):
    """Codes on ``src`` -> codes on ``dst``: torch re-quantizes the dequantized value, so this does too."""
    if src.scale == dst.scale and src.lo >= dst.lo and src.hi <= dst.hi:
        return codes if src.dtype == dst.dtype else bb.emit(_op()[0].astype(codes, dst.dtype))
    return quantize(bb, dequantize(bb, codes, src), dst)


def transpose(bb, x, perm: tuple[int, ...]):
    return bb.emit(_op()[0].permute_dims(x, list(perm)))


def relu(bb, codes, grid: Grid, cap: float | None = None):
    """ReLU (``cap=6.0``: ReLU6) on codes, exactly torch's ``q(relu(x))``: codes below 0 become 0 and,
    for ReLU6, codes above ``round(6 / scale)`` become that (rounding is monotonic). On unsigned codes
    whose largest value is at most ``cap`` it changes nothing and emits nothing."""
    op, const = _op()
    top = grid.hi if cap is None else min(grid.hi, int(np.round(np.float32(cap) / np.float32(grid.scale))))
    if grid.lo >= 0 and top >= grid.hi:
        return codes
    return bb.emit(op.clip(codes, max(grid.lo, 0), top))


def max_pool(bb, codes, kernel, stride, padding, dilation, ceil_mode: bool):
    """Max pool on NHWC codes (the same codes as pooling the values: scaling is monotonic)."""
    op, _ = _op()
    return bb.emit(op.nn.max_pool2d(codes, kernel, stride, padding, dilation, ceil_mode, layout="NHWC"))
