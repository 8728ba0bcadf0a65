"""The fp32 dense conv / linear layer as one tiled TE kernel on channel blocks of ``lanes`` floats (one
vector register: 16 on AVX-512), the layout of ORT's MLAS NCHWc convs and TVM's ``conv2d_NCHWc``.

Input and output stay NCHW (what the exporter's float glue and the layer rows carry): the kernel's
first stage packs the input into padded channel blocks ``[N, C/cb, H+2p, W+2p, cb]`` and its epilogue
writes NCHW, so a layer row times the whole layer as export emits it. Weights are packed at build time
to ``[O/L, C/cb, KH, KW, cb, L]`` (O zero-padded to a multiple of L lanes; cb = L, or C when C < L).

Schedule: a register tile of ``tile_w`` output pixels x ``tile_o`` blocks of L output channels,
accumulated with vector FMAs (each input value broadcast once per tile, each weight vector loaded once
per tile), the reduction over C blocks, KH, KW and the block's channels around it; bias and optional
ReLU added per tile from the accumulators; the outer loop parallel. ``order`` puts output rows
(``row``) or output-channel tiles (``block``, weights stay in cache over all pixels) outermost. Marked
``tirx.is_scheduled`` and opaque: MetaSchedule and operator fusion leave it alone; the tiles are tuned
per workload by dot_tuning.py (``fp_tiles.json``).
Conv with groups 1 (any kernel, stride, padding, dilation) and linear layers use it; depthwise and
grouped convs keep the Relax kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .tile_db import ConvWorkload

if TYPE_CHECKING:
    from hwmpq.records import LayerSpec

WORKLOAD_ATTR = "hwmpq.fp_workload"  # the PrimFunc attribute the tuner finds these kernels by
TILES_ATTR = "hwmpq.fp_tiles"  # the schedule it was built with, "WxO-order"
KERNEL_NAME = "tiled"


@dataclass(frozen=True)
class FpKernel:
    """The kernel for one vector width: ``lanes`` float32 per register."""

    lanes: int

    @property
    def name(self) -> str:
        """Recorded in device fingerprints, build file names and export manifests."""
        return f"nchw{self.lanes}c-{KERNEL_NAME}"


AVX512 = FpKernel(16)


def for_target(target: dict) -> FpKernel | None:
    """The kernel a TVM target dict gets: 16 lanes with AVX-512 F; else None (the Relax conv; AVX2 has 16
    registers and ARM presets are not checked with this kernel yet)."""
    return AVX512 if "+avx512f" in list(target.get("mattr", ())) else None


def supports(spec: LayerSpec) -> bool:
    """Layers the kernel builds: dense conv (groups 1) and linear."""
    return spec.kind in ("conv", "linear") and spec.groups == 1


def up(v: int, m: int) -> int:
    return -(-v // m) * m


def in_block(c: int, lanes: int) -> int:
    """Input channels per block: a whole vector, or all of them when fewer (the 3-channel stem)."""
    return c if c < lanes else lanes


@dataclass(frozen=True)
class FpWorkload(ConvWorkload):
    """Everything that fixes the kernel's code except the schedule (the tuning database key)."""

    lanes: int
    n: int
    h: int
    w: int
    c: int
    o: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    bias: bool
    relu: bool = False
    linear: bool = False  # x [n, c] -> [n, o] (no reshapes around the kernel)
    kind: str = "fp32-nchwc-" + KERNEL_NAME  # keeps these keys apart from the int8 kernel's

    @property
    def c_block(self) -> int:
        return in_block(self.c, self.lanes)



@dataclass(frozen=True)
class FpTiles:
    """``tile_w`` output pixels x ``tile_o`` blocks of L output channels; ``order``: ``row`` or ``block``."""

    tile_w: int
    tile_o: int
    order: str = "row"

    def label(self) -> str:
        return f"{self.tile_w}x{self.tile_o}-{self.order}"


MAX_ACCUMULATORS = 28  # of 32 vector registers: the rest hold weight vectors (x86 FMAs take the broadcast
# input from memory, so a 7 x 4 tile with its 4 weight vectors fits exactly)


