"""How stable is a whole-model latency from one interleaved run to the next? Times the given exported
models (model.onnx of `hwmpq export` directories) in N back-to-back interleaved runs (each: 5 rounds,
p10 of ``--repeat`` samples) and prints per model the p10 of every run, its spread, and the ratio to
the first model in every run (the ratio is what the other benches report).

    python bench/ort/bench_repeatability.py runs/bs/r20_lat/resnet20_uniform_fp32_export \\
        runs/bs/r20_lat/resnet20_uniform_8_export --runs 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hwmpq.lut.validate import measure_interleaved
from hwmpq.targets.base import ExportResult
from hwmpq.targets.ort.target import OrtTarget

from hwmpq.records import MeasureConfig, atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exports", nargs="+", help="export directories (with model.onnx)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    target = OrtTarget(threads=1)
    exports = [ExportResult(d, str(Path(d) / "model.onnx"), "") for d in a.exports]
    config = MeasureConfig(warmup=a.warmup, repeat=a.repeat, threads=1)
    runs = [[r[0] for r in measure_interleaved(target, exports, config)] for _ in range(a.runs)]
    rows = []
    for k, d in enumerate(a.exports):
        ms = [run[k] for run in runs]
        ratio = [run[k] / run[0] for run in runs]
        rows.append({"export": d, "p10_ms": ms, "spread_pct": (max(ms) / min(ms) - 1) * 100,
                     "ratio_to_first": ratio, "ratio_spread_pct": (max(ratio) / min(ratio) - 1) * 100})
        print(f"{Path(d).name:40s} " + " ".join(f"{v:.4f}" for v in ms) + f"  spread {rows[-1]['spread_pct']:.1f}%"
              f"  x first " + " ".join(f"{v:.3f}" for v in ratio) + f"  spread {rows[-1]['ratio_spread_pct']:.1f}%")
    if a.json:
        atomic_write_text(a.json, json.dumps({"runs": a.runs, "warmup": a.warmup, "repeat": a.repeat, "rows": rows},
                                             indent=1))


if __name__ == "__main__":
    main()
