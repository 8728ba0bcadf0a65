"""Relax builders for one quantizable layer at fp32, int8 (real integer compute) and bitserial sub-8-bit.

Integer numerics (the contract with hwmpq's torch ``QuantLayer``): input codes ``x_q`` (uint8 after a
ReLU, else int8), per-output-channel symmetric weight codes ``w_q``, ``acc = conv(x_q, w_q)`` in int32,
``acc += round_half_even(bias / (s_in * s_w))`` (int32), then requantize in float32:
``out_q = clip(round_half_even(float32(acc) * float32(s_in * s_w / s_out)), qmin, qmax)`` as int8, or as
uint8 in ``0..2^a_bits-1`` when the output quantizer is unsigned (a ReLU after the layer, absorbed).
TVM's ``round`` is round-half-to-even (checked in tests). Integer layers are NHWC (OHWI weights). Where
the target has a 4-element dot-product instruction (``intrin``: ARM sdot on arm-a76-dotprod, AVX-512 VNNI
on a host that has it; dot_intrin.py), dense convs and linear layers are one tiled kernel tensorized to
it with the requantize fused (dotconv.py); depthwise and grouped convs keep the Relax kernel.
Bitserial layers use TOPI's unsigned x unsigned
``bitserial_conv2d_nhwc`` / ``bitserial_dense`` on offset weights ``w_u = w_q + 2^(w_bits-1)`` and
subtract ``2^(w_bits-1) * boxsum(x_q)`` (an int32 one-channel conv) to get the signed product exactly.
"""

from __future__ import annotations

import numpy as np

from hwmpq.records import LayerSpec, Precision

from . import dotconv
from .codes import Grid
from .dot_intrin import DotIntrin
from .int_params import IntLayerParams, int_params
from .presets import BITSERIAL_PRECISIONS


class UnsupportedLayerError(ValueError):
    """The layer/precision pair has no TVM builder here; the message says which and what is allowed."""


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
    if p.out_offset is not None:
        f = bb.emit(relax.op.add(f, relax.const(p.out_offset)))
    lo, hi = p.out_range
    return bb.emit(relax.op.astype(relax.op.clip(relax.op.round(f), lo, hi), p.out_dtype))


def uses_dot_kernel(spec: LayerSpec, intrin: DotIntrin | None) -> bool:
    """Whether :func:`emit_int8_layer` builds this layer with the dot-product kernel (dotconv.py)."""
    return intrin is not None and dotconv.supports(spec)


def emit_int8_layer(bb, xq, spec: LayerSpec, p: IntLayerParams, intrin: DotIntrin | None = None):
    """int8/uint8 x int8 -> int32 (+bias) -> requantized codes (``p.out_dtype``). ``xq``: NHWC (linear: N,C)
    codes.
    ``intrin``: the target's dot-product instruction; dense conv and linear then run dotconv's kernel."""
    relax = _rx()
    if uses_dot_kernel(spec, intrin):
        return dotconv.emit_int8(bb, xq, spec, p, intrin)
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
    """Shape-true random codes and scales for profiling (the kernel's speed does not depend on values):
    unsigned codes in and out, as the exporter's integer layers between ReLUs (absorbed) take and give."""
    rng = np.random.default_rng(seed)
    cin = spec.in_channels // spec.groups
    shape = (spec.out_channels, cin) if spec.kind == "linear" else (spec.out_channels, cin, *spec.kernel)
    wmax = 2 ** (precision.w_bits - 1) - 1
    w_q = rng.integers(-wmax, wmax + 1, shape).astype(np.int8)
    fan_in = int(np.prod(shape[1:]))
    s_w = np.full(spec.out_channels, 1.0 / (wmax * np.sqrt(fan_in)), np.float32)
    bias = rng.normal(0, 0.1, spec.out_channels).astype(np.float32) if spec.bias else None
    return int_params(w_q, bias, PROFILE_SCALE, s_w, PROFILE_SCALE, in_signed=False, precision=precision,
                      out_signed=False)


