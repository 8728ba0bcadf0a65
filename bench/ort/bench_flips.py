"""Predicted vs measured cost of flipping single layers' precision, against a uniform base plan.

For each ``--flip`` layer (or block of layers joined by ``+``) and each base (all fp32, all w8a8), the
plan with those layers at the other precision is exported and timed with the base in ONE interleaved run;
the table shows measured and LUT-predicted deltas. Tells whether the LUT's boundary costs hold for single
boundaries, apart from whole-plan effects. The ``layout ops`` column counts the Transpose and NCHWc
Reorder nodes in ORT's optimized graph of each plan: a single float layer in an int8 model can change the
layout of the whole residual stream after it (bench/ort/README.md, "Session 7").

    python bench/ort/bench_flips.py --model mobilenetv2_050 --lut bench/search/results/luts/lut_mobilenetv2_050.sqlite \\
        --flip features.6.conv.1.0 features.6.conv.0.0 features.6.conv.0.0+features.6.conv.1.0+features.6.conv.2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings

import torch
from hwmpq.lut.cli import main_config
from hwmpq.lut.store import LutStore
from hwmpq.lut.validate import export_plan, measure_interleaved
from hwmpq.targets.ort.target import OrtTarget

from hwmpq.graph import analyse
from hwmpq.records import FP32, BitPlan, MeasureConfig, Precision, atomic_write_text
from hwmpq.search.loop import LoopConfig, load_table
from hwmpq.zoo import create_model

W8A8 = Precision.parse("w8a8")


def layout_ops(optimized_path: str) -> int:
    """Transpose and NCHWc Reorder nodes in ORT's optimized graph."""
    import onnx

    return sum(n.op_type in ("Transpose", "ReorderInput", "ReorderOutput") for n in onnx.load(optimized_path).graph.node)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--lut", required=True)
    ap.add_argument("--input-shape", default="1,1,28,28")
    ap.add_argument("--flip", nargs="+", required=True, help="layer fqns; a+b+c flips a block")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    shape = tuple(int(v) for v in a.input_shape.split(","))
    model = create_model(a.model, num_classes=10, in_chans=shape[1]).eval()
    x = torch.randn(shape)
    specs, _ = analyse(model, x)
    target = OrtTarget(threads=1)
    with LutStore.read(a.lut) as store:
        protocol = main_config(store, threads=1)
    table = load_table(LoopConfig(lut=a.lut, candidates=("fp32", "w8a8")), model, x, target, protocol)

    def plan(base: Precision, flipped: set[str]) -> BitPlan:
        other = W8A8 if base == FP32 else FP32
        return BitPlan(tuple((s.fqn, other if s.fqn in flipped else base) for s in specs))

    cases = {}
    for base in (W8A8, FP32):
        cases[(base.label, "-")] = plan(base, set())
        for f in a.flip:
            cases[(base.label, f)] = plan(base, set(f.split("+")))
    with tempfile.TemporaryDirectory(prefix="hwmpq-flips-") as tmp:
        exports = [export_plan(target, model, p, x, f"{tmp}/{i}") for i, p in enumerate(cases.values())]
        timed = measure_interleaved(target, exports, MeasureConfig(warmup=20, repeat=100, threads=1))
        layout = {k: layout_ops(f"{e.out_dir}/model.opt.onnx") for k, e in zip(cases, exports, strict=True)}
    measured = {k: t[0] for k, t in zip(cases, timed, strict=True)}
    rows = []
    print(f"{'base':6s} {'flipped':60s} {'meas ms':>8s} {'pred ms':>8s} {'d meas':>8s} {'d pred':>8s} {'layout ops':>10s}")
    for (base, f), p in cases.items():
        pred, base_pred = table.predict(p)[0], table.predict(cases[(base, "-")])[0]
        row = {"base": base, "flipped": f, "measured_ms": measured[(base, f)], "predicted_ms": pred,
               "delta_measured_ms": measured[(base, f)] - measured[(base, "-")], "delta_predicted_ms": pred - base_pred,
               "layout_ops": layout[(base, f)]}
        rows.append(row)
        print(f"{base:6s} {f[:60]:60s} {row['measured_ms']:8.4f} {pred:8.4f} {row['delta_measured_ms']:+8.4f} "
              f"{row['delta_predicted_ms']:+8.4f} {layout[(base, f)]:10d}")
    if a.json:
        atomic_write_text(a.json, json.dumps({"model": a.model, "lut": a.lut, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