def candidate_tiles(wl: FpWorkload) -> list[FpTiles]:
    """Schedules that divide the output, likeliest fastest first (the first is the untuned default):
    fewest loads per FMA ((tile_w + tile_o) / (tile_w * tile_o)) first, channel tiles outermost first
    (measured on resnet18's convs: as fast or faster, and 1.8x on 512 channels @7)."""
    ow, ol = wl.out_hw[1], up(wl.o, wl.lanes) // wl.lanes
    tws = [t for t in range(1, min(ow, 28) + 1) if ow % t == 0]
    tos = [t for t in range(1, min(ol, 8) + 1) if ol % t == 0]
    tiles = [(w, o) for w in tws for o in tos if w * o <= MAX_ACCUMULATORS and w * o + o <= 32]
    ranked = sorted(((w, o, order) for w, o in tiles for order in ("block", "row")),
                    key=lambda t: ((t[0] + t[1]) / (t[0] * t[1]) + (0.1 if t[2] == "row" else 0.0), -t[0]))
    return [FpTiles(*t) for t in ranked]


def default_tiles(wl: FpWorkload) -> FpTiles:
    return candidate_tiles(wl)[0]


def pack_weights(weight: np.ndarray, lanes: int) -> np.ndarray:
    """float32 weights OIHW (linear: OI) -> ``[O/L, C/cb, KH, KW, cb, L]``, O (and C) zero-padded."""
    w = weight if weight.ndim == 4 else weight[:, :, None, None]
    o, c, kh, kw = w.shape
    cb = in_block(c, lanes)
    op, cp = up(o, lanes), up(c, cb)
    wp = np.zeros((op, cp, kh, kw), np.float32)
    wp[:o, :c] = w
    return np.ascontiguousarray(wp.reshape(op // lanes, lanes, cp // cb, cb, kh, kw).transpose(0, 2, 4, 5, 3, 1))


def kernel_primfunc(wl: FpWorkload, tiles: FpTiles | None = None):
    """``(x[n,c,h,w] float32, packed weights[, bias[o]]) -> [n,o,OH,OW]`` (linear: ``[n,c] -> [n,o]``),
    scheduled with ``tiles`` (default: :func:`default_tiles`)."""
    import tvm
    from tvm import te, tirx

    tiles = tiles or default_tiles(wl)
    lanes, (kh, kw), (sh, sw), (ph, pw), (dh, dw) = wl.lanes, wl.kernel, wl.stride, wl.padding, wl.dilation
    cb = wl.c_block
    cbn, ol = up(wl.c, cb) // cb, up(wl.o, lanes) // lanes
    oh, ow = wl.out_hw
    x = te.placeholder((wl.n, wl.c) if wl.linear else (wl.n, wl.c, wl.h, wl.w), "float32", name="x")
    wp = te.placeholder((ol, cbn, kh, kw, cb, lanes), "float32", name="wp")
    bias = te.placeholder((wl.o,), "float32", name="bias") if wl.bias else None

    def load(b, ch, i, j):
        return x[b, ch] if wl.linear else x[b, ch, i - ph, j - pw]

    xp = te.compute((wl.n, cbn, wl.h + 2 * ph, wl.w + 2 * pw, cb), lambda b, cbo, i, j, ci: tirx.if_then_else(
        tirx.all(i >= ph, i < wl.h + ph, j >= pw, j < wl.w + pw, cbo * cb + ci < wl.c),
        load(b, cbo * cb + ci, i, j), tirx.const(0.0, "float32")), name="xp")
    rc, rh, rw, ri = (te.reduce_axis((0, cbn), "rc"), te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw"),
                      te.reduce_axis((0, cb), "ri"))
    acc = te.compute((wl.n, oh, ow, ol, lanes), lambda b, i, j, ob, oi: te.sum(
        xp[b, rc, i * sh + rh * dh, j * sw + rw * dw, ri] * wp[ob, rc, rh, rw, ri, oi], axis=[rc, rh, rw, ri]),
        name="acc")

    def epilogue(b, i, j, o):
        v = acc[b, i, j, o // lanes, o % lanes]
        v = v + bias[o] if bias is not None else v
        return tirx.max(v, tirx.const(0.0, "float32")) if wl.relu else v

    if wl.linear:
        out = te.compute((wl.n, wl.o), lambda b, o: epilogue(b, 0, 0, o), name="out")
    else:
        out = te.compute((wl.n, wl.o, oh, ow), lambda b, o, i, j: epilogue(b, i, j, o), name="out")
    args = [x, wp] + ([bias] if bias is not None else []) + [out]
    sch = tvm.s_tir.Schedule(te.create_prim_func(args))
    _schedule(sch, wl, tiles, ow, ol)
    return (sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
            .with_attr(WORKLOAD_ATTR, wl.key()).with_attr(TILES_ATTR, tiles.label()))


def _schedule(sch, wl: FpWorkload, tiles: FpTiles, ow: int, ol: int) -> None:
    if ow % tiles.tile_w or ol % tiles.tile_o:
        raise ValueError(f"tiles {tiles} do not divide {ow} output columns x {ol} channel blocks")
    blk = sch.get_sblock("acc")
    b, i, j, ob, oi, rc, rh, rw, ri = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, tiles.tile_w])
    obo, obi = sch.split(ob, [None, tiles.tile_o])
    if tiles.order == "block":
        sch.reorder(b, obo, i, jo, rc, rh, rw, ri, ji, obi, oi)
        outer, tile = sch.fuse(b, obo, i), jo
    else:
        sch.reorder(b, i, jo, obo, rc, rh, rw, ri, ji, obi, oi)
        outer, tile = sch.fuse(b, i), obo
    sch.parallel(outer)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, tile)  # bias/ReLU and the NCHW store right after the tile's reduction
    _epilogue_loops(sch, out, wl, tiles)
    sch.unroll(ji)
    sch.unroll(obi)
    sch.vectorize(oi)
    sch.decompose_reduction(blk, rc)  # the init loops keep the unroll/vectorize marks
    xp = sch.get_sblock("xp")
    sch.parallel(sch.fuse(*sch.get_loops(xp)[:2]))