def int_input(spec: LayerSpec, p: IntLayerParams, seed: int = 1) -> np.ndarray:
    """Random input codes in the layer's deploy layout (NHWC, linear: N,C)."""
    rng = np.random.default_rng(seed)
    lo, hi = (-(2 ** (p.a_bits - 1)), 2 ** (p.a_bits - 1) - 1) if p.in_signed else (0, 2**p.a_bits - 1)
    shape = (spec.batch, spec.in_channels) if spec.kind == "linear" else (spec.batch, *spec.in_hw, spec.in_channels)
    return rng.integers(lo, hi + 1, shape).astype(p.in_dtype)


PROFILE_SCALE = 0.05  # s_in and s_out of the random integer layers profiled here


def stand_in_spec(shape: tuple[int, ...]) -> LayerSpec:
    """The neighbours in a transition chain on a tensor of ``shape`` (NCHW, or N,C): a 1x1 conv C->C
    (the cheapest layer that every TVM precision can build, bitserial included: a depthwise conv has
    no bitserial kernel), or a linear C->C for 2-d tensors."""
    shape = tuple(int(v) for v in shape)
    if len(shape) == 2:
        n, c = shape
        return LayerSpec(f"stand_in{list(shape)}", "linear", c, c, batch=n, bias=True, macs=n * c * c,
                         params=c * c + c)
    if len(shape) != 4:
        raise ValueError(f"a transition tensor is NCHW or (N, C); got shape {shape}")
    n, c, h, w = shape
    return LayerSpec(f"stand_in{list(shape)}", "conv", c, c, in_hw=(h, w), out_hw=(h, w), batch=n, bias=False,
                     macs=n * c * c * h * w, params=c * c)


def profile_grid(precision: Precision, scale: float = PROFILE_SCALE) -> Grid:
    """The unsigned (post-ReLU) grid of the profiled integer layers' codes at ``precision``."""
    return Grid(f"profile-a{precision.a_bits}", scale, 0, 2**precision.a_bits - 1)


def consumer_grid(src: Precision, dst: Precision) -> Grid:
    """The grid a chain's consumer reads: the producer's when the widths agree (one quantizer on the
    tensor), else a ``dst``-wide one spanning the producer's range (a second quantizer)."""
    if src.is_float or src.a_bits == dst.a_bits:
        return profile_grid(dst)
    return profile_grid(dst, PROFILE_SCALE * (2**src.a_bits - 1) / (2**dst.a_bits - 1))


def emit_glue(bb, y, nhwc: bool, src: Precision, dst: Precision):
    """What the exporter writes between a layer at ``src`` and its consumer at ``dst`` with a ReLU
    between them: two integer layers of one width share the codes (the ReLU is the producer's unsigned
    range): nothing; of two widths: a requantize; into a float layer: dequantize (and NHWC->NCHW, the
    float layers being NCHW); out of one: ReLU, NCHW->NHWC and quantize; float to float: the ReLU."""
    from . import codes as C

    relax = _rx()
    if not src.is_float and not dst.is_float:
        return C.requantize(bb, y, profile_grid(src), consumer_grid(src, dst))
    if not src.is_float:
        y = C.dequantize(bb, y, profile_grid(src))
        return C.transpose(bb, y, C.TO_NCHW) if nhwc else y
    y = bb.emit(relax.op.nn.relu(y))
    if dst.is_float:
        return y
    y = C.transpose(bb, y, C.TO_NHWC) if nhwc else y
    return C.quantize(bb, y, profile_grid(dst))


def transition_module(shape: tuple[int, ...], src: Precision, dst: Precision, seed: int = 0,
                      intrin: DotIntrin | None = None):
    """(IRModule, [example input]) of the chain ``stand_in(src) -> glue -> stand_in(dst)``, each stand-in
    built exactly like its single-layer row (same seed, same I/O). Its time C(src, dst) minus the
    stand-ins' rows is what a layer boundary costs in an exported model (lut/model.py)."""
    spec = stand_in_spec(shape)
    emit_a, x, _ = _layer_emitter(spec, src, seed, intrin)
    emit_b, _, _ = _layer_emitter(spec, dst, seed, intrin)
    nhwc = spec.kind != "linear"
    return _wrap(lambda bb, v: emit_b(bb, emit_glue(bb, emit_a(bb, v), nhwc, src, dst)), x), [x]


