"""Probe: can hwmpq's int8 layer use ARM ``sdot`` on ``arm-a76-dotprod``? (investigation, not the library)

Builds the w8a8 integer layer of targets/tvm/layers.py twice for the preset: the library's kernel (Relax
``conv2d``/``matmul`` legalized by TOPI, untuned) and a TE kernel tensorized with TVM's ARM dot-product
intrinsic (``sdot.v4i32.v16i8``: 4 int32 lanes += 4x4 int8 dot products). For each, counts ``sdot`` in
``aarch64-linux-gnu-objdump -d`` of the cross-linked .so and, with ``--qemu``, checks the layer's output
on the aarch64 RPC server under qemu-user (scripts/arm_rpc_sysroot.sh) against ``reference_int_layer``.

    python bench/tvm/sdot_probe.py --qemu --out bench/tvm/results_sdot

The sdot kernel: weights packed at build time to [O/4, KH, KW, C/4, 4(o), 4(c)] so one 4x4 block is 16
contiguous bytes; activations NHWC so 4 input channels are 4 contiguous bytes. hwmpq's activations are
uint8 after a ReLU and sdot is int8 x int8, so codes are shifted to ``x - 128`` (padding with -128, the
shifted zero) and ``128 * sum(w)`` per output channel is added back to the int32 bias: exact. Only the
innermost 4x4 is scheduled (no tiling, no parallelism): this shows the instruction and the numerics, not
speed; qemu timings are not latencies. Needs C and O multiples of 4, groups == 1 (else: the library kernel).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from hwmpq.records import W8A8, LayerSpec, atomic_write_text

SDOT = "hwmpq_sdot_4x4_i8i8i32"
LAYERS = [
    LayerSpec("conv3x3", "conv", 16, 16, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8)),
    LayerSpec("conv3x3_s2", "conv", 16, 32, (3, 3), (2, 2), (1, 1), in_hw=(8, 8), out_hw=(4, 4)),
    LayerSpec("conv1x1", "conv", 32, 8, (1, 1), in_hw=(5, 5), out_hw=(5, 5)),
    LayerSpec("conv1x1_s8", "conv", 32, 8, (1, 1), in_hw=(5, 5), out_hw=(5, 5)),
    LayerSpec("conv3x3_s8", "conv", 16, 16, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8)),
    LayerSpec("linear", "linear", 64, 12),
]
SIGNED_INPUT = {"conv1x1_s8", "conv3x3_s8"}  # these take int8 codes (no ReLU before them): no shift, zero padding


def register_sdot() -> None:
    """TVM's ``ARM_DOT_4x4_i8_SDOT_INTRIN`` (tvm/s_tir/tensor_intrin/arm_cpu.py), re-declared here because
    importing that package also imports the CUDA intrinsics (181 s on this machine)."""
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


def sdot_conv_primfunc(n: int, hw: tuple[int, int], c: int, o: int, k: tuple[int, int], stride, pad, pad_value):
    """int8 NHWC x packed int8 -> int32 [N, OH, OW, O/4, 4], the 4x4 inner block tensorized to sdot."""
    import tvm
    from tvm import te

    h, w = hw
    (kh, kw), (sh, sw), (ph, pw) = k, stride, pad
    x = te.placeholder((n, h, w, c), "int8", name="x")
    wp = te.placeholder((o // 4, kh, kw, c // 4, 4, 4), "int8", name="wp")
    xp = te.compute((n, h + 2 * ph, w + 2 * pw, c), lambda b, i, j, ch: tvm.tirx.if_then_else(
        tvm.tirx.all(i >= ph, i < h + ph, j >= pw, j < w + pw), x[b, i - ph, j - pw, ch],
        tvm.tirx.const(pad_value, "int8")), name="xp")
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    cb, ci = te.reduce_axis((0, c // 4), "cb"), te.reduce_axis((0, 4), "ci")
    acc = te.compute((n, oh, ow, o // 4, 4), lambda b, i, j, ob, oi: te.sum(
        xp[b, i * sh + rh, j * sw + rw, cb * 4 + ci].astype("int32") * wp[ob, rh, rw, cb, oi, ci].astype("int32"),
        axis=[rh, rw, cb, ci]), name="acc")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, wp, acc]))
    blk = sch.get_sblock("acc")
    b, i, j, ob, oi, rh_, rw_, cb_, ci_ = sch.get_loops(blk)
    sch.reorder(b, i, j, ob, rh_, rw_, cb_, oi, ci_)
    sch.decompose_reduction(blk, rh_)
    sch.tensorize(oi, SDOT)
    return sch.mod["main"], (n, oh, ow, o)


def emit_int8_layer_sdot(bb, xq, spec: LayerSpec, p):
    """Drop-in for layers.emit_int8_layer (same inputs, same int8 codes out) using the sdot kernel."""
    from hwmpq.targets.tvm.layers import _requantize
    from tvm import relax

    if spec.groups != 1 or spec.in_channels % 4 or spec.out_channels % 4 or spec.dilation != (1, 1):
        raise ValueError(f"{spec.fqn}: the sdot probe needs groups 1, no dilation, C and O multiples of 4")
    w = p.w_q if spec.kind != "linear" else p.w_q[:, :, None, None]  # OIHW
    o, c, kh, kw = w.shape
    packed = np.ascontiguousarray(w.reshape(o // 4, 4, c // 4, 4, kh, kw).transpose(0, 4, 5, 2, 1, 3))
    n = spec.batch
    hw = (1, 1) if spec.kind == "linear" else spec.in_hw
    x = xq if spec.kind != "linear" else bb.emit(relax.op.reshape(xq, (n, 1, 1, c)))
    if not p.in_signed:  # uint8 codes -> int8 (x - 128); the lost 128 * sum(w) goes back into the bias
        x = bb.emit(relax.op.astype(relax.op.subtract(relax.op.astype(x, "int16"), relax.const(np.int16(128))),
                                    "int8"))
        p = replace(p, bias_i32=(p.bias_i32.astype(np.int64) + 128 * w.astype(np.int64).sum(axis=(1, 2, 3)))
                    .astype(np.int32))
    stride = (1, 1) if spec.kind == "linear" else spec.stride
    pad = (0, 0) if spec.kind == "linear" else spec.padding
    func, oshape = sdot_conv_primfunc(n, hw, c, o, (kh, kw), stride, pad, 0 if p.in_signed else -128)
    gv = bb.add_func(func.with_attr("global_symbol", f"sdot_{spec.fqn}"), f"sdot_{spec.fqn}")
    acc = bb.emit(relax.call_tir(gv, [x, relax.const(packed)],
                                 relax.TensorType((n, oshape[1], oshape[2], o // 4, 4), "int32")))
    acc = bb.emit(relax.op.reshape(acc, (n, o) if spec.kind == "linear" else oshape))
    return _requantize(bb, acc, p)


def build(spec: LayerSpec, sdot: bool, out: Path, target, cxx: str) -> tuple[str, np.ndarray, object, float]:
    import tvm
    from hwmpq.targets.tvm import layers as L
    from tvm.support import cc

    p = L.random_int_params(spec, W8A8)
    if spec.fqn in SIGNED_INPUT:
        p = replace(p, in_signed=True)
    x = L.int_input(spec, p)
    emit = emit_int8_layer_sdot if sdot else L.emit_int8_layer
    mod = L._wrap(lambda bb, v: emit(bb, v, spec, p), x)
    t0 = time.time()
    ex = tvm.compile(mod, target)
    lib = out / f"{spec.fqn}-{'sdot' if sdot else 'library'}.so"
    ex.export_library(str(lib), fcompile=cc.cross_compiler(cxx))
    return str(lib), x, p, time.time() - t0


def count_sdot(lib: str) -> int:
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", lib], capture_output=True, text=True, check=True)
    return sum(1 for ln in dis.stdout.splitlines() if "\tsdot\t" in ln)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qemu", action="store_true", help="check outputs on the aarch64 RPC server under qemu")
    ap.add_argument("--out", default="bench/tvm/results_sdot")
    args = ap.parse_args()
    from hwmpq.targets.tvm import layers as L
    from hwmpq.targets.tvm.presets import get_preset, tvm_target

    preset = get_preset("arm-a76-dotprod")
    target = tvm_target(preset)
    register_sdot()
    out = Path(args.out)
    (out / "libs").mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in LAYERS:
        for sdot in (False, True):
            lib, x, p, build_s = build(spec, sdot, out / "libs", target, preset.cross_compiler)
            rows.append({"layer": spec.fqn, "kernel": "sdot-probe" if sdot else "library", "lib": lib,
                         "sdot_count": count_sdot(lib), "build_s": round(build_s, 2), "x": x, "p": p, "spec": spec})
    if args.qemu:
        root = Path(__file__).resolve().parents[2]
        sys.path.insert(0, str(root / "tests"))
        from hwmpq.targets.tvm import rpc as R
        from tvm_rpc_fixture import free_port, rpc_server

        port = free_port()
        with rpc_server(port, cmd=["bash", str(root / "scripts/arm_rpc_sysroot.sh"), "serve", str(port)],
                        start_timeout_s=600) as (addr, _):
            pool = R.SessionPool(R.RemoteSpec(addr, None, None, 600))
            try:
                for r in rows:
                    got = R.outputs_remote(pool.get(), r["lib"], [r["x"]])
                    ref = L.reference_int_layer(r["x"], r["spec"], r["p"])
                    r["exact_on_qemu"] = bool(got.shape == ref.shape and np.array_equal(got, ref))
            finally:
                pool.close()
    lines = [f"{'layer':<11} {'kernel':<11} {'sdot in .so':>11} {'exact (qemu)':>13}"]
    for r in rows:
        lines.append(f"{r['layer']:<11} {r['kernel']:<11} {r['sdot_count']:>11} {str(r.get('exact_on_qemu', '-')):>13}")
    text = "\n".join(lines)
    print(text)
    atomic_write_text(out / "table.txt", text + "\n")
    keep = [{k: v for k, v in r.items() if k not in ("x", "p", "spec")} for r in rows]
    atomic_write_text(out / "results.json", json.dumps({"preset": preset.name, "target": str(target),
                                                        "rows": keep, "time_unix": time.time()}, indent=1))


if __name__ == "__main__":
    main()
