"""The int8 (w8a8) layer as one tiled TE kernel tensorized to a 4-element dot-product instruction
(dot_intrin.py: ARM ``sdot`` on ``+dotprod`` targets, x86 AVX-512 VNNI ``vpdpbusd`` on the host).

Layout: activations NHWC, so 4 input channels are 4 contiguous bytes; weights packed at build time to
``[O/L, KH, KW, C4/4, L, 4]`` (L = the instruction's lanes; O and C zero-padded) so one L x 4 block is
contiguous. Codes the instruction does not multiply are shifted in the padding stage (sdot: uint8 ->
``x - 128``, VNNI: int8 -> ``x + 128``), spatial padding is the shifted zero, and the lost
``shift * sum(w)`` is folded into the int32 bias. Exact.

Schedule: output pixels along W split by ``tile_w`` and output-channel blocks by ``tile_o`` (a
``tile_w x tile_o`` register tile of L-lane accumulators, reduction over KH, KW, C/4 outside it), the
requantize ``clip(round(float32(acc + bias) * mult))`` computed per tile from the accumulators and
vectorised over channels, the outer row loop parallel. The tile sizes are the kernel's tuning knobs
(dot_tuning.py); the function is marked ``tirx.is_scheduled`` and opaque, so neither MetaSchedule nor
operator fusion touches it.
Conv (any stride, padding, dilation) and linear layers with groups 1 use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .dot_intrin import DotIntrin, K, register
from .int_params import code_dtype
from .tile_db import ConvWorkload

if TYPE_CHECKING:
    from hwmpq.records import LayerSpec

    from .int_params import IntLayerParams

WORKLOAD_ATTR = "hwmpq.dot_workload"  # the PrimFunc attribute dot_tuning.py finds kernels by
TILES_ATTR = "hwmpq.dot_tiles"  # the register tile it was scheduled with, "WxO"


def supports(spec: LayerSpec) -> bool:
    """Layers the dot-product kernel builds: dense conv (groups 1) and linear."""
    return spec.kind in ("conv", "linear") and spec.groups == 1


def up(v: int, m: int) -> int:
    return -(-v // m) * m


@dataclass(frozen=True)
class DotWorkload(ConvWorkload):
    """Everything that fixes the kernel's code except the tiles (the tuning database key)."""

    intrin: str  # DotIntrin.name
    n: int
    h: int
    w: int
    c: int
    o: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    in_dtype: str  # "uint8" or "int8"
    out_range: tuple[int, int]
    linear: bool = False  # codes in [n, c] and out [n, o] (no reshapes around the kernel)

    @property
    def out_dtype(self) -> str:
        return code_dtype(self.out_range)



@dataclass(frozen=True)
class Tiles:
    """``tile_w`` output pixels x ``tile_o`` blocks of L output channels per register tile."""

    tile_w: int
    tile_o: int


MAX_ACCUMULATORS = 28  # vector registers a tile may hold as accumulators (32 zmm on x86, 32 q on ARM)


def candidate_tiles(wl: DotWorkload, intrin: DotIntrin) -> list[Tiles]:
    """Register tiles that divide the output, likeliest fastest first (the first is the untuned default)."""
    ow, ol = wl.out_hw[1], up(wl.o, intrin.lanes) // intrin.lanes
    tws = [t for t in range(1, min(ow, 16) + 1) if ow % t == 0]
    tos = [t for t in range(1, min(ol, 8) + 1) if ol % t == 0]
    tiles = [Tiles(w, o) for w in tws for o in tos if w * o <= MAX_ACCUMULATORS]
    # measured on resnet18's 3x3 convs (AVX-512 VNNI): the best tiles hold 4 channel blocks x 4-7 pixels
    return sorted(tiles, key=lambda t: (abs(t.tile_o - 4), -t.tile_w))


def default_tiles(wl: DotWorkload, intrin: DotIntrin) -> Tiles:
    """The untuned choice: the first candidate (4 channel blocks, as many pixels as fit)."""
    return candidate_tiles(wl, intrin)[0]


