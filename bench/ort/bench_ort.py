"""ORT x86 benchmark: float32 vs ORT's own uniform int8 (quantize_static) vs the LUT's fastest-per-layer
plan, measured end to end in one run (interleaved rounds), with the ratio to float32 and the LUT's
prediction error; and (``--agreement``) export agreement with the torch fake-quant model on Fashion-MNIST.

    python bench/ort/bench_ort.py --models resnet20,mobilenetv2,resnet18 --out bench/ort/results
    python bench/ort/bench_ort.py --agreement --out bench/ort/results

Writes ``<out>/bench_ort.csv`` / ``.json`` (and ``agreement.json``) and prints a table. Timings are
noisy on a shared machine: ratios are measured in one run; p10/p90 are in the files.
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
from pathlib import Path

import numpy as np
import torch
from hwmpq.lut.context import profile_context
from hwmpq.lut.model import build_table, edges_through_merges, profiling_specs, speed_rows
from hwmpq.lut.store import LutStore
from hwmpq.lut.validate import export_plan, measure_at_speed
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import summarize

from hwmpq.graph import analyse
from hwmpq.records import FP32, BitPlan, BuildResult, MeasureConfig, Precision, atomic_write_text
from hwmpq.zoo import create_model
from hwmpq.zoo.registry import default_input_shape


def ort_quantize_static(float_onnx: str, out_path: str, x: torch.Tensor) -> str:
    """ORT's own uniform int8: ``quant_pre_process`` (without it ORT left 18 of resnet20's 21 convs in float:
    Conv -> Relu is not fused before quantization), then QDQ, per-channel int8 weights, uint8 activations,
    MinMax on 8 samples."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.items = iter([{"input": (x + 0.5 * torch.randn(x.shape, generator=g)).numpy()} for _ in range(8)])

        def get_next(self):
            return next(self.items, None)

    pre = str(Path(out_path).with_suffix(".pre.onnx"))
    quant_pre_process(float_onnx, pre)
    quantize_static(pre, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out_path


def measure_rounds(target: OrtTarget, builds: list[BuildResult], config: MeasureConfig) -> list[tuple]:
    """(quoted latency, summary with the median) per build, timed round-robin in ``config.rounds`` slices."""
    per = config.per_round()
    samples: list[list[float]] = [[] for _ in builds]
    for _ in range(min(config.rounds, config.repeat)):
        for k, b in enumerate(builds):
            run = target.run(b, per)
            if run.error_msg:
                raise RuntimeError(f"{b.artifact}: {run.error_msg}")
            samples[k].extend(run.latencies_ms)
    return [(config.quote(v), summarize(v)) for v in samples]


def bench_model(name: str, target: OrtTarget, config: MeasureConfig, lut_dir: Path, work: Path,
                timing: MeasureConfig) -> list[dict]:
    """Profile ``name`` under ``config`` (resuming ``lut_dir/<name>.lut``), then time the variants under
    ``timing`` in one interleaved run."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(default_input_shape(name))
    specs, _ = analyse(model, x)
    edges = edges_through_merges(model, x)
    store = LutStore.open(lut_dir / f"{name}.lut", target=target.id, device=target.device())
    from hwmpq.profilers.runner import profile

    t0 = time.perf_counter()
    rep = profile(profiling_specs(specs, edges, target), edges, target, store, config, progress=False)
    profile_s = time.perf_counter() - t0
    print(f"{name}: profile {rep.measured} measured, {rep.skipped} kept, {rep.failed} failed in {profile_s:.0f} s; "
          f"{rep.retried_chunks} slow chunks measured again, slowest kept {rep.slowest_chunk:.2f}x", flush=True)
    profile_context(model, x, specs, edges, target, store, config)  # kernels in context, as `hwmpq profile` does
    table = build_table(store, specs, edges, config, target)
    plain = build_table(store, specs, edges, config, target, context=False)
    store.close()
    fqns = [s.fqn for s in specs]
    fastest = table.plan_from_indices(table.cheapest_indices(), notes="LUT fastest (layers + transitions)")
    plans = {"float32": BitPlan.uniform(fqns, FP32), "lut_fastest": fastest}
    paths = {k: export_plan(target, model, p, x, str(work / f"{name}_{k}")).artifact for k, p in plans.items()}
    paths["ort_int8_static"] = ort_quantize_static(paths["float32"], str(work / f"{name}_ort_int8.onnx"), x)
    with LutStore.read(lut_dir / f"{name}.lut") as peek:
        probe_rows = speed_rows(peek, config)
    timed, check = measure_at_speed(target, [BuildResult(p) for p in paths.values()], timing, probe_rows,
                                    measure=measure_rounds)
    stats = dict(zip(paths, timed, strict=True))
    speed = check.factor if check else None
    if check is not None:
        print(f"{name}: speed probes over their LUT rows {check.factors} (>1: slower now than at profile time)")
    base = stats["float32"][0]
    rows = []
    for k, (quoted, st) in stats.items():
        pred = table.predict(plans[k])[0] if k in plans else None
        pred_plain = plain.predict(plans[k])[0] if k in plans else None
        rows.append({"predicted_plain_ms": pred_plain,
                     "error_plain_pct": None if pred is None else (pred_plain - quoted) / quoted * 100,
                     # the uniform fp32 plan is one the kernels in context were timed in
                     "context_plan": k == "float32",
                     "model": name, "variant": k, "median_ms": st.median_ms, "p10_ms": st.p10_ms, "p90_ms": st.p90_ms,
                     "n": st.n, "statistic": config.statistic, "ratio_to_fp32": quoted / base, "predicted_ms": pred,
                     "error_pct": None if pred is None else (pred - quoted) / quoted * 100,
                     "plan": {f: p.label for f, p in plans[k].layers} if k in plans else "uniform int8 (ORT)",
                     "profile_s": profile_s, "clock": target.clock, "threads": config.threads,
                     "speed_factor": speed})
    return rows


def agreement(out: Path, n_test: int = 1000, train_limit: int = 12000, epochs: int = 1, qat_epochs: int = 1,
              weights: str | None = None) -> dict:
    """resnet20 on Fashion-MNIST: short float training (or trained float ``weights``), w8a8 quantize_ +
    calibration (+ ``qat_epochs`` of QAT), export, top-1 agreement and max logit difference on ``n_test``
    test images."""
    from hwmpq.targets.ort.timing import make_session

    from hwmpq.data import load_fashion_mnist
    from hwmpq.qmodules import calibrate, quantize_
    from hwmpq.train import calibration_batch, fit

    splits = load_fashion_mnist(limit=train_limit)
    model = create_model("resnet20", in_chans=1)
    if weights:
        from hwmpq.modelspec import load_weights

        load_weights(model, weights)
        epochs = 0
    else:
        fit(model, splits, epochs=epochs, lr=0.05, progress=False)
    specs, _ = analyse(model.eval(), torch.zeros(1, 1, 28, 28))
    plan = BitPlan.uniform([s.fqn for s in specs], Precision(8, 8))
    q = quantize_(copy.deepcopy(model), plan)
    calibrate(q, [calibration_batch(splits, 2)])
    if qat_epochs:
        fit(q, splits, epochs=qat_epochs, lr=0.001, progress=False)  # QAT: scales trained, exported as is
    q.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = OrtTarget(threads=1).export(q, plan, torch.zeros(1, 1, 28, 28), str(out / "agreement_export"))
    xt, yt = splits.test.tensors
    xt, yt = xt[:n_test], yt[:n_test]
    with torch.no_grad():
        ref = q(xt).numpy()
    sess = make_session(res.artifact, 1)
    got = np.concatenate([sess.run(None, {"input": xt[i:i + 1].numpy()})[0] for i in range(len(xt))])
    report = {"model": "resnet20", "data": "fashion-mnist", "n_test": int(len(xt)), "plan": "w8a8 uniform",
              "train_images": train_limit, "float_epochs": epochs, "weights": weights, "qat_epochs": qat_epochs,
              "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
              "max_logit_diff": float(np.abs(ref - got).max()), "max_abs_logit": float(np.abs(ref).max()),
              "torch_acc": float((ref.argmax(1) == yt.numpy()).mean()), "ort_acc": float((got.argmax(1) == yt.numpy()).mean()),
              "integer_layers": list(res.integer_layers), "float_layers": list(res.float_layers)}
    atomic_write_text(out / "agreement.json", json.dumps(report, indent=1) + "\n")
    return report


def validate_model(name: str, target: OrtTarget, config: MeasureConfig, out: Path, n_plans: int,
                   timing: MeasureConfig) -> None:
    """``lut.validate`` on ``<out>/<name>.lut`` (profiled by the benchmark, stand-ins included); whole models
    timed under ``timing``."""
    from hwmpq.lut.validate import format_report, validate

    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(default_input_shape(name))
    with LutStore.open(out / f"{name}.lut", target=target.id, device=target.device()) as store:
        report = validate(store, model, x, n_plans, config, seed=0, json_out=str(out / f"validate_{name}.json"),
                          target=target, model_name=name, measure_config=timing)
    print(name)
    print(format_report(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,mobilenetv2,resnet18")
    ap.add_argument("--out", default="bench/ort/results")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=60)
    ap.add_argument("--agreement", action="store_true", help="run the Fashion-MNIST export agreement instead")
    ap.add_argument("--validate", type=int, default=0, help="validate the LUTs in --out with N random plans per model")
    ap.add_argument("--time-repeat", type=int, default=400, help="whole-model runs per variant or plan")
    ap.add_argument("--time-rounds", type=int, default=20,
                    help="interleaved rounds they are spread over (slow spells here last seconds)")
    ap.add_argument("--train-limit", type=int, default=12000, help="agreement: training images")
    ap.add_argument("--qat-epochs", type=int, default=1, help="agreement: QAT epochs after calibration")
    ap.add_argument("--weights", default=None, help="agreement: trained float resnet20 weights (skip float training)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.agreement:
        print(json.dumps(agreement(out, train_limit=args.train_limit, qat_epochs=args.qat_epochs, weights=args.weights), indent=1))
        return
    target = OrtTarget(threads=args.threads)
    config = MeasureConfig(warmup=args.warmup, repeat=args.repeat, threads=args.threads)
    timing = dataclasses.replace(config, repeat=args.time_repeat, rounds=args.time_rounds)
    if args.validate:
        for name in args.models.split(","):
            validate_model(name, target, config, out, args.validate, timing)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="hwmpq-bench-") as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, target, config, out, Path(tmp), timing)
            print_table(rows)
    atomic_write_text(out / "bench_ort.json", json.dumps(rows, indent=1) + "\n")
    keys = [k for k in rows[0] if k != "plan"]
    with open(out / "bench_ort.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    Path(out / "bench_ort.csv.tmp").replace(out / "bench_ort.csv")
    print(f"wrote {out}/bench_ort.csv and .json")


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<12} {'variant':<16} {'median ms':>9} {'p10':>7} {'p90':>7} {'x fp32':>7} {'pred ms':>8} "
          f"{'err %':>6} {'err without context %':>21}")
    for r in rows:
        pred = f"{r['predicted_ms']:.3f}" if r["predicted_ms"] is not None else "-"
        err = f"{r['error_pct']:+.1f}" if r["error_pct"] is not None else "-"
        ctx = f"{r['error_plain_pct']:+.1f}" if r.get("error_plain_pct") is not None else "-"
        mark = " (its kernels were timed in context)" if r.get("context_plan") else ""
        print(f"{r['model']:<12} {r['variant']:<16} {r['median_ms']:>9.3f} {r['p10_ms']:>7.3f} {r['p90_ms']:>7.3f} "
              f"{r['ratio_to_fp32']:>7.2f} {pred:>8} {err:>6} {ctx:>21}{mark}")


if __name__ == "__main__":
    main()
