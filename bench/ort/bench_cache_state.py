"""Do a model's layers run slower inside the model because of the cache state the rest of it leaves, and
can a layer row timed alone reproduce that?

For one uniform plan of one model, every layer is timed in five cache states, round-robin over
``--reps`` repetitions so that a slow spell of the machine hits all alike:

- ``in_model``: ORT's node profiler inside the whole exported model (the truth for kernels);
- ``warm``: the layer row alone, run back to back (what the LUT holds);
- ``np8`` / ``np32``: alone, after a numpy pass over 8 / 32 MB before every run;
- ``model``: alone, after the whole model ran (untimed) before every run;
- ``model_sibling``: as ``model``, then a copy of the layer with other weights on the same input (code,
  input and output warm again; the timed layer's weights still evicted).

Two clocks: ORT's per-node kernel time (``kernel_*`` columns, as in bench_in_context.py) and the wall time
of ``session.run`` (``wall_*``: what a LUT row is). Prints per-layer kernel times and both sums and
writes ``--json``. Measured (bench/ort/README.md, "Session 7"): the model filler reproduces the in-model
kernel times, but the wall time of a session run after it is 1.7-2.5x the model's share (a cold session,
not a cold kernel), so LUT rows timed that way over-predicted by 23-54%.

    python bench/ort/bench_cache_state.py --model mobilenetv2 --precision fp32 --json OUT
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from hwmpq.lut.context import uniform_plans
from hwmpq.lut.validate import export_plan
from hwmpq.targets.ort import layers
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import random_feeds, read_kernel_trace, session_options

from hwmpq.graph import analyse
from hwmpq.records import FP32, Precision, atomic_write_text
from hwmpq.zoo import create_model
from hwmpq.zoo.registry import default_input_shape

MODES = ("warm", "np8", "np32", "model", "model_sibling")


def session(path_or_bytes, workdir: str | None = None):
    so = session_options(1)
    if workdir:
        so.enable_profiling = True
        so.profile_file_prefix = f"{workdir}/prof"
    s = ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])
    return s, random_feeds(s)


def kernel_ms(s) -> list[float]:
    """Median kernel time per kernel node (execution order) from a profiling session's trace."""
    return [float(np.median(ms)) for _, _, ms in read_kernel_trace(s.end_profiling())]


def sibling(spec, precision):
    """The layer row's graph with other random weights."""
    seeded = layers._rng
    layers._rng = lambda s: np.random.default_rng(12345)
    try:
        return layers.layer_model(spec, precision).SerializeToString()
    finally:
        layers._rng = seeded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenetv2")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per layer, state and repetition")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    precision = FP32 if args.precision == "fp32" else Precision.parse(args.precision)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).eval()
    x = torch.randn(default_input_shape(args.model))
    specs, _ = analyse(model, x)
    target = OrtTarget(threads=1)
    plan = uniform_plans(specs, target)[precision]
    tmp = tempfile.mkdtemp(prefix="hwmpq-cache-state-")
    whole = export_plan(target, model, plan, x, f"{tmp}/whole").artifact
    filler, filler_feeds = session(whole)
    buffers = {"np8": np.zeros(2 ** 21, np.float32), "np32": np.zeros(2 ** 23, np.float32)}
    rows = {s.fqn: layers.layer_model(s, dict(plan.layers)[s.fqn]).SerializeToString() for s in specs}
    siblings = {s.fqn: session(sibling(s, dict(plan.layers)[s.fqn]))[0] for s in specs}
    kern: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    wall: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    whole_ms = []
    for rep in range(args.reps):
        s, feeds = session(whole, tmp)
        t = []
        for _ in range(args.runs * 5):
            t0 = time.perf_counter()
            s.run(None, feeds)
            t.append(time.perf_counter() - t0)
        whole_ms.append(float(np.percentile(t, 10)) * 1e3)
        in_model = kernel_ms(s)
        assert len(in_model) == len(specs), (len(in_model), len(specs))
        for spec, ms in zip(specs, in_model, strict=True):
            kern["in_model"][spec.fqn].append(ms)
        for mode in MODES:
            for spec in specs:
                s, feeds = session(rows[spec.fqn], tmp)
                sib = siblings[spec.fqn]
                before = {"warm": lambda: None, "np8": lambda: buffers["np8"].__iadd__(1.0),
                          "np32": lambda: buffers["np32"].__iadd__(1.0),
                          "model": lambda: filler.run(None, filler_feeds),
                          "model_sibling": lambda sib=sib, feeds=feeds: (filler.run(None, filler_feeds),
                                                                     sib.run(None, feeds))}[mode]
                t = []
                for _ in range(args.runs):
                    before()
                    t0 = time.perf_counter()
                    s.run(None, feeds)
                    t.append(time.perf_counter() - t0)
                wall[mode][spec.fqn].append(float(np.percentile(t, 10)) * 1e3)
                kern[mode][spec.fqn].append(kernel_ms(s)[0])
        print(f"rep {rep}: whole model p10 {whole_ms[-1]:.3f} ms", flush=True)
    med = lambda d: {f: float(np.median(v)) for f, v in d.items()}  # noqa: E731
    kernels = {m: med(kern[m]) for m in ("in_model", *MODES)}
    walls = {m: med(wall[m]) for m in MODES}
    print(f"{'layer':28s} {'w KB':>6s} " + " ".join(f"{m:>13s}" for m in kernels))
    for spec in specs:
        print(f"{spec.fqn:28s} {spec.params * 4 / 1024:6.0f} " + " ".join(f"{kernels[m][spec.fqn]:13.4f}" for m in kernels))
    sums = {f"kernel_{m}": sum(v.values()) for m, v in kernels.items()} | {f"wall_{m}": sum(v.values()) for m, v in walls.items()}
    print(f"whole model p10 (median of reps): {np.median(whole_ms):.3f} ms")
    for k, v in sums.items():
        print(f"  sum {k:22s} {v:.3f} ms")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps({"model": args.model, "precision": precision.label,
                                                 "whole_model_p10_ms": whole_ms, "sums_ms": sums,
                                                 "kernel_ms": kernels, "wall_ms": walls}, indent=1) + "\n")
    target.cleanup()


if __name__ == "__main__":
    main()
