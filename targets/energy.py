"""Layer energy: measured from a powercap counter when the machine has one, else an analytic model.

Analytic model (labelled ``modeled``): ``MACs x E_mac(kernel precision) + bytes moved x E_byte``, with
constants from M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
45 nm, 0.9 V: 8-bit int multiply 0.2 pJ, 32-bit int add 0.1 pJ, 32-bit float multiply 3.7 pJ, 32-bit
float add 0.9 pJ, 16-bit int multiply ~0.8 pJ (multiplier energy grows ~quadratically with width, 0.2 pJ
x (16/8)^2), a 64-bit read from a 32 KB SRAM 20 pJ (2.5 pJ/byte). Bytes moved = weights at their width
+ input and output activations at theirs (each touched once: a lower bound that ignores cache misses).
Only the kernel ORT really runs counts: precisions that ORT executes as float compute between Q/DQ
(anything but w8a8 and int4 weight-only here) are charged float MACs.
"""

from __future__ import annotations

import glob
import math
import time

from hwmpq.records import LayerSpec, Precision

PJ_INT8_MUL, PJ_INT32_ADD = 0.2, 0.1
PJ_FP32_MUL, PJ_FP32_ADD = 3.7, 0.9
PJ_INT16_MUL = PJ_INT8_MUL * (16 / 8) ** 2
PJ_PER_BYTE_SRAM = 20.0 / 8
INTEGER_KERNELS = {(8, 8)}  # precisions that run as integer arithmetic on ort-x86


def mac_energy_pj(precision: Precision, integer_kernel: bool) -> float:
    """Energy of one multiply-accumulate of the kernel that actually runs."""
    if not integer_kernel:
        return PJ_FP32_MUL + PJ_FP32_ADD
    width = max(precision.w_bits, precision.a_bits)
    mul = PJ_INT8_MUL * (width / 8) ** 2 if width != 16 else PJ_INT16_MUL
    return mul + PJ_INT32_ADD


def bytes_moved(spec: LayerSpec, precision: Precision) -> float:
    act_elems = math.prod(spec.input_shape) + math.prod(spec.output_shape)
    return spec.params * precision.w_bits / 8 + act_elems * precision.a_bits / 8


def modeled_energy_mj(spec: LayerSpec, precision: Precision,
                      integer_kernels: set[tuple[int, int]] = INTEGER_KERNELS) -> float:
    integer = (precision.w_bits, precision.a_bits) in integer_kernels
    pj = spec.macs * mac_energy_pj(precision, integer) + bytes_moved(spec, precision) * PJ_PER_BYTE_SRAM
    return pj * 1e-9  # pJ -> mJ


def powercap_counter() -> str | None:
    """Path of a readable RAPL/powercap ``energy_uj`` counter, if this machine has one."""
    for path in sorted(glob.glob("/sys/class/powercap/*/energy_uj")):
        try:
            with open(path) as f:
                int(f.read().strip())
            return path
        except (OSError, ValueError):
            continue
    return None


def read_energy_uj(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def measure_energy_mj(path: str, fn, runs: int) -> float:
    """Integrate the counter over ``runs`` calls of ``fn`` (mJ per call; counter wrap ignored if positive)."""
    start, t0 = read_energy_uj(path), time.perf_counter()
    for _ in range(runs):
        fn()
    delta = read_energy_uj(path) - start
    if delta < 0 or time.perf_counter() - t0 <= 0:
        raise RuntimeError(f"{path}: counter wrapped or did not advance")
    return delta / 1e3 / runs


def layer_energy(spec: LayerSpec, precision: Precision, latency_ms: float | None) -> tuple[float | None, str]:
    """(energy_mj, source). Per-layer measurement through the counter needs the session, which the
    profiler does not hand over here, so layer energy is modeled; whole-model energy can be measured with
    :func:`measure_energy_mj` where a counter exists."""
    del latency_ms
    return modeled_energy_mj(spec, precision), "modeled"
