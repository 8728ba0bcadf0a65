"""The TVM exporter's integer stream (targets/tvm/stream.py): codes flow NHWC from layer to layer, residual
adds and pools on codes, float islands; every export checked against the torch fake-quant model."""

from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hwmpq.graph import analyse  # noqa: E402
from hwmpq.qmodules import quantize  # noqa: E402
from hwmpq.records import FP32, W8A8, BitPlan, Precision  # noqa: E402
from hwmpq.targets.tvm import codes as C  # noqa: E402
from hwmpq.targets.tvm.export import ExportError, build_with_glue, prepare_model  # noqa: E402
from hwmpq.targets.tvm.target import TvmTarget  # noqa: E402
from hwmpq.zoo import create_model  # noqa: E402

pytestmark = [pytest.mark.tvm, pytest.mark.slow]


def _run(mod, *xs: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, "llvm")
    return tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(x) for x in xs]).numpy()


def _count_ops(mod, name: str) -> int:
    return str(mod["main"]).count(name)


def test_integer_add_on_codes_equals_torch_fake_quant():
    """Codes of two scales -> codes at the add's quantizer (dequantize, add, ReLU, quantize fused), against
    torch's q(relu(a * sa + b * sb)) in float32: the exporter's residual add."""
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (2, 5, 7, 16)).astype(np.int8)
    b = rng.integers(0, 256, (2, 5, 7, 16)).astype(np.uint8)
    ga, gb, go = C.Grid("a", 0.0371, -128, 127), C.Grid("b", 0.0213, 0, 255), C.Grid("o", 0.0452, 0, 255)
    bb = tvm.relax.BlockBuilder()
    va = tvm.relax.Var("a", tvm.relax.TensorType(a.shape, "int8"))
    vb = tvm.relax.Var("b", tvm.relax.TensorType(b.shape, "uint8"))
    with bb.function("main", [va, vb]):
        with bb.dataflow():
            s = bb.emit(tvm.relax.op.add(C.dequantize(bb, va, ga), C.dequantize(bb, vb, gb)))
            out = bb.emit_output(C.quantize(bb, bb.emit(tvm.relax.op.nn.relu(s)), go))
        bb.emit_func_output(out)
    got = _run(bb.get(), a, b)
    ta = torch.from_numpy(a.astype(np.float32)) * torch.tensor(ga.scale)
    tb = torch.from_numpy(b.astype(np.float32)) * torch.tensor(gb.scale)
    want = torch.clamp(torch.round(torch.relu(ta + tb) / torch.tensor(go.scale)), 0, 255).numpy()
    assert got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999, (diff.max(), (diff == 0).mean())
    assert len(np.unique(got)) > 50  # not saturated


def test_requantize_and_relu_on_codes_equal_torch():
    rng = np.random.default_rng(1)
    c = rng.integers(-128, 128, (1, 3, 3, 8)).astype(np.int8)
    src, dst = C.Grid("s", 0.05, -128, 127), C.Grid("d", 0.31, 0, 15)
    bb = tvm.relax.BlockBuilder()
    v = tvm.relax.Var("c", tvm.relax.TensorType(c.shape, "int8"))
    with bb.function("main", [v]):
        with bb.dataflow():
            r6 = C.relu(bb, v, src, 6.0)
            out = bb.emit_output(C.requantize(bb, r6, src, dst))
        bb.emit_func_output(out)
    got = _run(bb.get(), c)
    val = torch.from_numpy(c.astype(np.float32)) * torch.tensor(src.scale)
    r6 = torch.clamp(torch.round(torch.nn.functional.relu6(val) / torch.tensor(src.scale)), -128, 127)
    want = torch.clamp(torch.round(r6 * torch.tensor(src.scale) / torch.tensor(dst.scale)), 0, 15).numpy()
    np.testing.assert_array_equal(got, want.astype(np.uint8))


def _resnet20(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("resnet20").eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial folded biases
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.1)
    return model, torch.randn(1, 3, 32, 32)


def _manifest(res) -> dict:
    return json.loads(open(res.manifest).read())


