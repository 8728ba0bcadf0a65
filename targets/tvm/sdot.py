"""The int8 (w8a8) accumulation tensorized to ARM ``sdot`` for ``+dotprod`` presets (arm-a76-dotprod).

A TE kernel whose inner 4x4 block is TVM's ARM dot-product intrinsic (``sdot.v4i32.v16i8``: 4 int32
lanes += four 4-element int8 dot products). Weights are packed at build time to
``[O4/4, KH, KW, C4/4, 4(o), 4(c)]`` (O, C zero-padded to multiples of 4) so one 4x4 block is 16
contiguous bytes; activations are NHWC so 4 input channels are 4 contiguous bytes. sdot is int8 x int8,
while hwmpq's post-ReLU codes are uint8: they are shifted to ``x - 128`` (spatial padding becomes -128,
the shifted zero) and ``128 * sum(w)`` per output channel is added back to the int32 bias. Exact.

Used for conv (any stride, padding, dilation) and linear with groups == 1; depthwise/grouped convs keep
the library's Relax kernel. Only the innermost 4x4 is scheduled (no tiling, no threads); the function is
marked ``tirx.is_scheduled`` so MetaSchedule leaves it alone (its requantize epilogue is still tuned).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hwmpq.records import LayerSpec

    from .int_params import IntLayerParams

SDOT = "hwmpq_sdot_4x4_i8i8i32"
KERNEL_NAME = "sdot-4x4"  # recorded in the device fingerprint and the export manifest
_registered = False


def supports(spec: LayerSpec) -> bool:
    """Layers the sdot kernel builds: dense conv (groups 1) and linear."""
    return spec.kind in ("conv", "linear") and spec.groups == 1


def _up4(v: int) -> int:
    return -(-v // 4) * 4


def pack_weights(w_q: np.ndarray) -> np.ndarray:
    """int8 weights OIHW (linear: OI) -> ``[O4/4, KH, KW, C4/4, 4, 4]``, zero-padded to multiples of 4."""
    w = w_q if w_q.ndim == 4 else w_q[:, :, None, None]
    o, c, kh, kw = w.shape
    wp = np.zeros((_up4(o), _up4(c), kh, kw), np.int8)
    wp[:o, :c] = w
    return np.ascontiguousarray(wp.reshape(_up4(o) // 4, 4, _up4(c) // 4, 4, kh, kw).transpose(0, 4, 5, 2, 1, 3))


def shifted_bias(w_q: np.ndarray, bias_i32: np.ndarray) -> np.ndarray:
    """The int32 bias for ``x - 128`` inputs: ``bias + 128 * sum(w)`` per output channel (checked to fit)."""
    b = bias_i32.astype(np.int64) + 128 * w_q.astype(np.int64).reshape(w_q.shape[0], -1).sum(axis=1)
    if b.min() < -(2**31) or b.max() > 2**31 - 1:
        raise ValueError("sdot bias correction overflows int32")
    return b.astype(np.int32)


def register() -> None:
    """TVM's ``ARM_DOT_4x4_i8_SDOT_INTRIN`` (tvm/s_tir/tensor_intrin/arm_cpu.py), declared here because
    importing that package also imports the CUDA intrinsics (181 s on this machine)."""
    global _registered
    if _registered:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), dtype="int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (4,), dtype="int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], dtype="int32") * T.cast(B[vi, vk], dtype="int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), dtype="int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (4,), dtype="int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a_i32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            vec_a = T.reinterpret(T.broadcast(a_i32, 4), dtype="int8x16")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([0], dtype="int32x4"), vec_a, B.vload([0, 0], dtype="int8x16"), dtype="int32x4")

    TensorIntrin.register(SDOT, desc, impl, override=True)
    _registered = True


def conv_primfunc(n: int, hw: tuple[int, int], c: int, o4: int, k: tuple[int, int], stride, pad, dilation,
                  pad_value: int, tensorize: bool = True):
    """int8 NHWC [n, h, w, c] x packed int8 -> int32 [n, OH, OW, o4/4, 4]. ``tensorize=False`` keeps the
    same computation as plain loops (runs on any CPU: the layout and padding are testable on x86)."""
    import tvm
    from tvm import te

    h, w = hw
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, stride, pad, dilation
    c4 = _up4(c)
    x = te.placeholder((n, h, w, c), "int8", name="x")
    wp = te.placeholder((o4 // 4, kh, kw, c4 // 4, 4, 4), "int8", name="wp")
    xp = te.compute((n, h + 2 * ph, w + 2 * pw, c4), lambda b, i, j, ch: tvm.tirx.if_then_else(
        tvm.tirx.all(i >= ph, i < h + ph, j >= pw, j < w + pw, ch < c), x[b, i - ph, j - pw, ch],
        tvm.tirx.const(pad_value, "int8")), name="xp")  # padded channels meet zero weights
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    cb, ci = te.reduce_axis((0, c4 // 4), "cb"), te.reduce_axis((0, 4), "ci")
    acc = te.compute((n, oh, ow, o4 // 4, 4), lambda b, i, j, ob, oi: te.sum(
        xp[b, i * sh + rh * dh, j * sw + rw * dw, cb * 4 + ci].astype("int32")
        * wp[ob, rh, rw, cb, oi, ci].astype("int32"), axis=[rh, rw, cb, ci]), name="acc")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, wp, acc]))
    blk = sch.get_sblock("acc")
    b, i, j, ob, oi, rh_, rw_, cb_, ci_ = sch.get_loops(blk)
    sch.reorder(b, i, j, ob, rh_, rw_, cb_, oi, ci_)
    if tensorize:
        register()
        sch.decompose_reduction(blk, rh_)
        sch.tensorize(oi, SDOT)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), (n, oh, ow, o4)


def emit_acc(bb, xq, spec: LayerSpec, p: IntLayerParams, tensorize: bool = True):
    """(int32 accumulator NHWC [N,OH,OW,O] (linear: [N,O]), the int32 bias to add to it) of the layer
    through the sdot kernel. ``xq``: the layer's codes, NHWC (linear: N,C), uint8 or int8."""
    from tvm import relax

    if not supports(spec):
        raise ValueError(f"layer {spec.fqn!r}: the sdot kernel needs a conv with groups 1 or a linear layer")
    linear = spec.kind == "linear"
    o, c = p.w_q.shape[:2]
    kh, kw = (1, 1) if linear else p.w_q.shape[2:]
    shape = [int(d) for d in xq.ty.shape.values]  # from the tensor: export's specs carry no batch or in_hw
    n = shape[0]
    x = bb.emit(relax.op.reshape(xq, (n, 1, 1, c))) if linear else xq
    bias = p.bias_i32
    if not p.in_signed:  # uint8 codes -> int8 (x - 128); the lost 128 * sum(w) goes back into the bias
        x = bb.emit(relax.op.astype(relax.op.subtract(relax.op.astype(x, "int16"), relax.const(np.int16(128))),
                                    "int8"))
        bias = shifted_bias(p.w_q, p.bias_i32)
    geo = ((1, 1), (1, 1), (0, 0), (1, 1)) if linear else (tuple(shape[1:3]), spec.stride, spec.padding,
                                                           spec.dilation)
    func, (_, oh, ow, o4) = conv_primfunc(n, geo[0], c, _up4(o), (kh, kw), *geo[1:],
                                          pad_value=0 if p.in_signed else -128, tensorize=tensorize)
    name = f"hwmpq_sdot_{len(bb.get().functions)}"
    gv = bb.add_func(func.with_attr("global_symbol", name), name)
    acc = bb.emit(relax.call_tir(gv, [x, relax.const(pack_weights(p.w_q))],
                                 relax.TensorType((n, oh, ow, o4 // 4, 4), "int32")))
    acc = bb.emit(relax.op.reshape(acc, (n, o4) if linear else (n, oh, ow, o4)))
    if o4 != o:
        acc = bb.emit(relax.op.strided_slice(acc, axes=[1 if linear else 3], begin=[0], end=[o]))
    return acc, bias


def reference_acc(x_q: np.ndarray, spec: LayerSpec, p: IntLayerParams) -> np.ndarray:
    """numpy model of :func:`emit_acc` (shift, padding, packed weights, corrected bias), int64: the
    accumulator plus bias, for checking the packing and bias correction without an ARM CPU."""
    linear = spec.kind == "linear"
    x = x_q.astype(np.int64).reshape(x_q.shape[0], 1, 1, -1) if linear else x_q.astype(np.int64)
    bias = p.bias_i32.astype(np.int64)
    pad_value = 0
    if not p.in_signed:
        x, bias, pad_value = x - 128, shifted_bias(p.w_q, p.bias_i32).astype(np.int64), -128
    o, c = p.w_q.shape[:2]
    wp = pack_weights(p.w_q).astype(np.int64)  # [O4/4, KH, KW, C4/4, 4o, 4c]
    _, kh, kw, cb, _, _ = wp.shape
    (sh, sw), (ph, pw), (dh, dw) = ((1, 1), (0, 0), (1, 1)) if linear else (spec.stride, spec.padding, spec.dilation)
    n, h, w, _ = x.shape
    xp = np.full((n, h + 2 * ph, w + 2 * pw, cb * 4), pad_value, np.int64)
    xp[:, ph:ph + h, pw:pw + w, :c] = x
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    acc = np.zeros((n, oh, ow, wp.shape[0], 4), np.int64)
    for r in range(kh):
        for s in range(kw):
            win = xp[:, r * dh:r * dh + sh * (oh - 1) + 1:sh, s * dw:s * dw + sw * (ow - 1) + 1:sw]
            acc += np.einsum("nijbc,obdc->nijod", win.reshape(n, oh, ow, cb, 4), wp[:, r, s])
    acc = acc.reshape(n, oh, ow, -1)[..., :o] + bias
    return acc.reshape(n, o) if linear else acc
