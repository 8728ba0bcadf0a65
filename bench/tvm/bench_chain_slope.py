"""Layer rows + transition rows against the per-layer cost inside an exported model (tvm:host).

Exports chains of N = 1, 2, 4, 8 convs (3x3, 16 -> 16 channels, 32x32, ReLU after each) per pattern
(every layer at one precision, or two precisions alternating), times them, and fits the latency per
layer (slope over N, whole periods of the pattern only: the first layer's quantize and the last one's
dequantize cancel). The LUT's view of
the same step: the isolated layer row S(p) (minus the call overhead) plus the transition T on one edge,
T from the chain rows exactly as lut/model.py computes it (stand-in S', chain C):
``T[a,a] = max(0, C(a,a) - 2 S'(a) + overhead)``, ``T[a,b] = C(a,b) - (C(a,a) + C(b,b))/2 + (T[a,a] + T[b,b])/2``.

    python bench/tvm/bench_chain_slope.py --rounds 3 --out bench/tvm/results_chain_slope

Untuned, 1 thread, p10 of ``--repeat`` runs. Each round measures rows and exports back to back."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hwmpq.records import FP32, W8A8, LayerSpec, MeasureConfig, Precision, atomic_write_text, to_jsonable

W4A4 = Precision(4, 4)
SHAPE = (1, 16, 32, 32)
SPEC = LayerSpec("conv", "conv", 16, 16, (3, 3), (1, 1), (1, 1), in_hw=(32, 32), out_hw=(32, 32), bias=False)
PATTERNS = {"w8a8": (W8A8,), "w4a4": (W4A4,), "fp32": (FP32,), "w8a8/w4a4": (W8A8, W4A4), "w8a8/fp32": (W8A8, FP32)}
NS = (1, 2, 4, 8)


def chain(n: int):
    import torch
    from torch import nn

    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(16, 16, 3, padding=1, bias=False) for _ in range(n)])

        def forward(self, x):
            for c in self.convs:
                x = torch.relu(c(x))
            return x

    return Chain().eval()


def p10(run) -> float:
    if run.error_msg:
        raise SystemExit(run.error_msg)
    return float(np.percentile(run.latencies_ms, 10))


def lut_step(target, config, a: Precision, b: Precision) -> dict[str, float]:
    """Rows for one a -> b step: S(a) - overhead + T[a, b] (lut/model.py's formulas, from fresh rows)."""
    oh = p10(target.run(target.build_overhead(), config))
    stand_in = target.transition_stand_in(SHAPE)
    s = {p: p10(target.run(target.build_layer(SPEC, p), config)) for p in {a, b}}
    s_in = {p: p10(target.run(target.build_layer(stand_in, p), config)) for p in {a, b}}
    c = {(x, y): p10(target.run(target.build_transition(SHAPE, x, y), config)) for x in {a, b} for y in {a, b}}
    glue = {p: max(0.0, c[p, p] - 2 * s_in[p] + oh) for p in {a, b}}
    t_ab = glue[a] if a == b else c[a, b] - (c[a, a] + c[b, b]) / 2 + (glue[a] + glue[b]) / 2
    return {"layer_ms": s[a] - oh, "transition_ms": t_ab, "overhead_ms": oh}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--out", default="bench/tvm/results_chain_slope")
    ap.add_argument("--work-dir", default="bench/tvm/work")
    args = ap.parse_args()
    import torch
    from hwmpq.targets.tvm.target import TvmTarget

    from hwmpq.records import BitPlan

    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.rand(*SHAPE)  # >= 0 like a post-ReLU tensor, so the first layer may be bitserial
    target = TvmTarget("host", work_dir=args.work_dir)
    config = MeasureConfig(warmup=10, repeat=args.repeat, threads=1)
    out = Path(args.out)
    names = [p.strip() for p in args.patterns.split(",")]
    exports = {}
    for name in names:
        pat = PATTERNS[name]
        for n in NS:
            plan = BitPlan.from_dict({f"convs.{i}": pat[i % len(pat)] for i in range(n)})
            exports[name, n] = target.export(chain(n), plan, x, str(out / "exports" / name.replace("/", "_") / str(n)))
    rows = []
    for r in range(args.rounds):
        for name in names:
            pat = PATTERNS[name]
            steps = [lut_step(target, config, pat[i % len(pat)], pat[(i + 1) % len(pat)]) for i in range(len(pat))]
            measured = {n: p10(target.measure_artifact(exports[name, n], config)) for n in NS}
            whole = [n for n in NS if n % len(pat) == 0]  # whole periods only: N=1 of a/b is just a
            slope = float(np.polyfit(whole, [measured[n] for n in whole], 1)[0])
            rows_only = float(np.mean([s["layer_ms"] for s in steps]))
            with_t = float(np.mean([s["layer_ms"] + s["transition_ms"] for s in steps]))
            rows.append({"pattern": name, "round": r, "measured_ms": measured, "slope_ms_per_layer": slope,
                         "lut_layer_ms": rows_only, "lut_layer_plus_transition_ms": with_t,
                         "err_without_pct": 100 * (rows_only - slope) / slope,
                         "err_with_pct": 100 * (with_t - slope) / slope})
            print(f"round {r} {name:<10} slope {slope:.4f} ms/layer | rows {rows_only:.4f} "
                  f"({rows[-1]['err_without_pct']:+.1f}%) | rows+T {with_t:.4f} ({rows[-1]['err_with_pct']:+.1f}%) "
                  f"| N->ms {({n: round(v, 3) for n, v in measured.items()})}", flush=True)
    lines = [f"per-layer cost in exported chains (slope over N in {list(NS)}, whole periods) vs LUT rows, tvm:host untuned, 1 thread, "
             f"p10 of {args.repeat}", f"{'pattern':<10} {'round':>5} {'slope':>8} {'rows':>8} {'err':>7} "
             f"{'rows+T':>8} {'err':>7}"]
    for x_ in rows:
        lines.append(f"{x_['pattern']:<10} {x_['round']:>5} {x_['slope_ms_per_layer']:>8.4f} {x_['lut_layer_ms']:>8.4f} "
                     f"{x_['err_without_pct']:>+6.1f}% {x_['lut_layer_plus_transition_ms']:>8.4f} {x_['err_with_pct']:>+6.1f}%")
    mae = {k: float(np.mean([abs(x_[k]) for x_ in rows])) for k in ("err_with_pct", "err_without_pct")}
    lines.append(f"mean |error|: rows+T {mae['err_with_pct']:.1f}%, rows only {mae['err_without_pct']:.1f}%")
    lines.append("median over rounds (robust to one disturbed round):")
    for name in names:
        mine = [x_ for x_ in rows if x_["pattern"] == name]
        med = {k: float(np.median([x_[k] for x_ in mine])) for k in ("err_with_pct", "err_without_pct")}
        lines.append(f"  {name:<10} rows+T {med['err_with_pct']:+6.1f}%   rows only {med['err_without_pct']:+6.1f}%")
    text = "\n".join(lines)
    print(text)
    atomic_write_text(out / "table.txt", text + "\n")
    atomic_write_text(out / "results.json", json.dumps({"config": to_jsonable(config), "rows": rows, "mean_abs_err_pct": mae,
                                                        "device": target.device().details, "time_unix": time.time()},
                                                       indent=1, default=str))


if __name__ == "__main__":
    main()
