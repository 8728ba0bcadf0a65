"""Price the plans of earlier `lut validate` reports again with a LUT's table as it is now, with and
without the kernels in context (lut/context.py), against the latencies those reports measured.

The plans were timed before the LUT's kernel rows existed, so the deltas cannot have been fitted to them.

    python bench/ort/reprice.py --model mobilenetv2 --lut bench/ort/results/s7/mobilenetv2.lut \\
        bench/ort/results/s7/val_s*_mobilenetv2.json --json OUT
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import torch
from hwmpq.lut.cli import main_config
from hwmpq.lut.model import build_table, edges_through_merges
from hwmpq.lut.store import LutStore
from hwmpq.targets.ort.target import OrtTarget

from hwmpq.graph import analyse
from hwmpq.records import BitPlan, Precision, atomic_write_text
from hwmpq.zoo import create_model
from hwmpq.zoo.registry import default_input_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--lut", required=True)
    ap.add_argument("reports", nargs="+", help="JSON reports of `hwmpq lut validate --json`")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    model = create_model(a.model, num_classes=10).eval()
    x = torch.zeros(default_input_shape(a.model))
    specs, _ = analyse(model, x)
    edges = edges_through_merges(model, x)
    target = OrtTarget(threads=1)
    with LutStore.read(a.lut) as store:
        config = main_config(store, 1)
        tables = {"with": build_table(store, specs, edges, config, target),
                  "without": build_table(store, specs, edges, config, target, context=False)}
    out = []
    print(f"{'report':40s} {'with: MAPE / worst %':>22s} {'without: MAPE / worst %':>25s}")
    for path in a.reports:
        report = json.loads(open(path).read())
        errs: dict[str, list[float]] = {k: [] for k in tables}
        for plan in report["plans"]:
            if plan.get("measured_ms") is None:
                continue
            bits = BitPlan.from_dict({f: Precision.parse(plan["plan"][f]) for f in tables["with"].fqns})
            for k, table in tables.items():
                errs[k].append((table.predict(bits)[0] - plan["measured_ms"]) / plan["measured_ms"] * 100)
        row = {"report": path, **{f"{k}_mape_pct": float(np.mean(np.abs(e))) for k, e in errs.items()},
               **{f"{k}_worst_pct": float(np.max(np.abs(e))) for k, e in errs.items()},
               **{f"{k}_bias_pct": float(np.mean(e)) for k, e in errs.items()}}
        out.append(row)
        print(f"{path.split('/')[-1]:40s} {row['with_mape_pct']:10.1f} / {row['with_worst_pct']:5.1f}"
              f"{row['without_mape_pct']:14.1f} / {row['without_worst_pct']:5.1f}")
    if a.json:
        atomic_write_text(a.json, json.dumps({"model": a.model, "lut": a.lut, "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
