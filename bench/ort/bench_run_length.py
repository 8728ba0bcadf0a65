"""Does a long run pay more per layer than a short one, on this machine? N copies of one conv in a chain.

Builds fp32 ONNX models of N identical convs (with ReLU; default 16->16 3x3 on 32x32, ~0.03 ms, whose
weights stay in L2; ``--channels 320 --kernel 1 --hw 4``: 0.39 MB of weights each, so a long chain
streams its weights from L3 as a whole model's late layers do) for
N in ``--lengths``, times them round-robin in one run (``lut.validate.measure_interleaved``, p10), and
prints p10(N) / (N x p10(1)): the price per conv of a long run against a short one. The convs and their
layouts are the same at every N, so on a machine of steady speed the ratio stays ~1 (it falls a little
with N as the per-call overhead is shared). If the machine switches between a fast and a slow state
every millisecond or two (bench_duty_cycle.py), a short run's p10 is a run wholly in the fast state,
while a run longer than the fast stretches cannot be: the ratio rises with N. That is an error the
LUT's latency model (sums of short rows, each quoting p10) makes on long models and does not see.

    python bench/ort/bench_run_length.py --lengths 1,4,16,64,160 --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from hwmpq.lut.validate import measure_interleaved
from hwmpq.targets.ort.target import OrtTarget
from torch import nn

from hwmpq.records import BuildResult, MeasureConfig, atomic_write_text


def chain(n: int, channels: int, kernel: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(n) for m in (nn.Conv2d(channels, channels, kernel, padding=kernel // 2),
                                                         nn.ReLU())]).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1,4,16,64,160")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--hw", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    target = OrtTarget(threads=1)
    x = torch.randn(1, args.channels, args.hw, args.hw)
    with tempfile.TemporaryDirectory(prefix="hwmpq-run-length-") as tmp:
        builds = []
        for n in lengths:
            path = os.path.join(tmp, f"chain{n}.onnx")
            torch.onnx.export(chain(n, args.channels, args.kernel), (x,), path, dynamo=False, opset_version=17, input_names=["x"])
            builds.append(BuildResult(path))
        timed = measure_interleaved(target, builds, MeasureConfig(warmup=10, repeat=args.repeat, rounds=args.rounds))
    target.cleanup()
    base = timed[0][0] / lengths[0]
    weights_mb = args.channels ** 2 * args.kernel ** 2 * 4 / 2**20
    rows = [{"convs": n, "weights_mb": n * weights_mb, "p10_ms": t[0], "p90_ms": t[2], "per_conv_ms": t[0] / n, "per_conv_over_shortest": t[0] / n / base}
            for n, t in zip(lengths, timed, strict=True)]
    print(f"{args.channels}->{args.channels} {args.kernel}x{args.kernel} convs on {args.hw}x{args.hw}, "
          f"{weights_mb:.2f} MB of fp32 weights each")
    print(f"{'convs':>5}  {'p10 ms':>8}  {'p90 ms':>8}  {'ms/conv':>8}  {'x shortest':>10}")
    for r in rows:
        print(f"{r['convs']:>5}  {r['p10_ms']:>8.4f}  {r['p90_ms']:>8.4f}  {r['per_conv_ms']:>8.4f}  "
              f"{r['per_conv_over_shortest']:>10.3f}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"rows": rows, "repeat": args.repeat, "rounds": args.rounds,
                                                 "channels": args.channels, "kernel": args.kernel, "hw": args.hw},
                                                indent=1) + "\n")


if __name__ == "__main__":
    main()
