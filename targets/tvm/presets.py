"""TVM target presets as data (TVM ``tag_registry/arm_cpu.py`` style): an LLVM target dict, the cross
compiler that links for the board, and the precisions hwmpq can really build and run there."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from hwmpq.records import FP32, Precision

from ..base import TargetPrecisions
from .dot_intrin import DotIntrin, for_target
from .fpconv import FpKernel
from .fpconv import for_target as fp_kernel_for

AARCH64_CXX = "aarch64-linux-gnu-g++"

_INT8 = Precision(8, 8)
# Bitserial (TOPI bitserial_conv2d_nhwc / bitserial_dense, unsigned activations, unsigned-offset weights).
# bench/tvm/bitserial_sweep.py found every w in 2..8 x a in {2,3,4,8} bit-exact (conv and linear); the
# search is offered this subset (each offered pair costs a profile job per layer):
BITSERIAL_PRECISIONS = (Precision(2, 2), Precision(3, 3), Precision(4, 4), Precision(2, 4), Precision(4, 8))
_ALL = (FP32, _INT8, *BITSERIAL_PRECISIONS)
# Depthwise has no bitserial operator in TOPI: fp32 and int8 only.
_DEFAULT_PRECISIONS = TargetPrecisions(conv=_ALL, dwconv=(FP32, _INT8), linear=_ALL)


class UnknownPresetError(ValueError):
    """A ``tvm:PRESET`` name that is not in :data:`PRESETS`."""


@dataclass(frozen=True)
class TvmPreset:
    """One board family. ``target`` is the TVM target dict; ``host`` resolves the local CPU lazily."""

    name: str
    description: str
    target: Mapping[str, object]
    cross_compiler: str | None = None  # None: the host's own compiler (tvm's default)
    precisions: TargetPrecisions = field(default=_DEFAULT_PRECISIONS)

    @property
    def is_host(self) -> bool:
        return self.cross_compiler is None

    @property
    def dotprod(self) -> bool:
        """The target has ``+dotprod``: int8 dense conv and linear layers are built with sdot."""
        return "+dotprod" in self.target.get("mattr", ())

    def dot_intrin(self) -> DotIntrin | None:
        """The dot-product instruction the int8 kernels use (dot_intrin.py): sdot with ``+dotprod``, VNNI on
        a host whose CPU flags have it, else None (the Relax kernel)."""
        spec = dict(self.target)
        if self.is_host:
            spec.update(host_cpu_attrs())
        return for_target(spec)

    def fp_kernel(self) -> FpKernel | None:
        """The fp32 dense conv / linear kernel (fpconv.py) for this preset's vector width, else None (Relax)."""
        spec = dict(self.target)
        if self.is_host:
            spec.update(host_cpu_attrs())
        return fp_kernel_for(spec)


def _arm(mcpu: str | None, mattr: tuple[str, ...], cores: int = 4) -> dict[str, object]:
    target: dict[str, object] = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": list(mattr),
                                 "num-cores": cores}  # MetaSchedule needs num-cores
    if mcpu:
        target["mcpu"] = mcpu
    return target


PRESETS: Mapping[str, TvmPreset] = {
    "host": TvmPreset("host", "this machine's CPU through TVM (real timings here)", {"kind": "llvm"}),
    "arm-a72": TvmPreset("arm-a72", "Raspberry Pi 4 (Cortex-A72, NEON, no dotprod)",
                         _arm("cortex-a72", ("+neon",)), AARCH64_CXX),
    "arm-a76-dotprod": TvmPreset("arm-a76-dotprod", "Cortex-A76 class phone/board SoC (NEON + sdot)",
                                 _arm("cortex-a76", ("+neon", "+dotprod")), AARCH64_CXX),
    "arm-neon": TvmPreset("arm-neon", "generic aarch64 with NEON", _arm(None, ("+neon",)), AARCH64_CXX),
}


def get_preset(name: str) -> TvmPreset:
    if name not in PRESETS:
        raise UnknownPresetError(f"unknown TVM preset {name!r}; known presets: {sorted(PRESETS)} "
                                 "(use e.g. --target tvm:arm-a72)")
    return PRESETS[name]


def tvm_target(preset: TvmPreset):
    """The ``tvm.target.Target`` of a preset; ``host`` gets the local CPU name from LLVM."""
    import tvm

    spec = dict(preset.target)
    if preset.is_host:
        spec.update(host_cpu_attrs())
        spec["num-cores"] = os.cpu_count() or 1
        spec["mtriple"] = "x86_64-linux-gnu" if "x86_64" in _system_triple() else _system_triple()
    return tvm.target.Target(spec)


_X86_FEATURES = {"avx2": "+avx2", "fma": "+fma", "avx512f": "+avx512f", "avx512bw": "+avx512bw",
                 "avx512vl": "+avx512vl", "avx512dq": "+avx512dq", "avx512_vnni": "+avx512vnni",
                 "avx_vnni": "+avxvnni", "f16c": "+f16c", "bmi2": "+bmi2"}


def host_cpu_attrs() -> dict[str, object]:
    """mcpu/mattr from /proc/cpuinfo flags, not LLVM's host-CPU probe: in a KVM guest LLVM may name the
    physical CPU (e.g. ``znver4``) while the guest masks its AVX-512, and the code dies with SIGILL."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    if not flags:
        return {}
    mcpu = "x86-64-v3" if {"avx2", "fma", "bmi2"} <= set(flags) else "x86-64"
    if mcpu == "x86-64-v3" and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
        mcpu = "x86-64-v4"
    return {"mcpu": mcpu, "mattr": [v for k, v in _X86_FEATURES.items() if k in flags]}


def _system_triple() -> str:
    import tvm

    return str(tvm.get_global_func("target.llvm_get_system_triple")())
