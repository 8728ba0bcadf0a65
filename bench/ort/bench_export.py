"""hwmpq's ORT int8 export against ONNX Runtime's own quantizer, timed side by side in one interleaved run.

Per model: fp32 (hwmpq's float export), ORT ``quantize_static`` (after ``quant_pre_process``, QDQ,
per-channel int8 weights, uint8 activations, MinMax on the same 8 calibration batches) of that same
float file, hwmpq uniform w8a8 and hwmpq's LUT-fastest plan (a fresh LUT of the model's fp32/w8a8 rows,
transitions and kernels in context, profiled into ``--lut-dir`` and resumed from there), each with the
ORT-optimized op histogram (Q/DQ counts) and, for hwmpq's plans, the LUT's prediction.

    python bench/ort/bench_export.py --out bench/ort/results/export
    python bench/ort/bench_export.py --validate 10 --out bench/ort/results/export
    python bench/ort/bench_export.py --agreement --out bench/ort/results/export

``--agreement``: resnet20 trained briefly on Fashion-MNIST, QAT w8a8 and a mixed plan, exported;
top-1 agreement and max logit difference against the torch fake-quant model on 1,000 test images.
``--validate N``: ``lut validate`` of each model's LUT with N random fp32/w8a8 plans (``validate_<model>.json``).
``--quick`` (what ``make bench`` runs): resnet20 @32 only unless ``--models`` is given, 10 runs per LUT row,
40 whole-model runs in 4 rounds per variant; with ``--agreement``, 1,000 training and 200 test images. Its
numbers show the script works, not the speeds the README quotes.
Writes ``bench_export.json``/``.csv`` (and ``agreement.json``) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from hwmpq.graph import analyse
from hwmpq.lut.model import build_table, edges_through_merges
from hwmpq.lut.store import LutStore
from hwmpq.profilers.context import profile_context
from hwmpq.profilers.probes import profiling_specs
from hwmpq.profilers.runner import profile
from hwmpq.qmodules import calibrate, quantize
from hwmpq.records import FP32, BitPlan, BuildResult, MeasureConfig, Precision, atomic_write_text
from hwmpq.targets.base import TargetPrecisions
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import make_session, summarize
from hwmpq.zoo import create_model

W8A8 = Precision(8, 8)
# name -> (zoo name, constructor keywords, input shape)
MODELS = {
    "resnet18": ("resnet18", {"num_classes": 1000}, (1, 3, 224, 224)),
    "mobilenetv2": ("mobilenetv2", {"num_classes": 1000, "cifar_stem": False}, (1, 3, 224, 224)),
    "resnet20": ("resnet20", {"num_classes": 10}, (1, 3, 32, 32)),
    "mobilenetv2_050": ("mobilenetv2_050", {"num_classes": 10}, (1, 3, 96, 96)),
    "mobilenetv2_050@28": ("mobilenetv2_050", {"num_classes": 10}, (1, 3, 28, 28)),
}


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model with seeded weights and non-trivial BatchNorm statistics (so folded weights and
    activations have realistic ranges), and a seeded input."""
    zoo, kwargs, shape = MODELS[name]
    torch.manual_seed(0)
    model = create_model(zoo, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.1)
    return model.eval(), torch.randn(shape)


