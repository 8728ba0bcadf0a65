"""Tuned ``tvm:host`` beside ONNX Runtime on this CPU, in one run (one thread, one process):

1. per layer: every distinct conv/linear shape of resnet18 @224, TVM int8 (the VNNI dot-product kernel,
   register tiles tuned, dot_tuning.py) and fp32 (the NCHW16c tiled kernel, fpconv.py, its tiles tuned
   by fp_tuning.py with up to ``--trials`` candidates) beside ORT's layer rows (the session a LUT times)
   and ORT's kernel alone (its profiler: QLinearConv / Conv), with the tuning seconds; the rows of one
   layer are built first and then timed in ``ROUNDS`` interleaved rounds (TVM, ORT, TVM, ...); optionally
   bitserial (``--bitserial``, the cheapest width, on the smallest shapes);
2. whole model: resnet20 (``--model-plans``: also resnet18 @224) quantized once per plan in tensor
   placement and exported for ``tvm:host`` (the same tuning database) and for ``ort-x86`` (uniform w8a8,
   fp32, and w8a8 with fp32 islands), timed interleaved.

    python bench/tvm/bench_tvm.py --trials 8 --work-dir runs/tvm-bench --out bench/tvm/results
    python bench/tvm/bench_tvm.py --quick --out runs/bench/tvm    # 3 shapes, 4 trials, w8a8 model only

The tuning database lives in ``--work-dir`` (reused by the next run and by the export: give a fresh
folder to time the tuning). Holds /tmp/hwmpq_TIMING while it runs (waits for it first) and releases it
between phases; run under ``/tmp/hw/timed`` (which holds that lock for it) it takes nothing. Prints a table and
writes ``layers.csv``, ``model.csv`` and ``results.json`` to ``--out``."""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from hwmpq.graph import analyse
from hwmpq.qmodules import calibrate, quantize
from hwmpq.records import (
    FP32,
    W8A8,
    BitPlan,
    LayerSpec,
    MeasureConfig,
    Precision,
    atomic_write_text,
)
from hwmpq.zoo import create_model

LOCK = Path("/tmp/hwmpq_TIMING")


class TimingLock:
    """The shared timing lock, taken per measurement step and given back for ``pause_s`` once it has been
    held ``hold_s`` in a row (others' tests run in the gap)."""

    def __init__(self, name: str = "tvm-bench", hold_s: float = 20 * 60, pause_s: float = 60) -> None:
        self.name, self.hold_s, self.pause_s = name, hold_s, pause_s
        self.since: float | None = None

    @staticmethod
    def held_by_parent() -> bool:
        """Whether the lock is our parent's (``/tmp/hw/timed CMD`` writes its pid there and runs CMD)."""
        try:
            return LOCK.read_text().split()[0] == str(os.getppid())
        except (OSError, IndexError):
            return False

    @contextmanager
    def step(self):
        if self.held_by_parent():
            yield
            return
        if self.since is not None and time.time() - self.since > self.hold_s:
            self.release()
            time.sleep(self.pause_s)
        if self.since is None:
            while LOCK.exists():
                time.sleep(10)
            LOCK.write_text(self.name + "\n")
            self.since = time.time()
        try:
            yield
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.since is not None:
            LOCK.unlink(missing_ok=True)
            self.since = None


def resnet18_layers() -> list[LayerSpec]:
    """The distinct layer shapes (signatures) of resnet18 @224, in graph order."""
    model = create_model("resnet18").eval()
    specs, _ = analyse(model, torch.zeros(1, 3, 224, 224))
    seen, out = set(), []
    for s in specs:
        if s.signature not in seen:
            seen.add(s.signature)
            out.append(s)
    return out


def label(s: LayerSpec) -> str:
    if s.kind == "linear":
        return f"fc {s.in_channels}->{s.out_channels}"
    return (f"{s.kernel[0]}x{s.kernel[1]}{'s' + str(s.stride[0]) if s.stride[0] > 1 else ''} "
            f"{s.in_channels}->{s.out_channels} @{s.in_hw[0]}")


def median(lat) -> float | None:
    return statistics.median(lat) if lat else None


ROUNDS = 3  # interleaved timing rounds per layer (each ``--repeat / ROUNDS`` samples per row)
KERNEL_OPS = ("QLinearConv", "Conv", "QGemm", "Gemm", "MatMulInteger", "QLinearMatMul", "FusedConv", "MatMul",
              "NchwcConv")


