"""sdot on ``arm-a76-dotprod``: the int8 layer built with and without the sdot kernel (targets/tvm/sdot.py).

Since the sdot kernel moved into the library, this builds each w8a8 layer twice through
``layers.single_layer_module``: ``dotprod=False`` (the Relax ``conv2d``/``matmul`` kernel legalized by TOPI,
what arm-a72 / arm-neon build) and ``dotprod=True`` (what the arm-a76-dotprod preset profiles and exports).
For each, counts ``sdot`` in ``aarch64-linux-gnu-objdump -d`` of the cross-linked .so and, with ``--qemu``,
checks the output on the aarch64 RPC server under qemu-user (scripts/arm_rpc_sysroot.sh) against
``reference_int_layer``. Numerics and instructions only: qemu timings are not latencies.

    python bench/tvm/sdot_probe.py --qemu --out bench/tvm/results_sdot
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

LAYERS = [
    LayerSpec("conv3x3", "conv", 16, 16, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8)),
    LayerSpec("conv3x3_s2", "conv", 16, 32, (3, 3), (2, 2), (1, 1), in_hw=(8, 8), out_hw=(4, 4)),
    LayerSpec("conv1x1", "conv", 32, 8, (1, 1), in_hw=(5, 5), out_hw=(5, 5)),
    LayerSpec("conv1x1_s8", "conv", 32, 8, (1, 1), in_hw=(5, 5), out_hw=(5, 5)),
    LayerSpec("conv3x3_s8", "conv", 16, 16, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8)),
    LayerSpec("stem_c1_o10", "conv", 1, 10, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8)),
    LayerSpec("linear", "linear", 64, 12),
    LayerSpec("dw3x3", "dwconv", 16, 16, (3, 3), (1, 1), (1, 1), groups=16, in_hw=(8, 8), out_hw=(8, 8)),
]
SIGNED_INPUT = {"conv1x1_s8", "conv3x3_s8"}  # these take int8 codes (no ReLU before them): no shift, zero padding


def build(spec: LayerSpec, sdot: bool, out: Path, target, cxx: str) -> tuple[str, np.ndarray, object, float]:
    import tvm
    from hwmpq.targets.tvm import layers as L
    from tvm.support import cc

    p = L.random_int_params(spec, W8A8)
    if spec.fqn in SIGNED_INPUT:
        p = replace(p, in_signed=True)
    x = L.int_input(spec, p)
    mod = L._wrap(lambda bb, v: L.emit_int8_layer(bb, v, spec, p, dotprod=sdot), x)
    t0 = time.time()
    ex = tvm.compile(mod, target)
    lib = out / f"{spec.fqn}-{'dotprod' if sdot else 'library'}.so"
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
    out = Path(args.out)
    (out / "libs").mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in LAYERS:
        for sdot in (False, True):
            lib, x, p, build_s = build(spec, sdot, out / "libs", target, preset.cross_compiler)
            rows.append({"layer": spec.fqn, "kernel": ("dotprod" if sdot else "library")
                         + ("" if L.uses_sdot(spec, sdot) or not sdot else "(relax)"), "lib": lib,
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
    lines = [f"{'layer':<12} {'kernel':<15} {'sdot in .so':>11} {'exact (qemu)':>13}"]
    for r in rows:
        lines.append(f"{r['layer']:<12} {r['kernel']:<15} {r['sdot_count']:>11} {str(r.get('exact_on_qemu', '-')):>13}")
    text = "\n".join(lines)
    print(text)
    atomic_write_text(out / "table.txt", text + "\n")
    keep = [{k: v for k, v in r.items() if k not in ("x", "p", "spec")} for r in rows]
    atomic_write_text(out / "results.json", json.dumps({"preset": preset.name, "target": str(target),
                                                        "rows": keep, "time_unix": time.time()}, indent=1))


if __name__ == "__main__":
    main()
