"""Which (w_bits, a_bits) build through TOPI's bitserial operators and are bit-exact against the integer
reference (conv 16->16 3x3 and linear 32->8, host LLVM). Prints one line per pair and writes JSON.

    python bench/tvm/bitserial_sweep.py --out bench/tvm/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from hwmpq.targets.tvm import layers as L

from hwmpq.records import LayerSpec, Precision, atomic_write_text

SPECS = [LayerSpec("c", "conv", 16, 16, (3, 3), (1, 1), (1, 1), in_hw=(6, 6), out_hw=(6, 6)),
         LayerSpec("l", "linear", 32, 8)]


def check(spec: LayerSpec, prec: Precision) -> str:
    import tvm
    from tvm import relax

    L.BITSERIAL_PRECISIONS = (prec,)  # widen the allow-list for this probe only
    p = L.random_int_params(spec, prec, 0)
    x = L.int_input(spec, p, 1)
    bb = relax.BlockBuilder()
    v = relax.Var("x", relax.TensorType(x.shape, str(x.dtype)))
    with bb.function("main", [v]):
        with bb.dataflow():
            out = bb.emit_output(L.emit_bitserial_layer(bb, v, spec, p))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), "llvm"), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    return "exact" if np.array_equal(got, L.reference_int_layer(x, spec, p)) else "WRONG"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/tvm/results")
    args = ap.parse_args()
    rows = []
    for w in range(2, 9):
        for a in (2, 3, 4, 8):
            for spec in SPECS:
                try:
                    res = check(spec, Precision(w, a))
                except Exception as e:  # noqa: BLE001 - a failed build is the finding
                    res = f"build failed: {type(e).__name__}: {str(e)[:120]}"
                rows.append({"w_bits": w, "a_bits": a, "layer": spec.kind, "result": res})
                print(f"w{w}a{a} {spec.kind:6s} {res}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out) / "bitserial_sweep.json", json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
