"""The integer form of one quantized layer (weight codes, int32 bias, float32 requantization multiplier),
shared by the Relax builders (layers.py) and the dot-product kernel (dotconv.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hwmpq.records import Precision


@dataclass(frozen=True)
class IntLayerParams:
    """What an integer layer needs, in deploy form (numpy): weight codes OIHW (linear: OI) int8, int32 bias,
    float32 per-channel requantization multiplier, and the code ranges. ``out_signed=False``: the output
    codes are unsigned (a ReLU after the layer absorbed into its output quantizer's range)."""

    w_q: np.ndarray
    bias_i32: np.ndarray
    multiplier: np.ndarray
    in_signed: bool
    a_bits: int
    w_bits: int
    out_signed: bool = True
    out_offset: np.ndarray | None = None  # float32 bias / s_out added after the multiply (a float bias)

    @property
    def out_range(self) -> tuple[int, int]:
        if not self.out_signed:
            return 0, 2**self.a_bits - 1
        return -(2 ** (self.a_bits - 1)), 2 ** (self.a_bits - 1) - 1

    @property
    def out_dtype(self) -> str:
        return code_dtype(self.out_range)

    @property
    def in_dtype(self) -> str:
        return "int8" if self.in_signed else "uint8"


def code_dtype(code_range: tuple[int, int]) -> str:
    """The storage type of integer codes in ``code_range`` (at most 8 bits): uint8 when non-negative."""
    return "uint8" if code_range[0] >= 0 else "int8"


def int_params(w_q: np.ndarray, bias: np.ndarray | None, s_in: float, s_w: np.ndarray, s_out: float,
               in_signed: bool, precision: Precision, out_signed: bool = True,
               integer_bias: bool = True) -> IntLayerParams:
    """Fold float scales and bias into the integer form (bias rounded half to even, multiplier float32).
    ``integer_bias=False`` (the torch model adds the bias in float, hwmpq.qmodules.integer_bias): the
    bias is not rounded onto the accumulator's grid but added as ``bias / s_out`` after the multiply."""
    s_w = np.asarray(s_w, dtype=np.float32).reshape(-1)
    s_acc = np.float32(s_in) * s_w
    b = np.zeros(w_q.shape[0], np.float32) if bias is None else np.asarray(bias, np.float32)
    mult = (s_acc / np.float32(s_out)).astype(np.float32)
    if not integer_bias:
        return IntLayerParams(np.asarray(w_q, np.int8), np.zeros(w_q.shape[0], np.int32), mult, in_signed,
                              precision.a_bits, precision.w_bits, out_signed, (b / np.float32(s_out)).astype(np.float32))
    bias_i32 = np.round(b / s_acc).astype(np.int64).clip(-(2**31), 2**31 - 1).astype(np.int32)
    return IntLayerParams(np.asarray(w_q, np.int8), bias_i32, mult, in_signed, precision.a_bits, precision.w_bits,
                          out_signed)
