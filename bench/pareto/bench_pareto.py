"""Pareto fronts of NEMO, the HAWQ-V3-style ILP, SSPS (one run per budget) and uniform plans on one plot.

    python bench/pareto/bench_pareto.py --models resnet20,mobilenetv2 --out runs/pareto
    python bench/pareto/bench_pareto.py --models test_small --target fake --data-limit 2000 --quick   # smoke

Per model (Fashion-MNIST, 1x28x28, target ort-x86 by default): train the float model (or --weights MODEL=PATH),
profile the LUT (missing entries only; reused on reruns), then build each method's front. Every plan of
every method is scored by the same accuracy proxy (quantize_ + calibration on 256 training images, no
fine-tuning; top-1 on a fixed val slice) so the fronts are comparable; SSPS's own supernet weights are
not used for its score. Hypervolume is in (error, LUT-predicted latency) with one reference point per
model. Budgets are fractions of the span from the fastest plan the LUT allows (0) to the fp32 plan (1).
Picked plans (per method, per export budget) are exported with the target and measured end to
end; the plot shows measured latency for those (filled markers) and LUT predictions for the rest
(hollow). Writes <out>/<model>/{fronts.png, fronts_predicted.png, <method>.json/.csv, summary.json} and
<out>/summary.csv. Timings are noisy on this shared machine: the load average is recorded.

``--quick`` (what ``make bench`` runs, with ``--models resnet20 --candidates fp32,w8a8``): 2,000 images,
1 float epoch, NEMO 8 x 1 generation, 3 ILP points, one SSPS budget (2 epochs of 5 batches), a 200-image
proxy, LUT rows of 20 runs: it shows the script works; its fronts are not the README's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hwmpq.records import FP32, atomic_write_text
from hwmpq.search.base import Budget, BudgetError, SearchInputs, run_search
from hwmpq.search.evaluate_pool import Evaluator, ProxyConfig, make_context, points_from_jobs
from hwmpq.search.ilp import ILPConfig
from hwmpq.search.loop import LoopConfig, prepare
from hwmpq.search.nemo import NEMOConfig
from hwmpq.search.pareto import (
    NoPlanWithinBudget,
    hypervolume,
    load_front,
    objective_matrix,
    pareto_front,
    pick,
    plot_fronts,
    save_front,
    with_measured,
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def uniform_front(ctx, pctx, params, workers: int) -> tuple[list, dict]:
    t0 = time.perf_counter()
    table = ctx.table
    jobs = []
    for p in range(len(table.candidates)):
        if table.allowed[:, p].any():
            job = tuple(p if table.allowed[layer, p] else int(np.flatnonzero(table.allowed[layer])[0])
                        for layer in range(len(table.fqns)))
            jobs.append(job)
    jobs = list(dict.fromkeys(jobs))
    with Evaluator(pctx, workers=workers) as ev:
        accs = ev.map(jobs)
    pts = points_from_jobs(table, jobs, accs, params, "uniform", "")
    return pts, {"evaluations": len(jobs), "wall_s": time.perf_counter() - t0}


def ssps_front(ctx, pctx, params, fractions: list[float], a) -> tuple[list, dict]:
    from hwmpq.search.ssps import SSPSConfig

    t0 = time.perf_counter()
    jobs, notes = [], []
    cfg = SSPSConfig(epochs=a.ssps_epochs, warmup_epochs=1, limit_batches=a.ssps_limit_batches)
    for f in fractions:
        inputs = SearchInputs(ctx.model, ctx.splits, ctx.table, Budget(latency_ms=span_budget(ctx.table, f)),
                              ctx.example_input,
                              seed=a.seed, progress=False, log=_log)
        try:
            res = run_search(inputs, cfg)
        except BudgetError as e:
            notes.append(f"{f}x: {e}")
            continue
        jobs.append(tuple(ctx.table.index(res.plan)))
        notes.append(f"{f}x: repaired={res.repaired}")
    with Evaluator(pctx, workers=0) as ev:
        accs = ev.map(jobs)
    pts = points_from_jobs(ctx.table, jobs, accs, params, "ssps", "")
    return pts, {"evaluations": len(jobs), "runs": len(fractions), "wall_s": time.perf_counter() - t0, "notes": notes}


def span_budget(table, fraction: float) -> float:
    """Budget ``fraction`` of the way from the fastest plan the LUT allows (0) to the fp32 plan (1)."""
    lo = table.min_latency_ms()
    hi = table.predict_indices([table.candidates.index(FP32)] * len(table.fqns))[0]
    return lo + fraction * (hi - lo) + 1e-9


def strategy_front(ctx, config, name: str) -> tuple[list, dict]:
    t0 = time.perf_counter()
    slowest = float(np.nanmax(np.where(ctx.table.allowed, ctx.table.layer_ms, np.nan), axis=1).sum())
    inputs = SearchInputs(ctx.model, ctx.splits, ctx.table, Budget(latency_ms=10 * slowest + ctx.table.constant_ms),
                          ctx.example_input, progress=True, log=_log)
    res = run_search(inputs, config)
    pts = load_front(Path(config.out_dir) / "front.json")
    return pts, {"evaluations": res.trace.get("evaluations"), "wall_s": time.perf_counter() - t0,
                 "backend": res.trace.get("backend")}


def export_measured(ctx, fronts: dict, fractions: list[float], out: Path, proxy: ProxyConfig) -> dict:
    """Pick per method and budget, export (quantized in the target's placement, ``Target.placement``: the
    ORT exporter needs one quantizer per tensor, the proxy scored per-layer quantizers; calibrated on the
    proxy's images), then time all picks in ONE interleaved run (``hwmpq.profilers.measure.measure_interleaved``), so
    their latencies are comparable."""
    from hwmpq.profilers.measure import measure_interleaved
    from hwmpq.qmodules import calibrate, quantize

    if not ctx.target.capabilities.export:
        _log(f"target {ctx.target.id} cannot export whole models: nothing measured")
        return {}
    picks: dict[tuple, tuple] = {}  # plan -> (export, predicted ms, first method and budget that picked it)
    calib = make_context(ctx.model, ctx.splits, ctx.table.fqns, ctx.table.candidates, proxy).calib_x
    for method, pts in fronts.items():
        for f in fractions if pts else []:
            try:
                p = pick(pts, budget_ms=span_budget(ctx.table, f))
            except NoPlanWithinBudget:
                continue
            if p.plan.layers not in picks:
                model = quantize(copy.deepcopy(ctx.model), p.plan, placement=ctx.target.placement)
                calibrate(model, [calib])
                exp = ctx.target.export(model.eval(), p.plan, ctx.example_input, str(out / f"export_{len(picks)}"))
                picks[p.plan.layers] = (exp, p.latency_ms, f"{method} @ {f}x")
    timed = measure_interleaved(ctx.target, [e for e, _, _ in picks.values()], ctx.measure)
    measured = {key: quoted for key, (quoted, _, _, _) in zip(picks, timed, strict=True)}
    for key, (_, predicted, label) in picks.items():
        _log(f"measured {label}: predicted {predicted:.4f} ms, measured {measured[key]} ms")
    for method, pts in fronts.items():
        fronts[method] = [with_measured(q, measured[q.plan.layers]) if measured.get(q.plan.layers) is not None
                          else q for q in pts]
    return {str(k): v for k, v in measured.items()}


def reuse_front(path: str, stats_text: str = "") -> tuple[list, dict]:
    """A front computed by an earlier (or parallel) run of this script: ``METHOD=PATH[:evaluations:wall_s]``;
    the stats come from the file's meta when this script wrote it, else from the text."""
    raw = json.loads(Path(path).read_text())
    stats = {k: v for k, v in raw["_data"].get("meta", {}).items() if k in ("evaluations", "wall_s", "runs")}
    if stats_text:
        ev, wall = stats_text.split(":")
        stats = {"evaluations": int(ev), "wall_s": float(wall)}
    return load_front(path), {**stats, "reused_from": path}


def run_model(name: str, a, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    weights = a.weights.get(name)
    cfg = LoopConfig(method="uniform", model=name, data=a.data, data_limit=a.data_limit, weights=weights,
                     pretrain_epochs=0 if weights else a.pretrain_epochs, target=a.target,
                     lut=a.lut or str(out / "lut.sqlite"), force_lut=a.force_lut,
                     profile_missing=True, budget="1.0x", warmup=a.warmup, repeat=a.repeat, seed=a.seed,
                     progress=False, candidates=tuple(c for c in a.candidates.split(",") if c))
    t0 = time.perf_counter()
    ctx = prepare(cfg)
    torch.save(ctx.model.state_dict(), out / "float.pt")
    _log(f"{name}: float test acc {ctx.float_acc:.4f}, LUT ready ({time.perf_counter() - t0:.0f} s)")
    from hwmpq.graph import analyse

    spec = {s.fqn: s for s in analyse(ctx.model, ctx.example_input)[0]}
    params = [spec[f].params for f in ctx.table.fqns]
    proxy = ProxyConfig(calib_samples=256, eval_samples=a.eval_samples)
    pctx = make_context(ctx.model, ctx.splits, ctx.table.fqns, ctx.table.candidates, proxy, a.seed)
    runners = {
        "uniform": lambda: uniform_front(ctx, pctx, params, 0),
        "nemo": lambda: strategy_front(ctx, NEMOConfig(population=a.nemo_pop, generations=a.nemo_gens,
                                                       workers=a.workers, proxy=proxy, out_dir=str(out / "nemo"),
                                                       ray_address=a.ray), "nemo"),
        "ilp": lambda: strategy_front(ctx, ILPConfig(sweep_points=a.ilp_points, workers=a.workers, proxy=proxy,
                                                     out_dir=str(out / "ilp")), "ilp"),
        "ssps": lambda: ssps_front(ctx, pctx, params, a.ssps_budgets, a),
    }
    fronts, stats = {}, {}
    for method in a.methods.split(","):
        if method in a.reuse:
            fronts[method], stats[method] = reuse_front(*a.reuse[method])
        else:
            fronts[method], stats[method] = runners[method]()
            save_front(fronts[method], out / f"{method}.json", {"method": method, "model": name, **stats[method]})
    measured = export_measured(ctx, fronts, a.export_budgets, out, proxy)
    return summarise(name, ctx, fronts, stats, measured, out)


def summarise(name: str, ctx, fronts: dict, stats: dict, measured: dict, out: Path) -> dict:
    all_pts = [p for pts in fronts.values() for p in pts]
    ref = (1.0, 1.05 * max(p.latency_ms for p in all_pts))
    rows = []
    for method, pts in fronts.items():
        if not pts:
            rows.append({"model": name, "method": method, "plans": 0, "front_2d": 0, "hv_err_lat": 0.0,
                         "best_acc": float("nan"), "min_pred_ms": float("nan"), "measured_plans": 0,
                         **{k: v for k, v in stats[method].items() if k != "notes"}})
            continue
        save_front(pts, out / f"{method}.json", {"method": method, "model": name, **stats[method]})
        F = objective_matrix(pts, ("error", "latency_ms"))
        nd = pareto_front(pts, ("error", "latency_ms"))
        rows.append({"model": name, "method": method, "plans": len(pts), "front_2d": len(nd),
                     "hv_err_lat": hypervolume(F, ref), "best_acc": max(p.accuracy for p in pts),
                     "min_pred_ms": min(p.latency_ms for p in pts), "measured_plans":
                     sum(p.measured_ms is not None for p in pts), **{k: v for k, v in stats[method].items()
                                                                     if k != "notes"}})
    fronts = {m: pts for m, pts in fronts.items() if pts}
    plot_fronts(fronts, out / "fronts.png", title=f"{name} on {ctx.target.id}: accuracy proxy vs latency")
    plot_fronts(fronts, out / "fronts_predicted.png", title=f"{name}: LUT-predicted latency", x="latency_ms")
    pred_vs_meas = [{"method": p.method, "predicted_ms": p.latency_ms, "measured_ms": p.measured_ms,
                     "accuracy": p.accuracy} for p in all_pts if p.measured_ms is not None]
    summary = {"model": name, "target": ctx.target.id, "float_test_acc": ctx.float_acc, "hv_ref": ref,
               "rows": rows, "measured": pred_vs_meas, "ssps_notes": stats.get("ssps", {}).get("notes"),
               "loadavg": os.getloadavg(), "torch_threads": torch.get_num_threads()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,mobilenetv2")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-limit", type=int, default=12000, help="training images kept (val/test shrink too)")
    ap.add_argument("--target", default="ort-x86")
    ap.add_argument("--out", default="runs/pareto")
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--weights", nargs="*", default=[], help="trained float weights per model: resnet20=PATH ...")
    ap.add_argument("--candidates", default="", help="only these precisions, e.g. fp32,w8a8,w4a8 (default: all)")
    ap.add_argument("--eval-samples", type=int, default=600)
    ap.add_argument("--nemo-pop", type=int, default=20)
    ap.add_argument("--nemo-gens", type=int, default=5)
    ap.add_argument("--ilp-points", type=int, default=8)
    ap.add_argument("--ssps-budgets", type=_floats, default=_floats("0.2,0.5,0.8"),
                    help="fractions of the span fastest plan (0) .. fp32 plan (1)")
    ap.add_argument("--ssps-epochs", type=int, default=2)
    ap.add_argument("--ssps-limit-batches", type=int, default=30)
    ap.add_argument("--export-budgets", type=_floats, default=_floats("0.2,0.5,0.8"), help="as --ssps-budgets")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ray", default=None, help="Ray address for NEMO/ILP evaluations (local, auto, ray://...)")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="uniform,nemo,ilp,ssps")
    ap.add_argument("--reuse", action="append", default=[],
                    help="METHOD=PATH[:evaluations:wall_s]: take that front from a file instead of running it")
    ap.add_argument("--lut", default=None, help="LUT file (default <out>/<model>/lut.sqlite)")
    ap.add_argument("--force-lut", action="store_true",
                    help="use a LUT whose device fingerprint differs (e.g. the fingerprint code changed since)")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of the script")
    a = ap.parse_args()
    a.reuse = {m: tuple(v.split(":", 1)) for m, v in (r.split("=", 1) for r in a.reuse)}
    a.weights = dict(kv.split("=", 1) for kv in a.weights)
    if a.quick:
        a.data_limit, a.pretrain_epochs, a.eval_samples, a.nemo_pop, a.nemo_gens, a.ilp_points = 2000, 1, 200, 8, 1, 3
        a.ssps_budgets, a.ssps_epochs, a.ssps_limit_batches, a.workers = [0.5], 2, 5, 0
        a.warmup, a.repeat = 5, 20
    torch.set_num_threads(1)  # 2 shared cores; worker processes also use 1 thread each
    out = Path(a.out)
    summaries = [run_model(m, a, out / m) for m in a.models.split(",") if m]
    rows = [r for s in summaries for r in s["rows"]]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    atomic_write_text(out / "summary.csv", "\n".join(buf) + "\n")
    print(f"{'model':<12} {'method':<8} {'plans':>5} {'HV(err,ms)':>10} {'best_acc':>8} {'min_ms':>8} "
          f"{'evals':>6} {'wall_s':>7} {'measured':>8}")
    for r in rows:
        print(f"{r['model']:<12} {r['method']:<8} {r['plans']:>5} {r['hv_err_lat']:>10.4f} {r['best_acc']:>8.4f} "
              f"{r['min_pred_ms']:>8.4f} {str(r.get('evaluations')):>6} {r['wall_s']:>7.0f} {r['measured_plans']:>8}")
    for s in summaries:
        for m in s["measured"]:
            print(f"{s['model']:<12} {m['method']:<8} predicted {m['predicted_ms']:.4f} ms, measured "
                  f"{m['measured_ms']:.4f} ms, acc {m['accuracy']:.4f}")
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
