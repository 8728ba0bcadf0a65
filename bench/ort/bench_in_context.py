"""Where a whole model's time goes, per ORT node, against the same layers timed alone.

ORT's own profiler (``SessionOptions.enable_profiling``) gives every node's kernel time. For a uniform
plan of one model this times, alternating over ``--reps`` repetitions so that a slow spell of the machine
hits every variant alike:

- the whole exported model (hwmpq export): its per-op-type kernel sums;
- every layer alone (the LUT's layer row, targets/ort/layers.py: ``layer_model``): kernels and the
  NCHWc reorders an isolated fp32 row pays;
- every layer alone followed by the activation on its output edge (``layers.layer_model``: what ORT fuses
  into a float conv in the whole model, and what the pair chains include since session 5).

    python bench/ort/bench_in_context.py --model mobilenetv2 --precision fp32 --out D

Writes ``D/in_context_<model>_<precision>.json`` and prints the sums (p10 of each node's kernel time,
in ms). Measured on mobilenetv2 fp32 @32 (session 5, results/pairs/in_context_mobilenetv2_fp32.json):
the whole model's conv kernels took 2.90-3.00 ms against 2.03-2.13 ms for the same convs alone;
appending each layer's ReLU6 (a Clip) brought the alone sum to 2.38-2.41 ms.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from hwmpq.lut.model import edges_through_merges
from hwmpq.lut.validate import export_plan
from hwmpq.targets.ort import layers
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import KERNEL_OPS, random_feeds, session_options

from hwmpq.graph import analyse
from hwmpq.records import FP32, BitPlan, Precision, atomic_write_text
from hwmpq.zoo import create_model
from hwmpq.zoo.registry import default_input_shape

KERNELS = KERNEL_OPS


def node_times(path: str, runs: int, workdir: str) -> list[tuple[str, str, float]]:
    """(node name, op type, p10 kernel ms) per node of the optimized graph, in execution order."""
    import onnxruntime as ort

    so = session_options(1)
    so.enable_profiling = True
    so.profile_file_prefix = f"{workdir}/prof"
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = random_feeds(sess)
    for _ in range(runs):
        sess.run(None, feeds)
    per: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    with open(sess.end_profiling()) as f:
        for ev in json.load(f):
            if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
                per[(ev["name"][: -len("_kernel_time")], ev["args"].get("op_name", "?"))].append(ev["dur"])
    return [(n, op, float(np.percentile(v, 10)) / 1000) for (n, op), v in per.items()]


def by_op(times) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for _, op, ms in times:
        out[op] += ms
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenetv2")
    ap.add_argument("--precision", default="fp32", help="fp32 or wXaY (uniform; fp32 where not allowed)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=200, help="runs per session (per-node p10 over them)")
    ap.add_argument("--out", default="runs/in_context")
    args = ap.parse_args()
    precision = FP32 if args.precision == "fp32" else Precision.parse(args.precision)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).eval()
    x = torch.randn(default_input_shape(args.model))
    specs, _ = analyse(model, x)
    act_after = {e.src: e.activation for e in edges_through_merges(model, x)}
    target = OrtTarget(threads=1)
    plan = BitPlan.from_dict({s.fqn: precision if precision in target.precisions.for_layer(s) else FP32 for s in specs})
    reps = []
    with tempfile.TemporaryDirectory(prefix="hwmpq-in-context-") as tmp:
        whole = export_plan(target, model, plan, x, f"{tmp}/whole").artifact
        alone, alone_act = {}, {}
        for s in specs:
            p = dict(plan.layers)[s.fqn]
            key = (s.signature, p.label, act_after.get(s.fqn, "none"))
            if key not in alone_act:
                onnx.save(layers.layer_model(s, p), f"{tmp}/{len(alone)}.onnx")
                onnx.save(layers.layer_model(s, p, key[2]), f"{tmp}/{len(alone)}_act.onnx")
                alone[key], alone_act[key] = f"{tmp}/{len(alone)}.onnx", f"{tmp}/{len(alone)}_act.onnx"
        keys = [(s.signature, dict(plan.layers)[s.fqn].label, act_after.get(s.fqn, "none")) for s in specs]
        for r in range(args.reps):
            w = by_op(node_times(whole, args.runs, tmp))
            rows = {k: by_op(node_times(p, args.runs // 2, tmp)) for k, p in alone.items()}
            rows_act = {k: by_op(node_times(p, args.runs // 2, tmp)) for k, p in alone_act.items()}

            def total(table, kernels_only):
                return sum(ms for k in keys for op, ms in table[k].items() if (op in KERNELS) == kernels_only)

            rep = {"whole_kernels_ms": sum(ms for op, ms in w.items() if op in KERNELS),
                   "whole_other_ms": sum(ms for op, ms in w.items() if op not in KERNELS), "whole_by_op": w,
                   "alone_kernels_ms": total(rows, True), "alone_other_ms": total(rows, False),
                   "alone_with_activation_kernels_ms": total(rows_act, True),
                   "alone_with_activation_other_ms": total(rows_act, False)}
            reps.append(rep)
            print(f"rep {r}: whole kernels {rep['whole_kernels_ms']:.3f} (+{rep['whole_other_ms']:.3f} other) | "
                  f"alone kernels {rep['alone_kernels_ms']:.3f} (+{rep['alone_other_ms']:.3f} reorders etc.) | "
                  f"alone + activation kernels {rep['alone_with_activation_kernels_ms']:.3f} "
                  f"(+{rep['alone_with_activation_other_ms']:.3f})", flush=True)
    target.cleanup()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"in_context_{args.model}_{precision.label}.json"
    atomic_write_text(path, json.dumps({"model": args.model, "precision": precision.label,
                                        "activations": collections.Counter(act_after.values()), "reps": reps},
                                       indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