def _epilogue_loops(sch, out, wl: FpWorkload, tiles: FpTiles) -> None:
    """The tile's output loops (its channels, then its pixels unless it has one): channels split into
    (block, lane), the lanes vectorised when they are whole vectors, the rest unrolled."""
    pixels = not wl.linear and tiles.tile_w > 1
    loops = sch.get_loops(out)[-2:] if pixels else sch.get_loops(out)[-1:]
    if wl.o % wl.lanes:
        return
    ob, lane = sch.split(loops[0], [None, wl.lanes])
    if pixels:
        sch.reorder(ob, loops[1], lane)
        sch.unroll(loops[1])
    sch.unroll(ob)
    sch.vectorize(lane)


def workload_of(spec: LayerSpec, shape: list[int], lanes: int, has_bias: bool, relu: bool = False) -> FpWorkload:
    """The kernel's workload for a layer whose input has ``shape`` (NCHW, linear: N,C)."""
    if spec.kind == "linear":
        return FpWorkload(lanes, shape[0], 1, 1, spec.in_channels, spec.out_channels, (1, 1), (1, 1), (0, 0),
                          (1, 1), has_bias, relu, linear=True)
    return FpWorkload(lanes, shape[0], shape[2], shape[3], spec.in_channels, spec.out_channels, tuple(spec.kernel),
                      tuple(spec.stride), tuple(spec.padding), tuple(spec.dilation), has_bias, relu)


def emit_fp32(bb, x, spec: LayerSpec, weight: np.ndarray, bias: np.ndarray | None, lanes: int,
              relu: bool = False, tiles: FpTiles | None = None):
    """The layer's float32 output (NCHW, linear: N,O) through the kernel; ``x`` NCHW (linear: N,C)."""
    from tvm import relax

    if not supports(spec):
        raise ValueError(f"layer {spec.fqn!r}: the fp32 tiled kernel needs a conv with groups 1 or a linear layer")
    shape = [int(d) for d in x.ty.shape.values]
    wl = workload_of(spec, shape, lanes, bias is not None, relu)
    func = kernel_primfunc(wl, tiles)
    name = f"hwmpq_fpconv_{len(bb.get().functions)}"
    gv = bb.add_func(func.with_attr("global_symbol", name), name)
    out_shape = (wl.n, wl.o) if wl.linear else (wl.n, wl.o, *wl.out_hw)
    args = [x, relax.const(pack_weights(weight.astype(np.float32), lanes))]
    if bias is not None:
        args.append(relax.const(bias.astype(np.float32)))
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))

