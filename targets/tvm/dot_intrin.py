"""The two 4-element int8 dot-product instructions the integer kernels tensorize to, as data, and their
TVM tensor intrinsics: ARM ``sdot`` (``+dotprod``: int8 x int8, 4 int32 lanes) and x86 ``vpdpbusd``
(AVX-512 VNNI: uint8 x int8, 16 int32 lanes).

The intrinsics are TVM's own (``tvm/s_tir/tensor_intrin/arm_cpu.py`` ``ARM_DOT_4x4_i8_SDOT_INTRIN`` and
``x86.py`` ``VNNI_DOT_16x4_INTRIN``), declared here because importing ``tvm.s_tir.tensor_intrin`` also
imports its CUDA intrinsics, which takes 181 s on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass

K = 4  # input channels per dot product (both instructions)


@dataclass(frozen=True)
class DotIntrin:
    """One dot-product instruction: ``lanes`` int32 outputs += ``lanes`` dot products of 4 codes."""

    name: str  # the TensorIntrin name registered with TVM
    lanes: int
    x_dtype: str  # the activation codes the instruction multiplies ("int8" or "uint8"); weights are int8
    llvm_intrin: str
    kernel_name: str  # recorded in device fingerprints and export manifests

    @property
    def x_shift(self) -> int:
        """What the kernel adds to ``in_dtype`` codes to reach ``x_dtype`` codes (uint8 <-> int8: -128/+128)."""
        return -128 if self.x_dtype == "int8" else 128


SDOT = DotIntrin("hwmpq_sdot_4x4_i8i8i32", 4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8", "sdot-tiled")
VNNI = DotIntrin("hwmpq_vnni_16x4_u8i8i32", 16, "uint8", "llvm.x86.avx512.vpdpbusd.512", "vnni-tiled")

_registered: set[str] = set()


def register(intrin: DotIntrin) -> None:
    """Register ``intrin`` with TVM once per process."""
    if intrin.name in _registered:
        return
    from tvm.s_tir import TensorIntrin

    desc = _desc(intrin)
    impl = _sdot_impl(intrin) if intrin is SDOT else _vnni_impl(intrin)
    TensorIntrin.register(intrin.name, desc, impl, override=True)
    _registered.add(intrin.name)


def _desc(intrin: DotIntrin):
    from tvm.script import tirx as T

    lanes, xd = intrin.lanes, intrin.x_dtype

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (K,), dtype=xd, offset_factor=1)
        B = T.match_buffer(b, (lanes, K), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), dtype="int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:K], B[0:lanes, 0:K])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, K):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], dtype="int32") * T.cast(B[vi, vk], dtype="int32")

    return desc


def _sdot_impl(intrin: DotIntrin):
    from tvm.script import tirx as T

    name = intrin.llvm_intrin

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
                T.llvm_lookup_intrinsic_id(name), C.vload([0], dtype="int32x4"), vec_a,
                B.vload([0, 0], dtype="int8x16"), dtype="int32x4")

    return impl


def _vnni_impl(intrin: DotIntrin):
    from tvm.script import tirx as T

    name = intrin.llvm_intrin

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), dtype="uint8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), dtype="int8", offset_factor=1)
        C = T.match_buffer(c, (16,), dtype="int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")  # LLVM 17+: <64 x i8> operands
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(name), C.vload([0], dtype="int32x16"), a_u8,
                B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    return impl


def for_target(target: dict | object) -> DotIntrin | None:
    """The instruction a TVM target dict (or ``tvm.target.Target``) has: sdot with ``+dotprod``, VNNI
    with ``+avx512vnni`` (plus AVX-512 BW), else None (the Relax int8 kernel)."""
    if isinstance(target, dict):
        mattr = list(target.get("mattr", ()))
    else:
        mattr = [str(a) for a in target.attrs.get("mattr", [])]
    if "+dotprod" in mattr:
        return SDOT
    if "+avx512vnni" in mattr and "+avx512bw" in mattr:
        return VNNI
    return None