def calibration_batches(x: torch.Tensor, n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [x + 0.5 * torch.randn(x.shape, generator=g) for _ in range(n)]


def ort_quantize_static(float_onnx: str, out_path: str, batches: list[torch.Tensor]) -> str:
    """ORT's one-call uniform int8, as its documentation gives it (quant_pre_process first: without it
    Conv -> Relu is not fused before quantization and most convs stay float)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"input": b.numpy()} for b in batches])

        def get_next(self):
            return next(self.items, None)

    pre = str(Path(out_path).with_suffix(".pre.onnx"))
    quant_pre_process(float_onnx, pre)
    quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out_path


def hwmpq_export(target: OrtTarget, model, plan: BitPlan, batches, x, out: Path) -> str:
    q = quantize(copy.deepcopy(model), plan)
    calibrate(q, [torch.cat(batches)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return target.export(q.eval(), plan, x, str(out)).artifact


def lut_tables(name: str, model, x, target: OrtTarget, lut_dir: Path, config: MeasureConfig):
    """(table with kernels in context, plain table, profile seconds) from ``lut_dir/<name>.lut``."""
    specs, _ = analyse(model, x)
    edges = edges_through_merges(model, x)
    t0 = time.perf_counter()
    with LutStore.open(lut_dir / f"{name}.lut", target=target.id, device=target.device()) as store:
        rep = profile(profiling_specs(specs, edges, target), edges, target, store, config, progress=False)
        profile_context(model, x, specs, edges, target, store, config)
        table = build_table(store, specs, edges, config, target)
        plain = build_table(store, specs, edges, config, target, context=False)
    seconds = time.perf_counter() - t0
    print(f"{name}: LUT {rep.measured} measured, {rep.skipped} kept, {rep.failed} failed; {seconds:.0f} s", flush=True)
    return table, plain, seconds


def optimized_ops(path: str, threads: int) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        make_session(path, threads, optimized_path=f"{tmp}/opt.onnx")
        return dict(Counter(n.op_type for n in onnx.load(f"{tmp}/opt.onnx").graph.node))


def measure_rounds(target: OrtTarget, paths: list[str], config: MeasureConfig) -> list[list[float]]:
    """Latency samples per file, timed round-robin in ``config.rounds`` slices (one interleaved run)."""
    per = config.per_round()
    samples: list[list[float]] = [[] for _ in paths]
    for _ in range(config.rounds):
        for k, p in enumerate(paths):
            run = target.run(BuildResult(p), per)
            if run.error_msg:
                raise RuntimeError(f"{p}: {run.error_msg}")
            samples[k].extend(run.latencies_ms)
    return samples


def bench_model(name: str, target: OrtTarget, config: MeasureConfig, timing: MeasureConfig, lut_dir: Path,
                work: Path) -> list[dict]:
    model, x = build(name)
    specs, _ = analyse(model, x)
    fqns = [s.fqn for s in specs]
    batches = calibration_batches(x)
    table, plain, profile_s = lut_tables(name, model, x, target, lut_dir, config)
    plans = {"fp32": BitPlan.uniform(fqns, FP32), "hwmpq_w8a8": BitPlan.uniform(fqns, W8A8),
             "hwmpq_lut_fastest": table.plan_from_indices(table.cheapest_indices(), notes="LUT fastest")}
    paths = {k: hwmpq_export(target, model, p, batches, x, work / f"{name}_{k}") for k, p in plans.items()}
    paths = {"fp32": paths["fp32"],
             "ort_quantize_static": ort_quantize_static(paths["fp32"], str(work / f"{name}_ort.onnx"), batches),
             "hwmpq_w8a8": paths["hwmpq_w8a8"], "hwmpq_lut_fastest": paths["hwmpq_lut_fastest"]}
    samples = dict(zip(paths, measure_rounds(target, list(paths.values()), timing), strict=True))
    quoted = {k: timing.quote(v) for k, v in samples.items()}
    rows = []
    for k, path in paths.items():
        st = summarize(samples[k])
        ops = optimized_ops(path, config.threads)
        plan = plans.get(k)
        rows.append({
            "model": name, "input": list(x.shape), "variant": k, "quoted_ms": quoted[k], "statistic": timing.statistic,
            "median_ms": st.median_ms, "p10_ms": st.p10_ms, "p90_ms": st.p90_ms, "n": st.n,
            "ratio_to_ort": quoted[k] / quoted["ort_quantize_static"], "ratio_to_fp32": quoted[k] / quoted["fp32"],
            "predicted_ms": table.predict(plan)[0] if plan else None,
            "predicted_plain_ms": plain.predict(plan)[0] if plan else None,
            "int8_layers": sum(p == W8A8 for _, p in plan.layers) if plan else None, "layers": len(fqns),
            "Q": ops.get("QuantizeLinear", 0), "DQ": ops.get("DequantizeLinear", 0), "optimized_ops": ops,
            "plan": {f: p.label for f, p in plan.layers} if plan else "uniform int8 (ORT quantize_static)",
            "profile_s": profile_s, "threads": config.threads, "clock": target.clock,
        })
    return rows


def agreement(out: Path, n_test: int = 1000, train_limit: int = 6000) -> dict:
    """resnet20 on Fashion-MNIST: 1 float epoch on ``train_limit`` images, then per plan (uniform w8a8 and
    a mixed plan with float islands, the stem and every third layer fp32) calibration and 1 QAT epoch,
    export, and agreement with the torch fake-quant model on ``n_test`` test images."""
    from hwmpq.data import load_fashion_mnist
    from hwmpq.train import calibration_batch, fit

    splits = load_fashion_mnist(limit=train_limit)
    torch.manual_seed(0)
    model = create_model("resnet20", in_chans=1)
    fit(model, splits, epochs=1, lr=0.05, progress=False)
    x0 = torch.zeros(1, 1, 28, 28)
    fqns = [s.fqn for s in analyse(model.eval(), x0)[0]]
    plans = {"w8a8": BitPlan.uniform(fqns, W8A8),
             "mixed": BitPlan(tuple((f, FP32 if i % 3 == 0 else W8A8) for i, f in enumerate(fqns)))}
    xt, yt = splits.test.tensors
    xt, yt = xt[:n_test], yt[:n_test]
    report = {"model": "resnet20", "data": "fashion-mnist", "n_test": int(len(xt)), "train_images": train_limit}
    for label, plan in plans.items():
        q = quantize(copy.deepcopy(model), plan)
        calibrate(q, [calibration_batch(splits, 2)])
        fit(q, splits, epochs=1, lr=0.001, progress=False)
        q.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = OrtTarget(threads=1).export(q, plan, x0, str(out / f"agreement_{label}"))
        with torch.no_grad():
            ref = q(xt).numpy()
        sess = make_session(res.artifact, 1)
        got = np.concatenate([sess.run(None, {"input": xt[i:i + 1].numpy()})[0] for i in range(len(xt))])
        report[label] = {
            "plan": {f: p.label for f, p in plan.layers},
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
            "max_logit_diff": float(np.abs(ref - got).max()), "max_abs_logit": float(np.abs(ref).max()),
            "torch_acc": float((ref.argmax(1) == yt.numpy()).mean()),
            "ort_acc": float((got.argmax(1) == yt.numpy()).mean()),
            "integer_layers": len(res.integer_layers), "float_layers": list(res.float_layers)}
    atomic_write_text(out / "agreement.json", json.dumps(report, indent=1) + "\n")
    return report


def validate_lut(name: str, target: OrtTarget, config: MeasureConfig, timing: MeasureConfig, lut_dir: Path,
                 out: Path, n_plans: int) -> None:
    """``lut.validate`` of ``lut_dir/<name>.lut`` with ``n_plans`` random fp32/w8a8 plans, whole models timed
    under ``timing``; the report goes to ``out/validate_<name>.json``."""
    from hwmpq.lut.validate import format_report, validate

    model, x = build(name)
    with LutStore.open(lut_dir / f"{name}.lut", target=target.id, device=target.device()) as store:
        report = validate(store, model, x, n_plans, config, seed=0, json_out=str(out / f"validate_{name}.json"),
                          target=target, model_name=name, measure_config=timing)
    print(name)
    print(format_report(report), flush=True)


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<16} {'variant':<20} {'ms':>8} {'p10':>8} {'p90':>8} {'x ORT':>6} {'x fp32':>6} "
          f"{'pred ms':>8} {'plain':>8} {'int8':>6} {'Q':>4} {'DQ':>4}")
    for r in rows:
        pred = f"{r['predicted_ms']:.3f}" if r["predicted_ms"] is not None else "-"
        plain = f"{r['predicted_plain_ms']:.3f}" if r["predicted_plain_ms"] is not None else "-"
        int8 = f"{r['int8_layers']}/{r['layers']}" if r["int8_layers"] is not None else "all"
        print(f"{r['model']:<16} {r['variant']:<20} {r['quoted_ms']:>8.3f} {r['p10_ms']:>8.3f} {r['p90_ms']:>8.3f} "
              f"{r['ratio_to_ort']:>6.2f} {r['ratio_to_fp32']:>6.2f} {pred:>8} {plain:>8} {int8:>6} {r['Q']:>4} {r['DQ']:>4}")


def write_rows(rows: list[dict], out: Path) -> None:
    atomic_write_text(out / "bench_export.json", json.dumps(rows, indent=1) + "\n")
    keys = [k for k in rows[0] if k not in ("plan", "optimized_ops")]
    tmp = out / "bench_export.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "bench_export.csv")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help=f"comma-separated, of {sorted(MODELS)} (default: all)")
    ap.add_argument("--out", default="bench/ort/results/export")
    ap.add_argument("--lut-dir", default=None, help="where the LUTs are profiled and resumed (default: --out)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30, help="timed runs per LUT row")
    ap.add_argument("--time-repeat", type=int, default=200, help="whole-model runs per variant")
    ap.add_argument("--time-rounds", type=int, default=20, help="interleaved rounds they are spread over")
    ap.add_argument("--agreement", action="store_true", help="run the Fashion-MNIST export agreement instead")
    ap.add_argument("--validate", type=int, default=0, help="validate the models' LUTs with N random plans instead")
    ap.add_argument("--quick", action="store_true", help="a smaller run (resnet20 only, fewer runs): a smoke test")
    args = ap.parse_args()
    if args.quick:
        args.models = args.models or "resnet20"
        args.repeat, args.time_repeat, args.time_rounds = 10, 40, 4
    args.models = args.models or ",".join(MODELS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.agreement:
        sizes = {"n_test": 200, "train_limit": 1000} if args.quick else {}
        print(json.dumps(agreement(out, **sizes), indent=1))
        return
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; use some of {sorted(MODELS)}")
    target = OrtTarget(threads=args.threads)
    # the search's real choice on ORT: w4a8/w16a16 run as float between Q/DQ (slower than fp32)
    target.precisions = TargetPrecisions(conv=(FP32, W8A8), dwconv=(FP32, W8A8), linear=(FP32, W8A8))
    config = MeasureConfig(warmup=10, repeat=args.repeat, threads=args.threads)
    timing = dataclasses.replace(config, repeat=args.time_repeat, rounds=args.time_rounds)
    if args.validate:
        for name in args.models.split(","):
            validate_lut(name, target, config, timing, Path(args.lut_dir or out), out, args.validate)
        return
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="hwmpq-bench-") as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, target, config, timing, Path(args.lut_dir or out), Path(tmp))
            print_table(rows)
            write_rows(rows, out)
    print(f"wrote {out}/bench_export.json and .csv")


if __name__ == "__main__":
    main()