def reference_transition(x: np.ndarray, shape: tuple[int, ...], src: Precision, dst: Precision,
                         seed: int = 0) -> np.ndarray:
    """numpy/torch reference of :func:`transition_module`'s output (exact for integer layers; float layers
    in float64, so a float producer may move a quantized value by one step)."""
    spec = stand_in_spec(shape)
    nhwc = spec.kind != "linear"
    y = _reference_layer(x, spec, src, seed)
    if not src.is_float and not dst.is_float:
        a, b = profile_grid(src), consumer_grid(src, dst)
        vals = y.astype(np.float32) * np.float32(a.scale)
        y = np.clip(np.round(vals / np.float32(b.scale)), b.lo, b.hi).astype(b.dtype)
    elif not src.is_float:
        y = y.astype(np.float32) * np.float32(PROFILE_SCALE)
        y = y.transpose(0, 3, 1, 2) if nhwc else y
    else:
        y = np.maximum(y, np.float32(0))
        if not dst.is_float:
            g = profile_grid(dst)
            codes = np.clip(np.round(y / np.float32(g.scale)), g.lo, g.hi).astype(g.dtype)
            y = codes.transpose(0, 2, 3, 1) if nhwc else codes
    return _reference_layer(np.ascontiguousarray(y), spec, dst, seed)


def _reference_layer(x: np.ndarray, spec: LayerSpec, precision: Precision, seed: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    _, _, params = _layer_emitter(spec, precision, seed)
    if not precision.is_float:
        return reference_int_layer(x, spec, params)
    weight, bias = (torch.from_numpy(a).double() if a is not None else None for a in params)
    xt = torch.from_numpy(x).double()
    if spec.kind == "linear":
        y = xt @ weight.T + (bias if bias is not None else 0)
    else:
        y = F.conv2d(xt, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
    return y.float().numpy()


def _layer_emitter(spec: LayerSpec, precision: Precision, seed: int = 0, intrin: DotIntrin | None = None):
    """(emit(bb, x) -> output, example input, params) for one layer with random shape-true parameters:
    float NCHW (linear: N,C) in and out; integer NHWC codes in and out, unsigned (the exporter's integer
    stream between ReLUs: codes flow from layer to layer, :func:`emit_glue`). ``params`` is
    (weight, bias) for float, :class:`IntLayerParams` for integer layers."""
    if precision.is_float:
        rng = np.random.default_rng(seed)
        cin = spec.in_channels // spec.groups
        wshape = (spec.out_channels, cin) if spec.kind == "linear" else (spec.out_channels, cin, *spec.kernel)
        weight = rng.normal(0, 0.1, wshape).astype(np.float32)
        bias = rng.normal(0, 0.1, spec.out_channels).astype(np.float32) if spec.bias else None
        x = rng.normal(0, 1, spec.input_shape).astype(np.float32)
        return (lambda bb, v: emit_float_layer(bb, v, spec, weight, bias)), x, (weight, bias)
    p = random_int_params(spec, precision, seed)
    x = int_input(spec, p, seed + 1)
    if precision == Precision(8, 8):
        return (lambda bb, v: emit_int8_layer(bb, v, spec, p, intrin)), x, p
    elif is_bitserial(precision):
        _check_bitserial(spec, p)  # before the builder opens a function: a clean error, no dangling blocks
        emit = emit_bitserial_layer
    else:
        raise UnsupportedLayerError(f"no TVM builder for {precision.label}; use fp32, w8a8 or bitserial "
                                    f"{[q.label for q in BITSERIAL_PRECISIONS]}")
    return (lambda bb, v: emit(bb, v, spec, p)), x, p


def single_layer_module(spec: LayerSpec, precision: Precision, seed: int = 0, intrin: DotIntrin | None = None):
    """(IRModule with ``main``, [example input]) for profiling one layer at ``precision`` (``intrin``:
    build int8 the way a target with that instruction deploys it, see :func:`emit_int8_layer`)."""
    emit, x, _ = _layer_emitter(spec, precision, seed, intrin)
    return _wrap(emit, x), [x]


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
    if p.out_offset is not None:
        f = f + torch.from_numpy(p.out_offset)
    lo, hi = p.out_range
    return torch.clamp(torch.round(f), lo, hi).numpy().astype(p.out_dtype)
