"""Per-layer latency on this machine's CPU: TVM (``tvm:host``) fp32 / int8 / bitserial, untuned and
optionally MetaSchedule-tuned, beside ONNX Runtime (``ort-x86``) for the same layers; tuning time too.

    python bench/tvm/bench_tvm.py --tune-trials 0 --repeat 50 --out bench/tvm/results

Prints a table and writes CSV + JSON. Timings are medians of ``repeat`` runs in one process; the machine
is shared, so quote ratios from one run and the p10-p90 spread printed beside each median."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from hwmpq.records import FP32, W8A8, LayerSpec, MeasureConfig, Precision, atomic_write_text

LAYERS = [
    LayerSpec("res20.conv16", "conv", 16, 16, (3, 3), (1, 1), (1, 1), in_hw=(32, 32), out_hw=(32, 32)),
    LayerSpec("res20.conv64", "conv", 64, 64, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8)),
    LayerSpec("mbv2.dw32", "dwconv", 32, 32, (3, 3), (1, 1), (1, 1), groups=32, in_hw=(16, 16), out_hw=(16, 16)),
    LayerSpec("fc", "linear", 256, 64),
]
PRECISIONS = [FP32, W8A8, Precision(4, 4), Precision(2, 2)]


def _stats(lat: tuple[float, ...] | None) -> dict[str, float | None]:
    if not lat:
        return {"median_ms": None, "p10_ms": None, "p90_ms": None}
    q = statistics.quantiles(lat, n=10) if len(lat) >= 10 else [min(lat)] * 9
    return {"median_ms": statistics.median(lat), "p10_ms": q[0], "p90_ms": q[-1]}


def measure(target, spec: LayerSpec, prec: Precision, config: MeasureConfig) -> dict:
    t0 = time.time()
    build = target.build_layer(spec, prec)
    build_s = time.time() - t0
    run = target.run(build, config) if build.error_msg is None else None
    err = build.error_msg or (run.error_msg if run else None)
    return {"layer": spec.fqn, "target": target.id, "precision": prec.label, "build_s": round(build_s, 2),
            **_stats(run.latencies_ms if run and run.error_msg is None else None), "error": err}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune-trials", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", default="bench/tvm/results")
    ap.add_argument("--work-dir", default="bench/tvm/work")
    args = ap.parse_args()
    from hwmpq.targets import get_target

    config = MeasureConfig(warmup=20, repeat=args.repeat, number=5, threads=1)
    targets = [get_target("tvm:host", work_dir=args.work_dir)]
    if args.tune_trials:
        targets.append(get_target("tvm:host", work_dir=args.work_dir, tune_trials=args.tune_trials))
    try:
        targets.append(get_target("ort-x86"))
    except Exception as e:  # noqa: BLE001 - the ORT target is another engineer's; bench what exists
        print(f"ort-x86 unavailable: {e}")
    rows = []
    for spec in LAYERS:
        for tgt in targets:
            for prec in PRECISIONS:
                if prec not in tgt.precisions.for_layer(spec):
                    continue
                row = measure(tgt, spec, prec, config)
                row["tune_trials"] = getattr(tgt, "tune_trials", 0)
                rows.append(row)
                med = f"{row['median_ms']:.4f}" if row["median_ms"] else "-"
                print(f"{row['layer']:14s} {row['target']:9s} t{row['tune_trials']:<4d} {row['precision']:5s} "
                      f"median {med:>9s} ms  p10-p90 {row['p10_ms'] or 0:.4f}-{row['p90_ms'] or 0:.4f}  "
                      f"build {row['build_s']:6.1f}s  {row['error'] or ''}"[:220], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench_tvm.json", json.dumps(rows, indent=1))
    cols = list(rows[0])
    atomic_write_text(out / "bench_tvm.csv", "\n".join([",".join(cols)] + [
        ",".join("" if r[c] is None else str(r[c]).replace(",", ";") for c in cols) for r in rows]) + "\n")


if __name__ == "__main__":
    main()
