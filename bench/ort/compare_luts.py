"""How far two profiles of the same model on the same machine agree, row by row.

    python bench/ort/compare_luts.py A.lut B.lut [--json OUT]

Prints, per kind (layer, transition), the distribution of A/B over the rows both hold (quoted statistic,
p10) and the rows that differ most. Two back-to-back profiles measure the machine's row-level noise, which
bounds any LUT's fidelity: on a quiet machine they agree within a few percent (bench/ort/README.md).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from hwmpq.lut.store import LutStore

from hwmpq.records import atomic_write_text


def rows(path: str) -> dict:
    with LutStore.read(path) as store:
        return {(m.kind, m.signature, m.precision.label, m.src_precision.label if m.src_precision else ""): m.p10_ms
                for m in store.measurements() if m.ok and m.p10_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    a, b = rows(args.a), rows(args.b)
    common = [k for k in a if k in b]
    if not common:
        raise SystemExit("the two LUTs share no measured row (another model, config or device?)")
    report = {"a": args.a, "b": args.b, "rows": len(common)}
    for kind in ("layer", "transition", "all"):
        ratio = np.array([a[k] / b[k] for k in common if kind in ("all", k[0])])
        if ratio.size == 0:
            continue
        p5, p50, p95 = np.percentile(ratio, [5, 50, 95])
        report[kind] = {"n": int(ratio.size), "p5": p5, "median": p50, "p95": p95,
                        "within_10pct": float(np.mean(np.abs(ratio - 1) <= 0.10))}
        print(f"{kind:<11} {ratio.size:>5} rows  A/B median {p50:.3f}  5-95% {p5:.3f}..{p95:.3f}  "
              f"within 10%: {report[kind]['within_10pct']:.0%}")
    worst = sorted(common, key=lambda k: -abs(np.log(a[k] / b[k])))[:8]
    print("most different (kind, precision, producer precision: A ms, B ms):")
    for k in worst:
        print(f"  {k[0]:<10} {k[2]:>6} {k[3]:>6}  {a[k]:.4f}  {b[k]:.4f}  x{a[k] / b[k]:.2f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
