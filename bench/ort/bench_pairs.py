"""Transitions timed with stand-ins against transitions timed with each edge's own two layers, in one run.

One LUT per model holds both kinds of chain rows (profiled once with pair chains, once as a target
without ``build_pair`` would: stand-in chains on every edge shape). Two LatencyTables are read from it
(lut/model.py: ``pair_matrix`` against ``transition_matrix``), and the same plans (uniform fp32, uniform
w8a8, the fastest-per-layer plan of each table, N random plans) are exported and timed end to end in one
interleaved run with the speed reference, so that both tables are judged on the same measurements. The
fastest-per-layer plans of the two tables are the same plan when both read the same layer rows: timed
twice, they show the run's noise.

    python bench/ort/bench_pairs.py --models resnet20,mobilenetv2,mobilenetv2_050 --plans 10 --out D

Writes ``D/bench_pairs.csv`` / ``.json`` and prints per plan the measured time and both predictions, per
model both MAPEs. Nothing is fitted to the timed plans.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from hwmpq.lut.model import build_table, edges_through_merges, profiling_specs, speed_rows
from hwmpq.lut.store import LutStore
from hwmpq.lut.validate import export_plan, measure_at_speed, random_plans
from hwmpq.profilers.runner import profile
from hwmpq.targets.ort.target import OrtTarget

from hwmpq.graph import analyse
from hwmpq.records import FP32, BitPlan, MeasureConfig, Precision, atomic_write_text, load_plan
from hwmpq.zoo import create_model
from hwmpq.zoo.registry import default_input_shape

W8A8 = Precision(8, 8)


class StandInsOnly:
    """The same target and device without ``build_pair``: every edge is timed with stand-in chains."""

    def __init__(self, target) -> None:
        self._target = target

    def __getattr__(self, name):
        if name == "build_pair":
            raise AttributeError(name)
        return getattr(self._target, name)


def fixed_plans(specs, target, tables: dict) -> dict[str, BitPlan]:
    plans = {"fp32": BitPlan.from_dict({s.fqn: FP32 for s in specs}),
             "w8a8": BitPlan.from_dict({s.fqn: (W8A8 if W8A8 in target.precisions.for_layer(s) else FP32)
                                        for s in specs})}
    for name, table in tables.items():
        best = np.where(table.allowed, table.layer_ms, np.inf).argmin(axis=1)
        plans[f"fastest_rows_{name}"] = table.plan_from_indices([int(i) for i in best])
    return plans


def bench_model(name: str, n_random: int, target: OrtTarget, config: MeasureConfig, lut_dir: Path,
                timing: MeasureConfig, input_shape: tuple[int, ...] | None = None,
                extra: dict[str, BitPlan] | None = None) -> list[dict]:
    """Both tables on one LUT of ``name``, judged on the fixed plans, ``n_random`` random plans and the
    ``extra`` plans (e.g. searched ones; random weights: latency does not depend on their values)."""
    torch.manual_seed(0)
    shape = input_shape or default_input_shape(name)
    model = create_model(name, num_classes=10, in_chans=shape[1]).eval()
    x = torch.randn(shape)
    specs, _ = analyse(model, x)
    edges = edges_through_merges(model, x)
    # pairs first: a pair's cost is its chain minus the two layer rows, so the rows must be timed right
    # before their chains (profilers/jobs.py); the stand-in chains depend only on the stand-in rows
    views = {"pairs": target, "stand_in": StandInsOnly(target)}
    with LutStore.open(lut_dir / f"{name}.lut", target=target.id, device=target.device()) as store:
        for label, view in views.items():
            report = profile(profiling_specs(specs, edges, view), edges, view, store, config, progress=False)
            print(f"{name}: profiled {label} chains: {report.measured} measured, {report.skipped} kept, "
                  f"{report.failed} failed, {report.elapsed_s:.0f} s, {report.retried_chunks} slow chunks "
                  f"measured again", flush=True)
        tables = {label: build_table(store, specs, edges, config, views[label]) for label in ("stand_in", "pairs")}
        probe_rows = speed_rows(store, config)
    plans = fixed_plans(specs, target, tables)
    plans.update({f"random{k}": p for k, p in enumerate(random_plans(tables["pairs"], n_random, seed=1))})
    plans.update(extra or {})
    with tempfile.TemporaryDirectory(prefix="hwmpq-bench-pairs-") as tmp:
        exports = [export_plan(target, model, p, x, f"{tmp}/{k}") for k, p in plans.items()]
        timed, check = measure_at_speed(target, exports, timing, probe_rows)
    speed = check.factor if check else None
    rows = []
    for (label, plan), (measured, p10, p90, err) in zip(plans.items(), timed, strict=True):
        if err:
            raise RuntimeError(f"{name} {label}: {err}")
        row = {"model": name, "plan": label, "measured_ms": measured, "p10_ms": p10, "p90_ms": p90,
               "speed_factor": speed, "n_fp32": sum(p == FP32 for _, p in plan.layers)}
        for t, table in tables.items():
            pred = table.predict(plan)[0]
            row[f"pred_{t}_ms"] = pred
            row[f"err_{t}_pct"] = (pred - measured) / measured * 100
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,mobilenetv2")
    ap.add_argument("--plans", type=int, default=10, help="random plans per model")
    ap.add_argument("--out", default="bench/ort/results/pairs")
    ap.add_argument("--lut-dir", default=None, help="where the LUTs live (default: --out); reruns resume them")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--input-shape", default=None, help="N,C,H,W (default: the zoo's)")
    ap.add_argument("--extra-plans", nargs="*", default=[],
                    help="BitPlan JSON files (e.g. bench/search/results/plans/*) to judge too, if of this model")
    ap.add_argument("--repeat", type=int, default=400, help="whole-model runs per plan")
    ap.add_argument("--rounds", type=int, default=20,
                    help="interleaved rounds they are spread over (slow spells here last seconds)")
    args = ap.parse_args()
    out = Path(args.out)
    lut_dir = Path(args.lut_dir or out)
    lut_dir.mkdir(parents=True, exist_ok=True)
    target = OrtTarget(threads=args.threads)
    config = MeasureConfig(threads=args.threads)
    rows, summary = [], {}
    try:
        for name in args.models.split(","):
            timing = MeasureConfig(threads=args.threads, repeat=args.repeat, rounds=args.rounds)
            shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
            extra = {Path(f).stem: load_plan(f) for f in args.extra_plans if Path(f).name.startswith(f"{name}_")}
            got = bench_model(name, args.plans, target, config, lut_dir, timing, shape, extra)
            rows += got
            print(f"\n{name} (speed factor {got[0]['speed_factor']:.3f}: >1 = slower now than at profile time)")
            print(f"{'plan':<30}{'measured':>9}{'stand-in':>10}{'err %':>7}{'pairs':>8}{'err %':>7}")
            for r in got:
                print(f"{r['plan']:<30}{r['measured_ms']:>9.3f}{r['pred_stand_in_ms']:>10.3f}"
                      f"{r['err_stand_in_pct']:>+7.1f}{r['pred_pairs_ms']:>8.3f}{r['err_pairs_pct']:>+7.1f}")
            rand = [r for r in got if r["plan"].startswith("random")]
            summary[name] = {t: {"mape_random_pct": float(np.mean([abs(r[f"err_{t}_pct"]) for r in rand])),
                                 "worst_random_pct": float(max(abs(r[f"err_{t}_pct"]) for r in rand)),
                                 "mape_all_pct": float(np.mean([abs(r[f"err_{t}_pct"]) for r in got]))}
                             for t in ("stand_in", "pairs")}
            summary[name]["speed_factor"] = got[0]["speed_factor"]
            searched = [r for r in got if r["plan"] in extra]
            if searched:
                summary[name]["extra"] = {t: {"mape_pct": float(np.mean([abs(r[f"err_{t}_pct"]) for r in searched])),
                                              "worst_pct": float(max(abs(r[f"err_{t}_pct"]) for r in searched))}
                                          for t in ("stand_in", "pairs")}
            same = [r["measured_ms"] for r in got if r["plan"].startswith("fastest_rows_")]
            if len({r["plan"] for r in got if r["plan"].startswith("fastest_rows_")}) == 2:
                spread = abs(same[0] - same[1]) / min(same) * 100  # (the same plan when rows agree)
                summary[name]["same_plan_twice_pct"] = spread
                print(f"the fastest-rows plan timed twice in this run: {spread:.1f}% apart (the run's noise)")
            for t in ("stand_in", "pairs"):
                s = summary[name][t]
                print(f"{t:>9}: random plans MAPE {s['mape_random_pct']:.1f}% worst {s['worst_random_pct']:.1f}%;"
                      f" all plans MAPE {s['mape_all_pct']:.1f}%")
                if "extra" in summary[name]:
                    e = summary[name]["extra"][t]
                    print(f"{'':>9}  extra plans MAPE {e['mape_pct']:.1f}% worst {e['worst_pct']:.1f}%")
    finally:
        target.cleanup()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    atomic_write_text(out / "bench_pairs.json", json.dumps({"config": config.key, "summary": summary, "rows": rows},
                                                           indent=1) + "\n")
    print(f"wrote {out}/bench_pairs.csv and .json")


if __name__ == "__main__":
    main()
