"""Relax builders for one quantizable layer at fp32, int8 (real integer compute) and bitserial sub-8-bit.

Integer numerics (the contract with hwmpq's torch ``QuantLayer``): input codes ``x_q`` (uint8 after a
ReLU, else int8), per-output-channel symmetric weight codes ``w_q``, ``acc = conv(x_q, w_q)`` in int32,
``acc += round_half_even(bias / (s_in * s_w))`` (int32), then requantize in float32:
``out_q = clip(round_half_even(float32(acc) * float32(s_in * s_w / s_out)), qmin, qmax)`` as int8.
TVM's ``round`` is round-half-to-even (checked in tests). Integer layers are NHWC (OHWI weights) so a
``+dotprod`` target can tensorize to sdot. Bitserial layers use TOPI's unsigned x unsigned
``bitserial_conv2d_nhwc`` / ``bitserial_dense`` on offset weights ``w_u = w_q + 2^(w_bits-1)`` and
subtract ``2^(w_bits-1) * boxsum(x_q)`` (an int32 one-channel conv) to get the signed product exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hwmpq.records import LayerSpec, Precision

from .presets import BITSERIAL_PRECISIONS


class UnsupportedLayerError(ValueError):
    """The layer/precision pair has no TVM builder here; the message says which and what is allowed."""


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


def _rx():
    from tvm import relax

    return relax


def _conv_args(spec: LayerSpec) -> dict:
    return {"strides": spec.stride, "padding": spec.padding, "dilation": spec.dilation, "groups": spec.groups}


def emit_float_layer(bb, x, spec: LayerSpec, weight: np.ndarray, bias: np.ndarray | None):
    """Float32 conv (NCHW/OIHW, like torch) or linear ``x @ W.T + b``."""
    relax = _rx()
    if spec.kind == "linear":
        y = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(weight.T, np.float32))))
        shape_b = (1, -1)
    else:
        y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight.astype(np.float32)), **_conv_args(spec)))
        shape_b = (1, -1, 1, 1)
    if bias is not None:
        y = bb.emit(relax.op.add(y, relax.const(bias.astype(np.float32).reshape(shape_b))))
    return y


def _requantize(bb, acc, p: IntLayerParams):
    relax = _rx()
    acc = bb.emit(relax.op.add(acc, relax.const(p.bias_i32)))
    f = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(p.multiplier)))
    lo, hi = p.out_range
    return bb.emit(relax.op.astype(relax.op.clip(relax.op.round(f), lo, hi), "int8"))


def emit_int8_layer(bb, xq, spec: LayerSpec, p: IntLayerParams):
    """int8/uint8 x int8 -> int32 (+bias) -> requantized int8 codes. ``xq``: NHWC (linear: N,C) codes."""
    relax = _rx()
    if spec.kind == "linear":
        w = relax.const(np.ascontiguousarray(p.w_q.T))
        acc = bb.emit(relax.op.matmul(xq, w, out_dtype="int32"))
    else:
        w = relax.const(np.ascontiguousarray(p.w_q.transpose(0, 2, 3, 1)))  # OIHW -> OHWI
        acc = bb.emit(relax.op.nn.conv2d(xq, w, data_layout="NHWC", kernel_layout="OHWI", out_dtype="int32",
                                         **_conv_args(spec)))
    return _requantize(bb, acc, p)


def _check_bitserial(spec: LayerSpec, p: IntLayerParams) -> None:
    if Precision(p.w_bits, p.a_bits) not in BITSERIAL_PRECISIONS:
        raise UnsupportedLayerError(f"bitserial {p.w_bits}x{p.a_bits} bits is not supported; supported: "
                                    f"{[q.label for q in BITSERIAL_PRECISIONS]}")
    if spec.kind == "dwconv" or spec.groups != 1:
        raise UnsupportedLayerError(f"layer {spec.fqn!r}: TOPI has no grouped/depthwise bitserial conv")
    if p.in_signed:
        raise UnsupportedLayerError(f"layer {spec.fqn!r}: bitserial needs unsigned (post-ReLU) input codes")
    if spec.dilation != (1, 1):
        raise UnsupportedLayerError(f"layer {spec.fqn!r}: bitserial conv has no dilation")
    if spec.in_channels % 8:
        raise UnsupportedLayerError(f"layer {spec.fqn!r}: bitserial packs input channels in bytes; "
                                    f"{spec.in_channels} is not a multiple of 8")


def emit_bitserial_layer(bb, xq, spec: LayerSpec, p: IntLayerParams):
    """Sub-8-bit layer through TOPI bitserial ops; ``xq`` uint8 NHWC (linear: N,C) codes < 2**a_bits."""
    from tvm import topi

    relax = _rx()
    _check_bitserial(spec, p)
    offset = 2 ** (p.w_bits - 1)
    w_u = (p.w_q.astype(np.int16) + offset).astype(np.uint8)
    if spec.kind == "linear":
        acc = bb.emit_te(topi.nn.bitserial_dense, xq, relax.const(w_u), p.a_bits, p.w_bits, "uint8", "int32",
                         False)
        xsum = bb.emit(relax.op.sum(relax.op.astype(xq, "int32"), axis=[1], keepdims=True))
    else:
        ph, pw = spec.padding
        w_hwio = np.ascontiguousarray(w_u.transpose(2, 3, 1, 0))
        acc = bb.emit_te(topi.nn.bitserial_conv2d_nhwc, xq, relax.const(w_hwio), spec.stride, (ph, pw, ph, pw),
                         p.a_bits, p.w_bits, "uint8", "int32", False)
        ones = relax.const(np.ones((1, *spec.kernel, spec.in_channels), np.int32))
        xsum = bb.emit(relax.op.nn.conv2d(relax.op.astype(xq, "int32"), ones, strides=spec.stride,
                                          padding=spec.padding, data_layout="NHWC", kernel_layout="OHWI",
                                          out_dtype="int32"))
    acc = bb.emit(relax.op.subtract(acc, relax.op.multiply(xsum, relax.const(np.int32(offset)))))
    return _requantize(bb, acc, p)


def is_bitserial(precision: Precision) -> bool:
    return precision in BITSERIAL_PRECISIONS


def random_int_params(spec: LayerSpec, precision: Precision, seed: int = 0) -> IntLayerParams:
    """Shape-true random codes and scales for profiling (the kernel's speed does not depend on values)."""
    rng = np.random.default_rng(seed)
    cin = spec.in_channels // spec.groups
    shape = (spec.out_channels, cin) if spec.kind == "linear" else (spec.out_channels, cin, *spec.kernel)
    wmax = 2 ** (precision.w_bits - 1) - 1
    w_q = rng.integers(-wmax, wmax + 1, shape).astype(np.int8)
    fan_in = int(np.prod(shape[1:]))
    s_w = np.full(spec.out_channels, 1.0 / (wmax * np.sqrt(fan_in)), np.float32)
    bias = rng.normal(0, 0.1, spec.out_channels).astype(np.float32) if spec.bias else None
    return int_params(w_q, bias, 0.05, s_w, 0.05, in_signed=False, precision=precision)


def int_input(spec: LayerSpec, p: IntLayerParams, seed: int = 1) -> np.ndarray:
    """Random input codes in the layer's deploy layout (NHWC, linear: N,C)."""
    rng = np.random.default_rng(seed)
    lo, hi = (-(2 ** (p.a_bits - 1)), 2 ** (p.a_bits - 1) - 1) if p.in_signed else (0, 2**p.a_bits - 1)
    shape = (spec.batch, spec.in_channels) if spec.kind == "linear" else (spec.batch, *spec.in_hw, spec.in_channels)
    return rng.integers(lo, hi + 1, shape).astype(p.in_dtype)


def single_layer_module(spec: LayerSpec, precision: Precision, seed: int = 0):
    """(IRModule with ``main``, [example input]) for profiling one layer at ``precision``."""
    from tvm import relax

    if precision.is_float:
        rng = np.random.default_rng(seed)
        cin = spec.in_channels // spec.groups
        wshape = (spec.out_channels, cin) if spec.kind == "linear" else (spec.out_channels, cin, *spec.kernel)
        weight = rng.normal(0, 0.1, wshape).astype(np.float32)
        bias = rng.normal(0, 0.1, spec.out_channels).astype(np.float32) if spec.bias else None
        x = rng.normal(0, 1, spec.input_shape).astype(np.float32)
        return _wrap(lambda bb, v: emit_float_layer(bb, v, spec, weight, bias), x), [x]
    p = random_int_params(spec, precision, seed)
    x = int_input(spec, p, seed + 1)
    if precision == Precision(8, 8):
        emit = emit_int8_layer
    elif is_bitserial(precision):
        _check_bitserial(spec, p)  # before the builder opens a function: a clean error, no dangling blocks
        emit = emit_bitserial_layer
    else:
        raise UnsupportedLayerError(f"no TVM builder for {precision.label}; use fp32, w8a8 or bitserial "
                                    f"{[q.label for q in BITSERIAL_PRECISIONS]}")
    _ = relax
    return _wrap(lambda bb, v: emit(bb, v, spec, p), x), [x]


def _wrap(body, x: np.ndarray):
    from tvm import relax

    bb = relax.BlockBuilder()
    v = relax.Var("x", relax.TensorType(x.shape, str(x.dtype)))
    with bb.function("main", [v]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, v))
        bb.emit_func_output(out)
    return bb.get()


def reference_int_layer(x_q: np.ndarray, spec: LayerSpec, p: IntLayerParams) -> np.ndarray:
    """Exact numpy/torch-int64 reference of the integer layer (same rounding), for tests."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(x_q.astype(np.int64)).double()
    w = torch.from_numpy(p.w_q.astype(np.int64)).double()
    if spec.kind == "linear":
        acc = (x @ w.T).long()
    else:
        acc = F.conv2d(x.permute(0, 3, 1, 2), w, None, spec.stride, spec.padding, spec.dilation, spec.groups)
        acc = acc.permute(0, 2, 3, 1).long()
    acc = (acc + torch.from_numpy(p.bias_i32.astype(np.int64))).int()
    f = acc.float() * torch.from_numpy(p.multiplier)
    lo, hi = p.out_range
    return torch.clamp(torch.round(f), lo, hi).to(torch.int8).numpy()
