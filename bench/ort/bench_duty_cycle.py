"""Is this machine's speed two-state, and on what time scale? Run by run, for one small layer row.

Times one single-layer session (resnet20's first 16->16 3x3 conv at w8a8 by default, ~0.03 ms) back to
back for ``--seconds`` and reports the distribution of single runs, a threshold between a fast and a slow
state (halfway between p5 and p75), the fraction of fast runs per ``--window`` seconds, and how long
fast and slow stretches last. On the session-6 VM (2 vCPU AMD EPYC): 73% of runs fast at 0.0275 ms,
the rest at ~0.044 ms (1.6x), fast stretches of 0.4-1.8 ms, and a fast fraction per 0.5 s window from
0.06 to 0.94. A layer row timed in a few rounds of back-to-back runs can therefore land wholly in the
slow state (bench/ort/README.md, "Session 6").

    python bench/ort/bench_duty_cycle.py --seconds 20 --json OUT
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import make_session, random_feeds

from hwmpq.graph import analyse
from hwmpq.records import Precision, atomic_write_text
from hwmpq.zoo import create_model
from hwmpq.zoo.registry import default_input_shape


def stretches(fast: np.ndarray, ts: np.ndarray) -> dict[bool, list[float]]:
    """Durations (s) of the runs of consecutive fast (True) and slow (False) samples."""
    out: dict[bool, list[float]] = {True: [], False: []}
    start, cur = 0, bool(fast[0])
    for i in range(1, len(fast)):
        if bool(fast[i]) != cur:
            out[cur].append(float(ts[i] - ts[start]))
            start, cur = i, bool(fast[i])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--layer", default="layers.0.0.conv1")
    ap.add_argument("--precision", default="w8a8")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--window", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = create_model(args.model, num_classes=10).eval()
    specs, _ = analyse(model, torch.randn(default_input_shape(args.model)))
    spec = next(s for s in specs if s.fqn == args.layer)
    target = OrtTarget(threads=1)
    build = target.build_layer(spec, Precision.parse(args.precision))
    session = make_session(build.artifact, 1)
    feeds = random_feeds(session)
    for _ in range(50):
        session.run(None, feeds)
    lat, ts = [], []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        a = time.perf_counter()
        session.run(None, feeds)
        lat.append((time.perf_counter() - a) * 1e3)
        ts.append(a - t0)
    target.cleanup()
    lat_a, ts_a = np.asarray(lat), np.asarray(ts)
    pcts = dict(zip(("p1", "p5", "p10", "p25", "p50", "p75", "p90"),
                    np.percentile(lat_a, [1, 5, 10, 25, 50, 75, 90]).tolist(), strict=True))
    thr = (pcts["p5"] + pcts["p75"]) / 2
    fast = lat_a < thr
    win = (ts_a // args.window).astype(int)
    per_window = [float(fast[win == k].mean()) for k in range(int(win.max())) if np.any(win == k)]
    runs = stretches(fast, ts_a)
    report = {"layer": args.layer, "precision": args.precision, "runs": len(lat), "percentiles_ms": pcts,
              "threshold_ms": thr, "fast_fraction": float(fast.mean()),
              "fast_ms_median": float(np.median(lat_a[fast])) if fast.any() else None,
              "slow_ms_median": float(np.median(lat_a[~fast])) if (~fast).any() else None,
              "fast_fraction_per_window": per_window,
              "stretch_ms_p50_p90": {("fast" if k else "slow"): (np.percentile(v, [50, 90]) * 1e3).tolist()
                                     for k, v in runs.items() if v}}
    print(f"{len(lat)} runs of {args.layer} at {args.precision} over {args.seconds:.0f} s")
    print("percentiles (ms): " + "  ".join(f"{k} {v:.4f}" for k, v in pcts.items()))
    print(f"fast (< {thr:.4f} ms): {report['fast_fraction']:.0%} of runs, median {report['fast_ms_median']:.4f} ms; "
          f"slow median {report['slow_ms_median']:.4f} ms")
    print(f"fast fraction per {args.window} s window: min {min(per_window):.2f}  median "
          f"{np.median(per_window):.2f}  max {max(per_window):.2f}")
    for k, (p50, p90) in report["stretch_ms_p50_p90"].items():
        print(f"{k} stretches: median {p50:.2f} ms, p90 {p90:.2f} ms")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