def test_uniform_int8_resnet20_is_one_stream_and_matches_torch(tmp_path):
    """One quantize + transpose at the input, one dequantize at the output, nothing between the 22 layers:
    the residual adds and the global pool run on codes; output equal to torch's fake-quant model."""
    model, x = _resnet20()
    specs, _ = analyse(model, x)
    plan = BitPlan.uniform([s.fqn for s in specs], W8A8)
    target = TvmTarget("host", work_dir=str(tmp_path / "w"))
    res = target.export(model, plan, x, str(tmp_path / "out"))
    m = _manifest(res)
    assert m["verified"] and m["verification"]["max_lsb"] <= 1 + 1e-4, m["verification"]
    assert m["placement"] == "tensor" and len(m["integer_layers"]) == 22
    # quantizes: the input, 9 residual adds, the pool; no requantize (one grid per tensor)
    assert m["glue"] == {"quantize": 11, "transpose": 1, "dequantize": 1}, m["glue"]
    qmodel, _ = prepare_model(model, plan, x)
    mod, _ = build_with_glue(qmodel, x, {n: s for n, s in ((s.fqn, s) for s in specs)}, target.dot_intrin)
    assert _count_ops(mod, "R.permute_dims") == 1


def test_mixed_plan_with_float_islands_and_bitserial_matches_torch(tmp_path):
    """fp32 layers dequantize at entry and quantize at exit (NCHW islands), bitserial layers requantize to
    their width, every other boundary is codes; output within 1 LSB of torch."""
    model, x = _resnet20(1)
    specs, _ = analyse(model, x)
    names = [s.fqn for s in specs]
    plan = {n: W8A8 for n in names}
    plan.update({"layers.0.1.conv1": FP32, "layers.1.0.shortcut.0": FP32, "layers.2.2.conv2": FP32,
                 "layers.1.1.conv2": Precision(2, 2), "layers.1.2.conv1": Precision(4, 4)})
    res = TvmTarget("host", work_dir=str(tmp_path / "w")).export(model, BitPlan.from_dict(plan), x,
                                                                  str(tmp_path / "out"))
    m = _manifest(res)
    assert m["verified"] and m["verification"]["max_lsb"] <= 1 + 1e-4, m["verification"]
    assert set(m["float_layers"]) == {"layers.0.1.conv1", "layers.1.0.shortcut.0", "layers.2.2.conv2"}
    g = m["glue"]
    # each float island: one dequantize (+ NCHW) in, one quantize (+ NHWC) out; plus input and output
    assert g["dequantize"] == 3 + 1 and g["transpose"] == 1 + 2 * 3, g
    assert g["requantize"] >= 2, g  # into and out of the 2-bit and 4-bit widths


class _PoolNet(nn.Module):
    """An ImageNet-style stem (conv, ReLU, max pool) into a residual block: the max pool runs on codes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(x + self.c1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_max_pool_on_codes_and_float_stem(tmp_path):
    torch.manual_seed(2)
    model, x = _PoolNet().eval(), torch.randn(1, 3, 20, 20)
    target = TvmTarget("host", work_dir=str(tmp_path / "w"))
    res = target.export(model, BitPlan.from_dict({"stem": W8A8, "c1": W8A8, "fc": W8A8}), x, str(tmp_path / "a"))
    m = _manifest(res)
    assert m["verified"] and m["verification"]["max_lsb"] <= 1 + 1e-4 and m["glue"]["transpose"] == 1, m
    # a float stem reads the float input; its ReLU's output is quantized (+ NHWC) before the max pool, which
    # pools codes (placement): one stream after it
    res = target.export(model, BitPlan.from_dict({"stem": FP32, "c1": W8A8, "fc": W8A8}), x, str(tmp_path / "b"))
    m = _manifest(res)
    assert m["verified"] and m["verification"]["max_lsb"] <= 1 + 1e-4, m["verification"]
    assert m["glue"] == {"quantize": 3, "transpose": 1, "dequantize": 1}, m["glue"]


def test_layer_placed_model_is_refused(tmp_path):
    model, x = _resnet20()
    specs, _ = analyse(model, x)
    plan = BitPlan.uniform([s.fqn for s in specs], W8A8)
    layered = quantize(model, plan, placement="layer")
    with pytest.raises(ExportError, match="tensor placement"):
        TvmTarget("host", work_dir=str(tmp_path / "w")).export(layered, plan, x, str(tmp_path / "out"))
