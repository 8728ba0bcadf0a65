"""The integer form of one quantized layer (weight codes, int32 bias, float32 requantization multiplier),
shared by the Relax builders (layers.py) and the dot-product kernel (dotconv.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hwmpq.records import Precision


@dataclass(frozen=True)
class IntLayerParams:
    """What an integer layer needs, in deploy form (numpy): weight codes OIHW (linear: OI) int8, int32 bias,
    float32 per-channel requantization multiplier, and the code ranges."""

    w_q: np.ndarray
    bias_i32: np.ndarray
    multiplier: np.ndarray
    in_signed: bool
    a_bits: int
    w_bits: int

    @property
    def out_range(self) -> tuple[int, int]:
        return -(2 ** (self.a_bits - 1)), 2 ** (self.a_bits - 1) - 1

    @property
    def in_dtype(self) -> str:
        return "int8" if self.in_signed else "uint8"


def int_params(w_q: np.ndarray, bias: np.ndarray | None, s_in: float, s_w: np.ndarray, s_out: float,
               in_signed: bool, precision: Precision) -> IntLayerParams:
    """Fold float scales and bias into the integer form (bias rounded half to even, multiplier float32)."""
    s_w = np.asarray(s_w, dtype=np.float32).reshape(-1)
    s_acc = np.float32(s_in) * s_w
    b = np.zeros(w_q.shape[0], np.float32) if bias is None else np.asarray(bias, np.float32)
    bias_i32 = np.round(b / s_acc).astype(np.int64).clip(-(2**31), 2**31 - 1).astype(np.int32)
    mult = (s_acc / np.float32(s_out)).astype(np.float32)
    return IntLayerParams(np.asarray(w_q, np.int8), bias_i32, mult, in_signed, precision.a_bits, precision.w_bits)
