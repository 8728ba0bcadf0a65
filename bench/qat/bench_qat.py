"""QAT aids on Fashion-MNIST: plain QAT vs SAM vs StatAssist+GradBoost vs all, at uniform w4a4 and at a plan
searched by SAQ under a measured ORT-x86 LUT latency budget; and SAQ's plan against SSPS's at that budget.

    python bench/qat/bench_qat.py --model resnet20 [--seeds 0 1 2] [--plans w4a4 saq] [--ssps]
    python bench/qat/bench_qat.py --quick --out runs/bench/qat      # a smoke test

``--quick`` (what ``make bench`` runs): seed 0, plans w4a4 and SAQ's, every aid, 1,000 training and 200
test images, 1 float epoch, 1 QAT epoch of 5 batches, 10 SAQ search steps: it shows the script works; its
accuracies are not the README's.

Every QAT run starts from the same float model (trained here on the slice, or ``--weights``), so the rows
differ only in the plan, the aids and the seed. StatAssist adds its float warm-up epoch(s) on top of the QAT
epochs (the extra cost is in the ``seconds`` column). Writes ``<out>/<model>_runs.csv`` (one row per run,
rewritten after every run, so an interrupted bench keeps what it measured) and ``<out>/<model>_summary.json``
(mean, sample std, min, max per plan x aids; plans; budget; wall time; load average). No timed assertions.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from hwmpq.data import load_fashion_mnist
from hwmpq.qat_options import QATOptions, run_qat
from hwmpq.records import BitPlan, MeasureConfig, Precision, atomic_write_text, load_plan, save_plan
from hwmpq.train import evaluate, fit, save_weights
from hwmpq.zoo import create_model

AIDS = {"plain": QATOptions(), "sam": QATOptions(sam=True),
        "sa+gb": QATOptions(stat_assist=True, grad_boost=True),
        "sam+sa+gb": QATOptions(sam=True, stat_assist=True, grad_boost=True)}


def _quiet(*_a) -> None:
    pass


def load_splits(train_images: int, test_images: int):
    s = load_fashion_mnist(limit=train_images)
    x, y = s.test.tensors
    return replace(s, test=torch.utils.data.TensorDataset(x[:test_images], y[:test_images]))


def float_model(a, splits, out: Path) -> nn.Module:
    torch.manual_seed(0)
    m = create_model(a.model, num_classes=10, in_chans=1)
    src = a.weights or out / f"{a.model}_float.pt"
    if Path(src).is_file():
        from hwmpq.modelspec import load_weights

        load_weights(m, str(src))
        print(f"float weights from {src}", flush=True)
    else:
        t0 = time.perf_counter()
        fit(m, splits, epochs=a.float_epochs, lr=0.05, batch_size=64, seed=0, progress=False, log=_quiet)
        save_weights(m, src)
        print(f"trained float {a.model}: {a.float_epochs} epochs in {time.perf_counter() - t0:.0f} s", flush=True)
    return m.eval()


def measured_table(model: nn.Module, lut: Path):
    from hwmpq.search.loop import LoopConfig, load_table
    from hwmpq.targets import get_target

    target = get_target("ort-x86", threads=1)
    cfg = LoopConfig(lut=str(lut), profile_missing=True, progress=False)
    return load_table(cfg, model, torch.randn(1, 1, 28, 28), target, MeasureConfig(warmup=10, repeat=30, threads=1))


def searched_plan(method: str, model, splits, table, budget, out: Path, a) -> tuple[BitPlan, dict]:
    """SAQ or SSPS plan (cached as JSON beside the results)."""
    from hwmpq.search.base import SearchInputs, run_search
    from hwmpq.search.saq import SAQConfig
    from hwmpq.search.ssps import SSPSConfig

    path = out / f"{a.model}_{method}_plan.json"
    meta_path = path.with_suffix(".meta.json")
    if path.is_file() and meta_path.is_file():
        return load_plan(path), json.loads(meta_path.read_text())
    cfg = (SAQConfig(warmup_steps=a.search_steps // 2, search_steps=a.search_steps, final_samples=12, batch_size=64)
           if method == "saq" else
           SSPSConfig(epochs=3, warmup_epochs=1, limit_batches=a.search_steps // 2, batch_size=64))
    res = run_search(SearchInputs(model, splits, table, budget, torch.randn(1, 1, 28, 28), seed=0, progress=True,
                                  log=lambda m: print(m, flush=True)), cfg)
    save_plan(res.plan, path)
    meta = {"predicted_ms": res.predicted_ms, "predicted_mj": res.predicted_mj, "repaired": res.repaired,
            "notes": res.notes, "search_s": res.wall_s, "labels": [p.label for _, p in res.plan.layers]}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    print(f"{method} plan in {res.wall_s:.0f} s: {res.predicted_ms:.4f} ms predicted; {meta['labels']}", flush=True)
    return res.plan, meta


def one_run(model, plan: BitPlan, splits, opts: QATOptions, seed: int, a) -> tuple[float, float]:
    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    kw = dict(epochs=a.qat_epochs, lr=a.qat_lr, batch_size=64, seed=seed, limit_batches=a.qat_batches,
              progress=False, log=_quiet)
    m, _ = run_qat(m, plan, splits, opts, **kw)  # QATOptions() = prepare_qat + fit, no hooks
    return evaluate(m, splits.loader("test", batch_size=256)), time.perf_counter() - t0


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["plan"], r["aids"]), []).append(r["test_acc"])
    out = []
    for (plan, aids), accs in groups.items():
        out.append({"plan": plan, "aids": aids, "n": len(accs), "mean": statistics.mean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min": min(accs), "max": max(accs)})
    return out


def print_summary(model: str, summary: list[dict], head: str) -> None:
    print(f"\n{model}: {head}; test acc (mean +- sample std over seeds, [min, max])")
    for s in summary:
        print(f"  {s['plan']:5s} {s['aids']:10s} {s['mean']:.4f} +- {s['std']:.4f}  [{s['min']:.4f}, {s['max']:.4f}]"
              f"  n={s['n']}")


def summarise_csv(a) -> None:
    paths = sorted(Path(a.out).glob(f"{a.model}_runs*.csv"))
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows += [dict(r, test_acc=float(r["test_acc"]), seconds=float(r["seconds"])) for r in csv.DictReader(f)]
    summary = summarise(rows)
    print_summary(a.model, summary, f"{len(rows)} runs from {[str(p) for p in paths]}")
    atomic_write_text(Path(a.out) / f"{a.model}_partial_summary.json",
                      json.dumps({"sources": [str(p) for p in paths], "runs": len(rows), "summary": summary,
                                  "seconds_total": sum(r["seconds"] for r in rows)}, indent=1))


def measure_plans(a) -> None:
    """Export the searched plans cached in ``--out`` (and uniform fp32 and w8a8) from the float weights
    (calibrated, not fine-tuned: latency does not depend on the weights' values) and time them in ONE
    interleaved run on ort-x86, so "the same budget" is checked on the device, not only by the LUT."""
    import tempfile

    from hwmpq.profilers.measure import export_plan, measure_interleaved
    from hwmpq.targets import get_target

    out = Path(a.out)
    model = create_model(a.model, num_classes=10, in_chans=1)
    model.load_state_dict(torch.load(a.weights, weights_only=True))
    model.eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    plans = {u: BitPlan.uniform(names, Precision.parse(u)) for u in ("fp32", "w8a8")}
    meta = {}
    for method in ("saq", "ssps"):
        path = out / f"{a.model}_{method}_plan.json"
        if path.is_file():
            plans[method], meta[method] = load_plan(path), json.loads(path.with_suffix(".meta.json").read_text())
    target, x = get_target("ort-x86", threads=1), torch.randn(1, 1, 28, 28)
    with tempfile.TemporaryDirectory(prefix="hwmpq-qat-measure-") as tmp:
        exports = [export_plan(target, model, plan, x, f"{tmp}/{k}") for k, plan in plans.items()]
        timed = measure_interleaved(target, exports, MeasureConfig(warmup=20, repeat=100, threads=1))
    rows = [{"plan": k, "measured_ms": t[0], "p90_ms": t[2], "error": t[3],
             "predicted_ms": meta.get(k, {}).get("predicted_ms")} for k, t in zip(plans, timed, strict=True)]
    fp = rows[0]["measured_ms"]
    for r in rows:
        r["x_fp32"] = r["measured_ms"] / fp if r["measured_ms"] and fp else None
        print(f"{r['plan']:6s} measured {r['measured_ms']:.4f} ms ({r['x_fp32']:.3f}x fp32), "
              f"LUT {r['predicted_ms'] or float('nan'):.4f} ms", flush=True)
    atomic_write_text(out / f"{a.model}_plans_measured.json",
                      json.dumps({"rows": rows, "loadavg": os.getloadavg()}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--weights", default=None, help="float weights to start from (else trained here)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--plans", nargs="+", default=["w4a4", "saq"], help="w4a4 | w8a8 | ... | saq")
    ap.add_argument("--aids", nargs="+", default=list(AIDS), choices=list(AIDS))
    ap.add_argument("--ssps", action="store_true", help="also SSPS's plan at the same budget (plain QAT)")
    ap.add_argument("--budget", default="0.5range", help="as `hwmpq search --budget`: 0.5range (halfway from the "
                    "fastest plan to fp32 by the LUT), 0.9x (of the fp32 plan's LUT latency), 1.2ms")
    ap.add_argument("--train-images", type=int, default=4000)
    ap.add_argument("--test-images", type=int, default=1000)
    ap.add_argument("--float-epochs", type=int, default=2)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--qat-batches", type=int, default=15, help="batches (of 64) per QAT epoch")
    ap.add_argument("--qat-lr", type=float, default=0.01)
    ap.add_argument("--search-steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench_qat")
    ap.add_argument("--tag", default="", help="suffix of the runs CSV, so parallel benches (e.g. one per seed) "
                    "do not overwrite each other; --summarise-only merges <model>_runs*.csv")
    ap.add_argument("--summarise-only", action="store_true", help="summarise <out>/<model>_runs.csv (e.g. of an "
                    "interrupted bench) into <model>_partial_summary.json and print it; no training")
    ap.add_argument("--measure-plans", action="store_true", help="export the searched plans in --out (with "
                    "--weights) and time them against fp32 and w8a8 in one interleaved run; no training")
    ap.add_argument("--quick", action="store_true", help="tiny settings (see above): a smoke run of the script")
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.plans, a.ssps, a.train_images, a.test_images = [0], ["w4a4", "saq"], False, 1000, 200
        a.float_epochs, a.qat_epochs, a.qat_batches, a.search_steps = 1, 1, 5, 10
    if a.measure_plans:
        measure_plans(a)
        return
    if a.summarise_only:
        summarise_csv(a)
        return
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, load0 = time.perf_counter(), os.getloadavg()
    splits = load_splits(a.train_images, a.test_images)
    model = float_model(a, splits, out)
    float_acc = evaluate(model, splits.loader("test", batch_size=256))
    print(f"float test acc {float_acc:.4f}", flush=True)
    plans: dict[str, BitPlan] = {}
    meta: dict[str, dict] = {}
    table = budget = None
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for p in a.plans + (["ssps"] if a.ssps else []):
        cached = out / f"{a.model}_{p}_plan.json"
        if p in ("saq", "ssps") and cached.is_file() and cached.with_suffix(".meta.json").is_file():
            plans[p], meta[p] = load_plan(cached), json.loads(cached.with_suffix(".meta.json").read_text())
            print(f"{p} plan from {cached} (searched earlier): {meta[p]['labels']}", flush=True)
        elif p in ("saq", "ssps"):
            if table is None:
                from hwmpq.search.budget import parse_budget

                table = measured_table(model, out / f"lut_{a.model}.sqlite")
                budget = parse_budget(table, a.budget)
            plans[p], meta[p] = searched_plan(p, model, splits, table, budget, out, a)
        else:
            plans[p] = BitPlan.uniform(names, Precision.parse(p))
    rows: list[dict] = []
    runs = [(p, aid) for p in a.plans for aid in a.aids] + ([("ssps", "plain")] if a.ssps else [])
    for seed in a.seeds:
        for plan_name, aid in runs:
            acc, secs = one_run(model, plans[plan_name], splits, AIDS[aid], seed, a)
            rows.append({"model": a.model, "plan": plan_name, "aids": aid, "seed": seed, "test_acc": acc,
                         "seconds": round(secs, 1)})
            print(f"{plan_name:5s} {aid:10s} seed {seed}: test acc {acc:.4f} ({secs:.0f} s)", flush=True)
            write_csv(rows, out / f"{a.model}_runs{a.tag}.csv")
    summary = summarise(rows)
    print_summary(a.model, summary, f"float {float_acc:.4f}, seeds {a.seeds}")
    report = {"args": vars(a), "float_test_acc": float_acc, "summary": summary, "plans": meta,
              "budget_ms": budget.latency_ms if budget else None, "wall_s": time.perf_counter() - t_start,
              "loadavg_start": load0, "loadavg_end": os.getloadavg(), "torch_threads": a.threads}
    atomic_write_text(out / f"{a.model}_summary{a.tag}.json", json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
