"""Search benchmark: DNAS vs SSPS vs uniform baselines on Fashion-MNIST with ort-x86 on this CPU.

For each model: float pre-training (or --weights), a LUT (profiled here if missing), budgets spread from
the fp32 plan's LUT latency down to the fastest plan the LUT knows, then per budget a DNAS and an SSPS
search, each QAT-fine-tuned, exported and measured; the uniform baselines once. Writes CSV, JSON and a
Pareto plot (measured latency vs test accuracy) and prints the table.

    python bench/search/bench_search.py --models resnet20,mobilenetv2 --budgets 5          # the full bench
    python bench/search/bench_search.py --models resnet20 --budgets 3 --train-images 3000 \\
        --search-epochs 2 --finetune-epochs 1 --limit-batches 15                          # a shorter one
    python bench/search/bench_search.py --quick --out runs/bench/search                  # a smoke test

``--quick`` (what ``make bench`` runs): resnet20 only, fp32/w8a8 candidates, 1 budget, 1,000 training
images, 1 float, 2 search and 1 fine-tune epoch of 5 batches, LUT rows of 20 runs, the final
re-measurement in 2 rounds. Its numbers show the loop works end to end, not the results the README quotes.

Latencies: every export is timed in the loop, then all exports are timed again in ONE interleaved run at
the end (``--rounds`` slices of ``--repeat``; ``measured_ms``, ``x_fp32_measured``; the loop's own value is
kept as ``measured_inline_ms``), quoting the p10 statistic. ``--remeasure-only DIR ...`` repeats only that
run, e.g. on a quiet machine. Search wall time is the search alone (no fine-tune, export, measure).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np


def budgets_for(table, n: int, objective: str = "latency") -> list[float]:
    """``n`` budgets from the fp32 plan's LUT cost down to 1.02x the cheapest plan's (latency ms or energy mJ)."""
    from hwmpq.search.budget import cheapest_plan, float_latency_ms

    k = 0 if objective == "latency" else 1
    hi = float_latency_ms(table)[k]
    lo = table.predict_indices(cheapest_plan(table, energy=objective == "energy"))[k]
    if n == 1:
        return [0.5 * (hi + lo)]
    return [float(v) for v in np.linspace(hi, lo * 1.02, n)]


def float_weights(model: str, images: int | None, epochs: int, workdir: Path, seed: int) -> str:
    from hwmpq.data import load_dataset
    from hwmpq.modelspec import load_model
    from hwmpq.train import fit, save_weights

    path = workdir / f"{model}_fmnist_{images or 'all'}_{epochs}ep.pt"
    if not path.is_file():
        splits = load_dataset("fashion-mnist", limit=images, seed=seed)
        net = load_model(model, num_classes=10, in_chans=1)
        fit(net, splits, epochs=epochs, lr=0.05, batch_size=128, seed=seed, progress=False)
        save_weights(net, path)
    return str(path)


def run_model(model: str, args, workdir: Path) -> list[dict]:
    from hwmpq.search.base import Budget
    from hwmpq.search.loop import LoopConfig, measure_together, prepare, run_row

    given = dict(kv.split("=", 1) for kv in args.weights if "=" in kv)
    weights = given.get(model) or float_weights(model, args.train_images, args.pretrain_epochs, workdir, args.seed)
    search = {"epochs": args.search_epochs, "warmup_epochs": 1, "limit_batches": args.limit_batches, "batch_size": 64}
    cfg = LoopConfig(method="ssps", model=model, data="fashion-mnist", data_limit=args.train_images, weights=weights,
                     target="ort-x86", lut=str(workdir / f"lut_{model}.sqlite"), profile_missing=True,
                     warmup=args.warmup, repeat=args.repeat, budget="1.0x", search=search,
                     finetune_epochs=args.finetune_epochs, finetune_limit_batches=args.limit_batches,
                     seed=args.seed, progress=False,
                     candidates=tuple(c for c in args.candidates.split(",") if c))
    ctx = prepare(cfg)
    rows, raw, exports = [], [], []

    def record(method: str, bits: str | None, budget_ms: float | None, tag: str) -> None:
        out = workdir / f"{model}_{tag}.json"
        exported, r = run_row(ctx, cfg, method, bits, out)  # (measured below, all exports together)
        raw.append(r)
        exports.append(exported)
        rows.append({"model": model, "method": r["method"], "objective": args.objective,
                     "budget_ms": budget_ms if args.objective == "latency" else None,
                     "budget_mj": budget_ms if args.objective == "energy" else None,
                     "predicted_mj": r.get("predicted_mj"), "predicted_ms": r["predicted_ms"],
                     "measured_ms": r["measured_ms"], "test_acc": r["test_acc"], "search_s": r["search_s"],
                     "repaired": r["repaired"], "float_test_acc": ctx.float_acc,
                     "artifact": str(workdir / f"{model}_{tag}_export" / "model.onnx"), "bits": r.get("bits")})
        print(json.dumps(rows[-1]), flush=True)

    for bits in args.uniform.split(","):
        record("uniform", bits, None, f"uniform_{bits}")
    energy = args.objective == "energy"
    for i, b in enumerate(budgets_for(ctx.table, args.budgets, args.objective)):
        ctx.budget = Budget(energy_mj=b) if energy else Budget(latency_ms=b)
        for method in args.methods.split(","):
            record(method, None, b, f"{method}_{'e' if energy else 'b'}{i}")
    measure_together(ctx, cfg, raw, exports)
    for row, r in zip(rows, raw, strict=True):
        row["measured_ms"] = r["measured_ms"]
    return rows


def earlier_rows(src: Path) -> list[dict]:
    """Rows of an earlier run: ``DIR/search_bench.json``, or the JSON lines an interrupted run printed to
    its log (one per finished row)."""
    if src.is_dir():
        return json.loads((src / "search_bench.json").read_text())["rows"]
    return [json.loads(line) for line in src.read_text().splitlines() if line.startswith('{"model"')]


def repredict(rows: list[dict]) -> None:
    """Predict every row's plan again with the current LUT latency model (the in-loop prediction is kept as
    ``predicted_inloop_ms``): the table is rebuilt from the same LUT rows, nothing is re-measured."""
    import torch

    from hwmpq.lut.cli import main_config
    from hwmpq.lut.store import LutStore
    from hwmpq.records import load_plan
    from hwmpq.search.loop import LoopConfig, load_table
    from hwmpq.targets import get_target
    from hwmpq.zoo import create_model

    target, tables = get_target("ort-x86", threads=1), {}
    for r in rows:
        export = Path(r.get("artifact", "")).parent
        plan, lut = export.with_name(export.name.removesuffix("_export") + ".json"), export.parent / f"lut_{r['model']}.sqlite"
        if not (plan.is_file() and lut.is_file()):
            continue
        if r["model"] not in tables:
            model = create_model(r["model"], num_classes=10, in_chans=1).eval()
            with LutStore.read(lut) as store:
                protocol = main_config(store, threads=1)  # the LUT rows' own protocol, p10 quoted
            tables[r["model"]] = load_table(LoopConfig(lut=str(lut)), model, torch.randn(1, 1, 28, 28), target,
                                            protocol)
        r.setdefault("predicted_inloop_ms", r["predicted_ms"])
        r["predicted_ms"] = tables[r["model"]].predict(load_plan(plan))[0]


def remeasure(rows: list[dict], warmup: int, repeat: int, rounds: int) -> None:
    """Time every exported model again in ONE interleaved run (``rounds`` slices of ``repeat``), so that
    the latencies in the table are comparable: the in-loop measurement of each row (kept as
    ``measured_inline_ms``) happened minutes apart, under whatever else the machine was running then."""
    from hwmpq.profilers.measure import measure_interleaved
    from hwmpq.records import MeasureConfig
    from hwmpq.targets import get_target
    from hwmpq.targets.base import ExportResult

    target = get_target("ort-x86", threads=1)
    config = MeasureConfig(warmup=warmup, repeat=repeat, threads=1)
    todo = [r for r in rows if r.get("artifact") and Path(r["artifact"]).is_file()]
    exports = [ExportResult(str(Path(r["artifact"]).parent), r["artifact"], "") for r in todo]
    for r, (quoted, _, _, err) in zip(todo, measure_interleaved(target, exports, dataclasses.replace(config, rounds=rounds)), strict=True):
        r.setdefault("measured_inline_ms", r["measured_ms"])
        r["measured_ms"], r["measure_error"] = quoted, err
    for model in {r["model"] for r in todo}:
        fp = [r["measured_ms"] for r in todo if r["model"] == model and r["method"] == "uniform fp32"]
        for r in (r for r in todo if r["model"] == model):
            r["x_fp32_measured"] = r["measured_ms"] / fp[0] if fp and fp[0] and r["measured_ms"] else None


def pareto_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        for method in sorted({r["method"] for r in rows if r["model"] == m}):
            pts = sorted((r["measured_ms"], r["test_acc"]) for r in rows
                         if r["model"] == m and r["method"] == method and r["measured_ms"] is not None)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method,
                        linestyle="-" if not method.startswith("uniform") else "none")
        ax.set_title(f"{m} / Fashion-MNIST / ort-x86")
        ax.set_xlabel("measured latency (ms, p10, one interleaved run)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,mobilenetv2")
    p.add_argument("--methods", default="dnas,ssps")
    p.add_argument("--uniform", default="fp32,8")
    p.add_argument("--budgets", type=int, default=5)
    p.add_argument("--objective", choices=("latency", "energy"), default="latency",
                   help="budgets on LUT latency (ms) or LUT energy (mJ, modeled on this CPU unless powercap)")
    p.add_argument("--candidates", default="", help="search only these precisions, e.g. fp32,w8a8 (default: all)")
    p.add_argument("--train-images", type=int, default=None)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--search-epochs", type=int, default=6)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--limit-batches", type=int, default=None)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--weights", nargs="*", default=[], help="trained float weights per model: resnet20=PATH ...")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads (ORT timing always uses 1)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the final re-measurement")
    p.add_argument("--remeasure-only", nargs="*", default=None, metavar="DIR_OR_LOG",
                   help="no search: re-measure the exports listed in DIR/search_bench.json or in the rows an "
                   "interrupted run printed to its LOG (one interleaved run, e.g. on a quiet machine) and write "
                   "the merged table to --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/search/results")
    p.add_argument("--quick", action="store_true", help="tiny settings (see above): a smoke run of the script")
    args = p.parse_args()
    if args.quick:
        args.models, args.candidates, args.budgets, args.train_images = "resnet20", "fp32,w8a8", 1, 1000
        args.pretrain_epochs, args.search_epochs, args.finetune_epochs, args.limit_batches = 1, 2, 1, 5
        args.warmup, args.repeat, args.rounds = 5, 20, 2
    import torch

    torch.set_num_threads(args.torch_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.remeasure_only:
        rows = [r for src in args.remeasure_only for r in earlier_rows(Path(src))]
    else:
        rows = [r for m in args.models.split(",") for r in run_model(m, args, out)]
    repredict(rows)
    remeasure(rows, args.warmup, args.repeat, args.rounds)
    write_results(rows, out, args, time.perf_counter() - t0)


def write_results(rows: list[dict], out: Path, args, wall_s: float) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "search_bench.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    Path(out / "search_bench.csv.tmp").replace(out / "search_bench.csv")
    (out / "search_bench.json").write_text(json.dumps({"args": vars(args), "rows": rows, "wall_s": wall_s,
                                                       "loadavg_end": os.getloadavg()}, indent=1))
    pareto_plot(rows, out / "search_pareto.png")
    print(f"\n{'model':12} {'method':14} {'budget':>8} {'pred':>8} {'meas':>8} {'x fp32':>7} {'acc':>7} {'search s':>9}")
    for r in rows:
        b = ("-" if r["budget_ms"] is None else f"{r['budget_ms']:.4f}") if r.get("budget_mj") is None \
            else f"{r['budget_mj']:.4f}mJ"
        m = "-" if r["measured_ms"] is None else f"{r['measured_ms']:.4f}"
        x = "-" if r.get("x_fp32_measured") is None else f"{r['x_fp32_measured']:.3f}"
        print(f"{r['model']:12} {r['method']:14} {b:>8} {r['predicted_ms']:8.4f} {m:>8} {x:>7} {r['test_acc']:7.4f} "
              f"{r['search_s']:9.1f}")
    print(f"wrote {out}/search_bench.csv, .json, search_pareto.png ({wall_s:.0f} s; load {os.getloadavg()})")

if __name__ == "__main__":
    main()