def build_tvm(target, spec: LayerSpec, prec: Precision) -> dict:
    t0 = time.time()
    build = target.build_layer(spec, prec)
    return {"target": target, "build": build, "build_s": round(time.time() - t0, 1), "error": build.error_msg,
            "lat": []}


def build_ort(ort, spec: LayerSpec, prec: Precision) -> dict:
    build = ort.build_layer(spec, prec)
    return {"target": ort, "build": build, "error": build.error_msg, "lat": []}


def time_interleaved(rows: list[dict], config: MeasureConfig) -> None:
    """``ROUNDS`` rounds over the built rows in turn; each row's samples land in its ``lat``."""
    part = MeasureConfig(warmup=config.warmup, repeat=max(1, config.repeat // ROUNDS), number=config.number,
                         threads=config.threads)
    for _ in range(ROUNDS):
        for r in rows:
            if r["error"] is None:
                run = r["target"].run(r["build"], part)
                r["error"] = run.error_msg
                r["lat"].extend(run.latencies_ms or ())


def ort_kernel_ms(ort, r: dict, config: MeasureConfig) -> float | None:
    """ORT's layer-computing kernels alone (its node profiler), summed."""
    if r["error"] is not None:
        return None
    kernels = ort.kernel_samples(r["build"].artifact, config.warmup + config.repeat)
    kernel_ms = [median(ms[config.warmup:]) for op, _, ms in kernels if op in KERNEL_OPS]
    return sum(kernel_ms) if kernel_ms else None


def fp32_tuning(target, spec: LayerSpec) -> dict:
    """The fp32 kernel's tuning record of this layer (tiles, seconds), if it was tuned."""
    from hwmpq.targets.tvm import fp_tuning, fpconv
    from hwmpq.targets.tvm.tuning import database_dir

    if target.fp_kernel is None or not fpconv.supports(spec):
        return {}
    wl = fpconv.workload_of(spec, list(spec.input_shape), target.fp_kernel.lanes, spec.bias)
    rec = fp_tuning.load_db(database_dir(target.work_dir, target.preset)).get(wl.key())
    if rec is None:
        return {}
    return {"tvm_fp32_tiles": fpconv.FpTiles(rec["tile_w"], rec["tile_o"], rec["order"]).label(),
            "tvm_fp32_tune_s": rec["tune_s"], "tvm_fp32_trials": rec["trials"]}


def bench_layers(args, specs: list[LayerSpec], lock: TimingLock) -> list[dict]:
    from hwmpq.targets.ort.target import OrtTarget
    from hwmpq.targets.tvm.target import TvmTarget

    config = MeasureConfig(warmup=20, repeat=args.repeat, number=3, threads=1)
    untuned = TvmTarget("host", work_dir=args.work_dir, tune_trials=0)
    tuned = TvmTarget("host", work_dir=args.work_dir, tune_trials=args.trials)
    ort = OrtTarget(threads=1)
    rows = []
    for k, spec in enumerate(specs):
        with lock.step():
            rows.append(bench_layer(args, k, spec, untuned, tuned, ort, config))
        print(_layer_line(rows[-1]), flush=True)
    return rows


def bench_layer(args, k: int, spec: LayerSpec, untuned, tuned, ort, config: MeasureConfig) -> dict:
    row = {"layer": label(spec), "signature": spec.signature, "macs_m": round(spec.macs / 1e6, 1)}
    tvm_rows = {"tvm_int8_untuned": build_tvm(untuned, spec, W8A8), "tvm_int8": build_tvm(tuned, spec, W8A8),
                "tvm_fp32": build_tvm(tuned, spec, FP32)}
    if args.bitserial and k < args.bitserial:
        tvm_rows["tvm_w2a2_untuned"] = build_tvm(untuned, spec, Precision(2, 2))
        tvm_rows["tvm_w2a2"] = build_tvm(tuned, spec, Precision(2, 2))
    ort_rows = {"int8": build_ort(ort, spec, W8A8), "fp32": build_ort(ort, spec, FP32)}
    order = [tvm_rows["tvm_fp32"], ort_rows["fp32"], tvm_rows["tvm_int8"], ort_rows["int8"]]
    time_interleaved(order + [r for r in tvm_rows.values() if r not in order], config)
    for name, r in tvm_rows.items():
        row[f"{name}_ms"], row[f"{name}_build_s"], row[f"{name}_error"] = median(r["lat"]), r["build_s"], r["error"]
    row.update(fp32_tuning(tuned, spec))
    for tag, r in ort_rows.items():
        row[f"ort_{tag}_ms"], row[f"ort_{tag}_kernel_ms"] = median(r["lat"]), ort_kernel_ms(ort, r, config)
    for tag in ("int8", "fp32"):
        t, o = row[f"tvm_{tag}_ms"], row[f"ort_{tag}_ms"]
        row[f"ratio_{tag}"] = round(t / o, 3) if t and o else None
    return row


def _fmt(v, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


LAYER_HEAD = (f"{'layer':22s} {'MMAC':>6s} | {'int8 untuned':>12s} {'int8 tuned':>10s} {'ort int8':>9s} "
              f"{'(kernel)':>9s} {'ratio':>6s} | {'fp32 tuned':>10s} {'ort fp32':>9s} {'(kernel)':>9s} "
              f"{'ratio':>6s} | {'build s i8/fp':>13s} {'fp tiles':>12s} {'fp tune s':>9s}")


def _layer_line(r: dict) -> str:
    return (f"{r['layer']:22s} {r['macs_m']:6.1f} | {_fmt(r['tvm_int8_untuned_ms']):>12s} {_fmt(r['tvm_int8_ms']):>10s} "
            f"{_fmt(r['ort_int8_ms']):>9s} {_fmt(r['ort_int8_kernel_ms']):>9s} {_fmt(r['ratio_int8'], 2):>6s} | "
            f"{_fmt(r['tvm_fp32_ms']):>10s} {_fmt(r['ort_fp32_ms']):>9s} {_fmt(r['ort_fp32_kernel_ms']):>9s} "
            f"{_fmt(r['ratio_fp32'], 2):>6s} | {r['tvm_int8_build_s']:6.1f}/{r['tvm_fp32_build_s']:<6.1f} "
            f"{r.get('tvm_fp32_tiles', '-'):>12s} {_fmt(r.get('tvm_fp32_tune_s'), 1):>9s}"
            + (f" w2a2 {_fmt(r.get('tvm_w2a2_ms'))}" if "tvm_w2a2_ms" in r else "")
            + (f"  {r['tvm_fp32_error'] or r['tvm_int8_error']}"[:160] if r["tvm_fp32_error"] or r["tvm_int8_error"]
               else ""))


MODELS = {"resnet20": (1, 3, 32, 32), "resnet18": (1, 3, 224, 224)}
MIXED_FP32 = {"resnet20": ("stem.0", "layers.1.0.conv1", "fc"), "resnet18": ("stem.0", "fc")}


def _model(name: str = "resnet20", seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(name).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, 0.0, 0.1)
    return model, torch.randn(*MODELS[name])


def model_plan(name: str, plan_name: str, specs: list[LayerSpec]) -> BitPlan:
    """``w8a8`` / ``fp32``: uniform; ``mixed``: w8a8 with the float islands of ``MIXED_FP32`` (stem, fc and,
    on resnet20, one conv in the middle of the stream)."""
    if plan_name == "mixed":
        return BitPlan.from_dict({s.fqn: FP32 if s.fqn in MIXED_FP32[name] else W8A8 for s in specs})
    return BitPlan.from_dict({s.fqn: {"w8a8": W8A8, "fp32": FP32}[plan_name] for s in specs})


def bench_model(args, lock: TimingLock) -> list[dict]:
    """Whole models by ``--model-plans`` (``model:plan``), one tensor-placed quantized model per plan
    exported for tvm:host (tuned database) and for ort-x86, timed interleaved."""
    from hwmpq.targets.ort.target import OrtTarget
    from hwmpq.targets.tvm.target import TvmTarget

    tvm = TvmTarget("host", work_dir=args.work_dir, tune_trials=args.trials)
    ort = OrtTarget(threads=1)
    out = Path(args.work_dir) / "exports"
    config = MeasureConfig(warmup=20, repeat=max(10, args.repeat // 5), number=5, threads=1)
    rows = []
    jobs = [j.split(":") for j in args.model_plans.split(",")]
    for name, plan_name in jobs[:1] if args.quick else jobs:
        model, x = _model(name)
        specs, _ = analyse(model, x)
        calib = [x + 0.5 * torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(1))]
        with lock.step():
            rows.append(bench_plan(model, x, name, calib, plan_name, model_plan(name, plan_name, specs), tvm, ort,
                                   out, config))
    return rows


ROUNDS_MODEL = 5  # interleaved rounds per whole model


def bench_plan(model, x, name: str, calib, plan_name: str, plan: BitPlan, tvm, ort, out: Path,
               config: MeasureConfig) -> dict:
    q = quantize(copy.deepcopy(model), plan, placement="tensor")  # both exporters take tensor placement
    calibrate(q, calib)
    paths, builds, manifests = {}, {}, {}
    for tgt in (tvm, ort):
        t0 = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = tgt.export(q.eval(), plan, x, str(out / f"{tgt.id.replace(':', '-')}-{name}-{plan_name}"))
        builds[tgt.id] = round(time.time() - t0, 1)
        paths[tgt.id] = res
        manifests[tgt.id] = json.loads(Path(res.manifest).read_text())
    samples = {k: [] for k in paths}
    rounds = {k: [] for k in paths}
    for _ in range(ROUNDS_MODEL):
        for tid, res in paths.items():
            tgt = tvm if tid == tvm.id else ort
            run = tgt.measure_artifact(res, config)
            if run.error_msg:
                raise RuntimeError(f"{tid} {name} {plan_name}: {run.error_msg}")
            samples[tid].extend(run.latencies_ms)
            rounds[tid].append(median(run.latencies_ms))
    t_ms, o_ms = median(samples[tvm.id]), median(samples[ort.id])
    tm = manifests[tvm.id]
    row = {"model": f"{name} @{x.shape[-1]}", "plan": plan_name, "tvm_ms": t_ms, "ort_ms": o_ms,
           "ratio": round(t_ms / o_ms, 3),
           "tvm_round_medians": "/".join(f"{v:.3f}" for v in rounds[tvm.id]),
           "ort_round_medians": "/".join(f"{v:.3f}" for v in rounds[ort.id]),
           "tvm_export_s": builds[tvm.id], "ort_export_s": builds[ort.id],
           "tvm_verified": tm["verified"], "tvm_max_lsb": tm["verification"].get("max_lsb"),
           "tvm_glue": json.dumps(tm.get("glue", {}), sort_keys=True)}
    print(f"{row['model']} {plan_name}: tvm:host {t_ms:.3f} ms (rounds {row['tvm_round_medians']}), ort-x86 "
          f"{o_ms:.3f} ms (rounds {row['ort_round_medians']}), ratio {row['ratio']:.2f} (export "
          f"{row['tvm_export_s']} s / {row['ort_export_s']} s; tvm verified {row['tvm_verified']}, glue "
          f"{row['tvm_glue']})", flush=True)
    return row


def _csv(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return "\n".join([",".join(cols)] + [",".join("" if r.get(c) is None else str(r[c]).replace(",", ";")
                                                  for c in cols) for r in rows]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=8, help="tuning trials per layer module (and per dot kernel)")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--work-dir", default="runs/tvm-bench", help="tuning database and built layers")
    ap.add_argument("--out", default="bench/tvm/results")
    ap.add_argument("--phase", choices=("layers", "model", "all"), default="all")
    ap.add_argument("--layers", type=int, default=0, help="only the first N distinct shapes (0: all)")
    ap.add_argument("--bitserial", type=int, default=0, help="also time w2a2 on the first N shapes")
    ap.add_argument("--quick", action="store_true", help="a pipeline check: 3 shapes, 4 trials, 10 runs, w8a8 model")
    ap.add_argument("--model-plans", default="resnet20:w8a8,resnet20:fp32,resnet20:mixed",
                    help="whole-model part: MODEL:PLAN,... (models resnet20, resnet18; plans w8a8, fp32, mixed)")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.trials, args.repeat = args.layers or 3, min(args.trials, 4), min(args.repeat, 10)
    os.environ.setdefault("TVM_NUM_THREADS", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    results.update({"trials": args.trials, "repeat": args.repeat, "time_unix": time.time()})
    lock = TimingLock()
    try:
        _run(args, out, results, lock)
    finally:
        lock.release()


def _run(args, out: Path, results: dict, lock: TimingLock) -> None:
    if args.phase in ("layers", "all"):
        specs = resnet18_layers()
        specs = specs[:args.layers] if args.layers else specs
        print(LAYER_HEAD, flush=True)
        t0 = time.time()
        results["layers"] = bench_layers(args, specs, lock)
        results["layers_wall_s"] = round(time.time() - t0, 1)
        atomic_write_text(out / "layers.csv", _csv(results["layers"]))
    if args.phase in ("model", "all"):
        results["model"] = bench_model(args, lock)
        atomic_write_text(out / "model.csv", _csv(results["model"]))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
