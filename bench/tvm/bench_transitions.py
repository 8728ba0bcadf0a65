"""Does the TVM LUT predict an exported model better with transition costs than without?

Profiles ``--model`` on ``tvm:host`` (layers, transition chains and their stand-ins, the call overhead)
into a LUT, exports a few plans (all-fp32, all-int8, seeded random mixes over ``--precisions``), times
each export once per round, after that round's fresh LUT rows (so drift between rounds shows), and prints the LUT's prediction with
and without the transition terms beside the measured latency.

    python bench/tvm/bench_transitions.py --model resnet20 --precisions fp32,w8a8,w4a4 --plans 4 \
        --out bench/tvm/results_transitions

Untuned TVM kernels, 1 thread, p10 of ``--repeat`` runs (MeasureConfig.statistic). Writes table.txt and
results.json. Latencies of a shared machine: compare the two passes to judge the noise."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from hwmpq.records import MeasureConfig, Precision, atomic_write_text, to_jsonable


def _parse_precisions(text: str) -> tuple[Precision, ...]:
    out = []
    for label in text.split(","):
        label = label.strip().lower()
        if label == "fp32":
            out.append(Precision(32, 32))
            continue
        if not (label.startswith("w") and "a" in label):
            raise SystemExit(f"--precisions: {label!r} is not fp32 or wXaY")
        w, a = label[1:].split("a")
        out.append(Precision(int(w), int(a)))
    return tuple(out)


def chain_model(n: int, channels: int = 16, hw: int = 32):
    """``--model chain:N``: N convs 3x3 C->C with a ReLU after each, no merges: the cleanest check of
    layer rows + transitions against the exported model (every edge has the same tensor)."""
    import torch
    from torch import nn

    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1, bias=False) for _ in range(n)])

        def forward(self, x):
            for c in self.convs:
                x = torch.relu(c(x))
            return x

    return Chain().eval(), torch.rand(1, channels, hw, hw)  # >= 0, like a post-ReLU input: bitserial can take it


def _restrict(target, keep: tuple[Precision, ...]) -> None:
    P = target.precisions
    target.precisions = type(P)(**{k: tuple(p for p in P.for_kind(k) if p in keep)
                                   for k in ("conv", "dwconv", "linear")})


def _plans(table, n_random: int, seed: int) -> list[tuple[str, list[int]]]:
    allowed = table.allowed
    out = []
    for p in (Precision(32, 32), Precision(8, 8)):
        if p in table.candidates:
            j = table.candidates.index(p)
            out.append((f"all-{p.label}", [j if allowed[i, j] else int(np.flatnonzero(allowed[i])[0])
                                           for i in range(len(table.fqns))]))
    rng = np.random.default_rng(seed)
    for k in range(n_random):
        out.append((f"mixed-{k}", [int(rng.choice(np.flatnonzero(allowed[i]))) for i in range(len(table.fqns))]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20", help="a zoo model, or chain:N (N 3x3 convs, 16 ch, 32x32)")
    ap.add_argument("--precisions", default="fp32,w8a8,w4a4")
    ap.add_argument("--plans", type=int, default=4, help="random mixed plans (besides all-fp32, all-int8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2, help="LUT-then-exports measurement rounds")
    ap.add_argument("--out", default="bench/tvm/results_transitions")
    ap.add_argument("--work-dir", default="bench/tvm/work")
    args = ap.parse_args()

    import torch
    from hwmpq.lut.model import build_table, edges_through_merges, profiling_specs
    from hwmpq.lut.store import LutStore
    from hwmpq.profilers.runner import profile
    from hwmpq.targets.tvm.target import TvmTarget

    from hwmpq.graph import analyse
    from hwmpq.zoo import create_model
    from hwmpq.zoo.registry import default_input_shape

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    if args.model.startswith("chain:"):
        model, x = chain_model(int(args.model.split(":", 1)[1]))
    else:
        model = create_model(args.model).eval()
        x = torch.randn(*default_input_shape(args.model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = TvmTarget("host", work_dir=args.work_dir)
    _restrict(target, _parse_precisions(args.precisions))
    config = MeasureConfig(warmup=10, number=1, repeat=args.repeat, threads=1)
    specs, _ = analyse(model, x)
    edges = edges_through_merges(model, x)

    def profile_round(r: int):
        t0 = time.time()
        lut = out / f"lut-{args.model.replace(':', '')}-round{r}.sqlite"
        if lut.exists():
            lut.unlink()  # every round measures afresh (built libraries are reused from --work-dir)
        with LutStore.open(lut, target=target.id, device=target.device()) as store:
            report = profile(profiling_specs(specs, edges, target), edges, target, store, config, progress=False)
            table = build_table(store, specs, edges, config, target)
        print(f"round {r}: profile {report.measured} measured, {report.failed} failed, {time.time() - t0:.0f} s")
        return table

    with_t = profile_round(0)
    print(f"{args.model}: {len(specs)} layers, {len(edges)} edges")
    plans = _plans(with_t, args.plans, args.seed)
    exports = {}
    for name, idx in plans:
        plan = with_t.plan_from_indices(idx)
        t1 = time.time()
        exports[name] = (plan, target.export(model, plan, x, str(out / "exports" / name)))
        print(f"  exported {name} in {time.time() - t1:.0f} s: {dict((f, p.label) for f, p in plan.as_dict().items())}")
    rows = {name: {"plan": name, "bits": {f: p.label for f, p in plan.as_dict().items()}, "rounds": [],
                   "verification_ok": json.loads(Path(exp.manifest).read_text())["verification"]["ok"]}
            for name, (plan, exp) in exports.items()}
    for r in range(args.rounds):  # each round: LUT rows, then the exports, minutes apart at most
        table = with_t if r == 0 else profile_round(r)
        without = dataclasses.replace(table, transitions=())
        for name, idx in plans:
            run = target.measure_artifact(exports[name][1], config)
            if run.error_msg:
                raise SystemExit(f"{name}: {run.error_msg}")
            m = float(np.percentile(run.latencies_ms, 10))
            pw, po = table.predict_indices(idx)[0], without.predict_indices(idx)[0]
            rows[name]["rounds"].append({"measured_p10_ms": m, "pred_with_ms": pw, "pred_without_ms": po,
                                         "err_with_pct": 100 * (pw - m) / m, "err_without_pct": 100 * (po - m) / m})
    rows = list(rows.values())
    lines = [f"{args.model} on tvm:host, untuned, 1 thread, p10 of {args.repeat} runs; T = transitions; "
             f"{args.rounds} rounds (fresh LUT rows, then the exports)",
             f"{'plan':<10} {'round':>5} {'measured':>9} {'pred+T':>9} {'err':>7} {'pred-T':>9} {'err':>7}"]
    for row in rows:
        for r, x_ in enumerate(row["rounds"]):
            lines.append(f"{row['plan']:<10} {r:>5} {x_['measured_p10_ms']:>9.3f} {x_['pred_with_ms']:>9.3f} "
                         f"{x_['err_with_pct']:>+6.1f}% {x_['pred_without_ms']:>9.3f} {x_['err_without_pct']:>+6.1f}%")
    mae = {k: float(np.mean([abs(x_[k]) for row in rows for x_ in row["rounds"]]))
           for k in ("err_with_pct", "err_without_pct")}
    lines.append(f"mean |error| over plans and rounds: with transitions {mae['err_with_pct']:.1f}%, "
                 f"without {mae['err_without_pct']:.1f}%")
    text = "\n".join(lines)
    print(text)
    atomic_write_text(out / "table.txt", text + "\n")
    atomic_write_text(out / "results.json", json.dumps(to_jsonable({
        "model": args.model, "target": target.id, "precisions": args.precisions, "config": config,
        "device": target.device().details, "overhead_ms": with_t.constant_ms,
        "rows": rows, "mean_abs_err_pct": mae, "time_unix": time.time()}), indent=1, default=str))


if __name__ == "__main__":
    main()