def pack_weights(w_q: np.ndarray, lanes: int = 4) -> np.ndarray:
    """int8 weights OIHW (linear: OI) -> ``[O/L, KH, KW, C4/4, L, 4]``, zero-padded to multiples of L and 4."""
    w = w_q if w_q.ndim == 4 else w_q[:, :, None, None]
    o, c, kh, kw = w.shape
    op, cp = up(o, lanes), up(c, K)
    wp = np.zeros((op, cp, kh, kw), np.int8)
    wp[:o, :c] = w
    return np.ascontiguousarray(wp.reshape(op // lanes, lanes, cp // K, K, kh, kw).transpose(0, 4, 5, 2, 1, 3))


def shifted_bias(w_q: np.ndarray, bias_i32: np.ndarray, shift: int = -128) -> np.ndarray:
    """The int32 bias for inputs shifted to ``x + shift``: ``bias - shift * sum(w)`` per output channel
    (checked to fit)."""
    b = bias_i32.astype(np.int64) - shift * w_q.astype(np.int64).reshape(w_q.shape[0], -1).sum(axis=1)
    if b.min() < -(2**31) or b.max() > 2**31 - 1:
        raise ValueError("dot-product kernel bias correction overflows int32")
    return b.astype(np.int32)


def input_shift(intrin: DotIntrin, in_dtype: str) -> int:
    """What the kernel adds to the layer's codes: 0 when the instruction takes them as they are."""
    return 0 if in_dtype == intrin.x_dtype else intrin.x_shift


def kernel_primfunc(wl: DotWorkload, intrin: DotIntrin, tiles: Tiles | None = None, tensorize: bool = True):
    """``(x[n,h,w,c] in_dtype, packed weights, bias[o] int32, mult[o] float32) -> codes [n,OH,OW,o]``
    (int8, or uint8 for a non-negative ``out_range``),
    scheduled with ``tiles`` (default: :func:`default_tiles`). ``tensorize=False`` keeps the same
    computation and loops without the instruction (runs on any CPU: layout and padding testable)."""
    import tvm
    from tvm import te, tirx

    tiles = tiles or default_tiles(wl, intrin)
    lanes, (kh, kw), (sh, sw), (ph, pw), (dh, dw) = intrin.lanes, wl.kernel, wl.stride, wl.padding, wl.dilation
    c4, ol = up(wl.c, K), up(wl.o, lanes) // lanes
    oh, ow = wl.out_hw
    shift = input_shift(intrin, wl.in_dtype)
    x = te.placeholder((wl.n, wl.c) if wl.linear else (wl.n, wl.h, wl.w, wl.c), wl.in_dtype, name="x")
    wp = te.placeholder((ol, kh, kw, c4 // K, lanes, K), "int8", name="wp")
    bias = te.placeholder((wl.o,), "int32", name="bias")
    mult = te.placeholder((wl.o,), "float32", name="mult")

    def shifted(v):
        return v if not shift else (v.astype("int16") + shift).astype(intrin.x_dtype)

    xp = te.compute((wl.n, wl.h + 2 * ph, wl.w + 2 * pw, c4), lambda b, i, j, ch: tirx.if_then_else(
        tirx.all(i >= ph, i < wl.h + ph, j >= pw, j < wl.w + pw, ch < wl.c),
        shifted(x[b, ch] if wl.linear else x[b, i - ph, j - pw, ch]),
        tirx.const(shift, intrin.x_dtype)), name="xp")  # padded channels meet zero weights
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    cb, ci = te.reduce_axis((0, c4 // K), "cb"), te.reduce_axis((0, K), "ci")
    acc = te.compute((wl.n, oh, ow, ol, lanes), lambda b, i, j, ob, oi: te.sum(
        xp[b, i * sh + rh * dh, j * sw + rw * dw, cb * K + ci].astype("int32")
        * wp[ob, rh, rw, cb, oi, ci].astype("int32"), axis=[rh, rw, cb, ci]), name="acc")
    lo, hi = wl.out_range
    def requantize(b, i, j, o):
        return tirx.Cast(wl.out_dtype, tirx.max(tirx.min(tirx.round(
            (acc[b, i, j, o // lanes, o % lanes] + bias[o]).astype("float32") * mult[o]), float(hi)), float(lo)))

    if wl.linear:
        out = te.compute((wl.n, wl.o), lambda b, o: requantize(b, 0, 0, o), name="out")
    else:
        out = te.compute((wl.n, oh, ow, wl.o), requantize, name="out")
    func = te.create_prim_func([x, wp, bias, mult, out])
    sch = tvm.s_tir.Schedule(func)
    _schedule(sch, intrin, tiles, tensorize, ow, ol, wl.o)
    # opaque (op_pattern 8, as TVM's own scheduled kernels): FuseOps leaves it whole, so the schedule,
    # the is_scheduled mark and the workload tag reach the build
    return (sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
            .with_attr(WORKLOAD_ATTR, wl.key()).with_attr(TILES_ATTR, f"{tiles.tile_w}x{tiles.tile_o}"))


def _schedule(sch, intrin: DotIntrin, tiles: Tiles, tensorize: bool, ow: int, ol: int, o: int) -> None:
    if ow % tiles.tile_w or ol % tiles.tile_o:
        raise ValueError(f"tiles {tiles} do not divide {ow} output columns x {ol} channel blocks")
    blk = sch.get_sblock("acc")
    b, i, j, ob, oi, rh, rw, cb, ci = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, tiles.tile_w])
    obo, obi = sch.split(ob, [None, tiles.tile_o])
    sch.reorder(b, i, jo, obo, rh, rw, cb, ji, obi, oi, ci)
    outer = sch.fuse(b, i)
    sch.parallel(outer)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, obo)  # requantize each tile right after its reduction
    if o % intrin.lanes == 0:  # whole vectors of output channels (no tail predicate)
        sch.vectorize(sch.get_loops(out)[-1])
    init = sch.decompose_reduction(blk, rh)
    sch.vectorize(sch.get_loops(init)[-1])
    if tensorize:
        register(intrin)
        sch.tensorize(oi, intrin.name)
    xp = sch.get_sblock("xp")
    sch.vectorize(sch.get_loops(xp)[-1])


def workload_of(spec: LayerSpec, p: IntLayerParams, intrin: DotIntrin, shape: list[int]) -> DotWorkload:
    """The kernel's workload for a layer whose codes have ``shape`` (NHWC, linear: N,C)."""
    o, c = p.w_q.shape[:2]
    if spec.kind == "linear":
        return DotWorkload(intrin.name, shape[0], 1, 1, c, o, (1, 1), (1, 1), (0, 0), (1, 1), p.in_dtype,
                           p.out_range, linear=True)
    return DotWorkload(intrin.name, shape[0], shape[1], shape[2], c, o, tuple(p.w_q.shape[2:]), tuple(spec.stride),
                       tuple(spec.padding), tuple(spec.dilation), p.in_dtype, p.out_range)


def emit_int8(bb, xq, spec: LayerSpec, p: IntLayerParams, intrin: DotIntrin, tensorize: bool = True,
              tiles: Tiles | None = None):
    """The layer's output codes (NHWC, linear: N,O; ``p.out_dtype``) through the dot-product kernel. ``xq``: its input
    codes, NHWC (linear: N,C), uint8 or int8. ``tiles``: default :func:`default_tiles` (a compile with a
    tuning database reschedules it, dot_tuning.py)."""
    from tvm import relax

    if not supports(spec):
        raise ValueError(f"layer {spec.fqn!r}: the dot-product kernel needs a conv with groups 1 or a linear layer")
    if p.out_offset is not None:
        raise ValueError(f"layer {spec.fqn!r}: the dot-product kernel adds an int32 bias, not a float one")
    shape = [int(d) for d in xq.ty.shape.values]  # from the tensor: export's specs carry no batch or in_hw
    wl = workload_of(spec, p, intrin, shape)
    bias = shifted_bias(p.w_q, p.bias_i32, input_shift(intrin, p.in_dtype))
    func = kernel_primfunc(wl, intrin, tiles, tensorize=tensorize)
    name = f"hwmpq_dot_{len(bb.get().functions)}"
    gv = bb.add_func(func.with_attr("global_symbol", name), name)
    out_shape = (wl.n, wl.o) if wl.linear else (wl.n, *wl.out_hw, wl.o)
    return bb.emit(relax.call_tir(gv, [xq, relax.const(pack_weights(p.w_q, intrin.lanes)), relax.const(bias),
                                       relax.const(p.multiplier.astype(np.float32))],
                                  relax.TensorType(out_shape, wl.out_dtype)))


def reference_acc(x_q: np.ndarray, spec: LayerSpec, p: IntLayerParams, intrin: DotIntrin) -> np.ndarray:
    """numpy model of the kernel's accumulation (shift, padding, packed weights, corrected bias), int64:
    the accumulator plus bias, for checking the packing and bias correction without the instruction."""
    linear = spec.kind == "linear"
    x = x_q.astype(np.int64).reshape(x_q.shape[0], 1, 1, -1) if linear else x_q.astype(np.int64)
    shift = input_shift(intrin, p.in_dtype)
    x, bias = x + shift, shifted_bias(p.w_q, p.bias_i32, shift).astype(np.int64)
    o, c = p.w_q.shape[:2]
    wp = pack_weights(p.w_q, intrin.lanes).astype(np.int64)  # [O/L, KH, KW, C4/4, L, 4]
    _, kh, kw, cb, lanes, _ = wp.shape
    (sh, sw), (ph, pw), (dh, dw) = ((1, 1), (0, 0), (1, 1)) if linear else (spec.stride, spec.padding, spec.dilation)
    n, h, w, _ = x.shape
    xp = np.full((n, h + 2 * ph, w + 2 * pw, cb * K), shift, np.int64)
    xp[:, ph:ph + h, pw:pw + w, :c] = x
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    acc = np.zeros((n, oh, ow, wp.shape[0], lanes), np.int64)
    for r in range(kh):
        for s in range(kw):
            win = xp[:, r * dh:r * dh + sh * (oh - 1) + 1:sh, s * dw:s * dw + sw * (ow - 1) + 1:sw]
            acc += np.einsum("nijbc,obdc->nijod", win.reshape(n, oh, ow, cb, K), wp[:, r, s])
    acc = acc.reshape(n, oh, ow, -1)[..., :o] + bias
    return acc.reshape(n, o) if linear else acc
