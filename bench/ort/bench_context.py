"""Do isolated layer rows explain whole-model latency? Hot rows against cache-cold rows, one run.

In a whole model, a layer's weights were last touched one inference ago, after every other layer's
weights and activations went through the caches; in an isolated row timed back to back they stay in L1/L2.
This times, in one interleaved run (1 thread, thread CPU clock, p10):

- the whole fp32 model, hot (back-to-back runs) and with the cache evicted before every run;
- every layer alone, hot and cold (the same eviction, outside the timed region).

It prints the sum of rows (each minus the empty-session overhead, plus one overhead) against the whole
model, for hot and cold rows, and writes JSON. The eviction writes ``--evict-mb`` MB (default 4, above
this EPYC's 512 KB L2) and reads it back.

    python bench/ort/bench_context.py --models mobilenetv2,resnet20 --out bench/ort/results/context
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from hwmpq.lut.validate import export_plan
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import make_session, random_feeds

from hwmpq.graph import analyse
from hwmpq.records import FP32, BitPlan, atomic_write_text
from hwmpq.zoo import create_model
from hwmpq.zoo.registry import default_input_shape


class Evictor:
    def __init__(self, mb: float) -> None:
        self.buf = np.zeros(int(mb * 2**20) // 8, dtype=np.float64)

    def __call__(self) -> None:
        self.buf += 1.0  # read and write every line


def time_runs(session, feeds, n: int, evict: Evictor | None) -> list[float]:
    out = []
    for _ in range(n):
        if evict is not None:
            evict()
        t0 = time.thread_time()
        session.run(None, feeds)
        out.append((time.thread_time() - t0) * 1e3)
    return out


def _pick(options, rng):
    return options[int(rng.integers(len(options)))]


def plans_for(specs, target, kinds: list[str], seed: int) -> dict[str, BitPlan]:
    rng = np.random.default_rng(seed)
    plans = {}
    for kind in kinds:
        if kind.startswith("random"):
            for i in range(int(kind.partition(":")[2] or 1)):
                plans[f"random{i}"] = BitPlan(tuple((s.fqn, _pick(target.precisions.for_layer(s), rng))
                                                    for s in specs))
        else:
            p = next(p for p in target.precisions.all if p.label == kind)
            plans[kind] = BitPlan(tuple((s.fqn, p if p in target.precisions.for_layer(s) else FP32) for s in specs))
    return plans


def bench_model(name: str, target: OrtTarget, work: Path, kinds: list[str], rounds: int, per_round: int,
                warmup: int, evictor: Evictor | None, seed: int, shape: tuple[int, ...] | None) -> list[dict]:
    torch.manual_seed(0)
    shape = shape or default_input_shape(name)
    model = create_model(name, num_classes=10, in_chans=shape[1]).eval()
    x = torch.randn(shape)
    specs, _ = analyse(model, x)
    plans = plans_for(specs, target, kinds, seed)
    items = {"<overhead>": target.build_overhead().artifact}
    for k, plan in plans.items():
        items[("whole", k)] = export_plan(target, model, plan, x, str(work / f"{name}_{k}")).artifact
        for s, (_, p) in zip(specs, plan.layers, strict=True):
            items.setdefault((s.fqn, p.label), target.build_layer(s, p).artifact)
    modes = ("hot", "cold") if evictor else ("hot",)
    samples = {(k, mode): [] for k in items for mode in modes}
    for _ in range(rounds):
        for k, path in items.items():
            sess = make_session(path, 1)
            feeds = random_feeds(sess)
            for _ in range(warmup):
                sess.run(None, feeds)
            for mode in modes:
                samples[(k, mode)] += time_runs(sess, feeds, per_round, evictor if mode == "cold" else None)
    p10 = {key: float(np.percentile(v, 10)) for key, v in samples.items()}
    out = []
    for k, plan in plans.items():
        whole = p10[(("whole", k), "hot")]
        res = {"model": name, "plan": k, "layers": len(specs), "input": list(x.shape), "whole_ms": whole,
               "precisions": {p.label: sum(q == p for _, q in plan.layers) for _, p in plan.layers}}
        for mode in modes:
            oh = p10[("<overhead>", mode)]
            rows = sum(p10[((s.fqn, p.label), mode)] - oh for s, (_, p) in zip(specs, plan.layers, strict=True)) + oh
            res[f"rows_{mode}_ms"] = rows
            res[f"rows_{mode}_error_pct"] = (rows - whole) / whole * 100
        out.append(res)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenetv2,resnet20")
    ap.add_argument("--plans", default="fp32,w8a8,random:3", help="uniform precisions and random:N")
    ap.add_argument("--cold", action="store_true", help="also time every row and model with the cache evicted")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input-shape", default=None, help="e.g. 1,1,28,28 (default: the zoo's)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--evict-mb", type=float, default=4.0)
    ap.add_argument("--out", default="runs/bench_context")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    target = OrtTarget(threads=1, workdir=str(out / "work"))
    evictor = Evictor(a.evict_mb) if a.cold else None
    results = [r for m in a.models.split(",") for r in
               bench_model(m, target, out / "work", a.plans.split(","), a.rounds, a.per_round, a.warmup, evictor,
                           a.seed, tuple(int(v) for v in a.input_shape.split(",")) if a.input_shape else None)]
    print(f"{'model':<14}{'plan':<10}{'whole ms':>9}{'rows hot':>10}{'err':>8}{'rows cold':>11}{'err':>8}")
    for r in results:
        cold = (f"{r['rows_cold_ms']:>11.3f}{r['rows_cold_error_pct']:>7.1f}%" if "rows_cold_ms" in r else "")
        print(f"{r['model']:<14}{r['plan']:<10}{r['whole_ms']:>9.3f}{r['rows_hot_ms']:>10.3f}"
              f"{r['rows_hot_error_pct']:>7.1f}%{cold}")
    atomic_write_text(out / "bench_context.json", json.dumps({"evict_mb": a.evict_mb, "rounds": a.rounds,
                                                              "per_round": a.per_round, "results": results}, indent=1))


if __name__ == "__main__":
    main()
