"""Which small probe tracks a whole model's slowdowns on a shared machine?

The LUT's speed probes (``lut.model.SPEED_PROBES``) are timed beside every chunk of a profile and beside
every validation: the reference (a 32->32 3x3 conv on 16x16 that stays in L2) and, since session 6 and
on this bench's evidence, a memory-bound probe (``MEMORY_REFERENCE``: a 256->256 1x1 conv on 32x32, 1 MB
in, 1 MB out, beyond the 1 MB L2). This times both, round-robin for ``--minutes``, and whole fp32 models, one p10 per short window each, and reports how each probe's
window-to-window speed follows the whole models' (correlation of log times, and the range of each).

    python bench/ort/bench_speed_probes.py --models mobilenetv2,resnet20 --minutes 4 --json OUT
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from hwmpq.lut.model import MEMORY_REFERENCE, REFERENCE
from hwmpq.lut.validate import export_plan
from hwmpq.targets.ort.target import OrtTarget

from hwmpq.graph import analyse
from hwmpq.records import FP32, BitPlan, BuildResult, MeasureConfig, atomic_write_text
from hwmpq.zoo import create_model
from hwmpq.zoo.registry import default_input_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenetv2,resnet20")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--repeat", type=int, default=40, help="runs per item per window")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    target = OrtTarget(threads=1)
    one = MeasureConfig(warmup=5, repeat=args.repeat, rounds=1)
    items: dict[str, BuildResult] = {"reference": target.build_layer(REFERENCE, FP32),
                                     "memory_probe": target.build_layer(MEMORY_REFERENCE, FP32)}
    with tempfile.TemporaryDirectory(prefix="hwmpq-probes-") as tmp:
        for name in args.models.split(","):
            model = create_model(name, num_classes=10).eval()
            x = torch.randn(default_input_shape(name))
            specs, _ = analyse(model, x)
            plan = BitPlan.from_dict({s.fqn: FP32 for s in specs})
            items[name] = BuildResult(export_plan(target, model, plan, x, f"{tmp}/{name}").artifact)
        series: dict[str, list[float]] = {k: [] for k in items}
        t_end = time.perf_counter() + args.minutes * 60
        while time.perf_counter() < t_end:
            for k, b in items.items():
                run = target.run(b, one)
                series[k].append(float(np.percentile(run.latencies_ms, 10)))
    target.cleanup()
    logs = {k: np.log(np.asarray(v)) for k, v in series.items()}
    models = args.models.split(",")
    report = {"windows": len(series["reference"]), "minutes": args.minutes, "series_ms": series, "probes": {}}
    print(f"{len(series['reference'])} windows over {args.minutes} min; per item: max/min of its window p10")
    for k, v in series.items():
        print(f"  {k:<14} {min(v):.4f}..{max(v):.4f} ms  x{max(v) / min(v):.2f}")
    for probe in ("reference", "memory_probe"):
        corr = {m: float(np.corrcoef(logs[probe], logs[m])[0, 1]) for m in models}
        report["probes"][probe] = {"range": max(series[probe]) / min(series[probe]), "corr_with": corr}
        print(f"{probe:<14} correlation of log time with " + ", ".join(f"{m} {c:+.2f}" for m, c in corr.items()))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
