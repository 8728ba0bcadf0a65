"""Integer Relax layers vs the exact integer reference and vs hwmpq's torch QuantLayer; whole-model export."""

from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from hwmpq.qmodules import QuantLayer  # noqa: E402
from hwmpq.records import FP32, W8A8, BitPlan, LayerSpec, Precision  # noqa: E402
from hwmpq.targets.tvm import layers as L  # noqa: E402
from hwmpq.targets.tvm.export import ExportError  # noqa: E402
from hwmpq.targets.tvm.stream import grid_of, layer_int_params  # noqa: E402
from hwmpq.targets.tvm.target import TvmTarget  # noqa: E402

pytestmark = pytest.mark.tvm
CONV = LayerSpec("c", "conv", 8, 16, (3, 3), (2, 2), (1, 1), in_hw=(6, 6), out_hw=(3, 3))
DW = LayerSpec("d", "dwconv", 8, 8, (3, 3), (1, 1), (1, 1), groups=8, in_hw=(5, 5), out_hw=(5, 5))
FC = LayerSpec("l", "linear", 24, 5)


def _run(mod, x: np.ndarray) -> np.ndarray:
    ex = tvm.compile(mod, "llvm")
    return tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_tvm_round_is_half_to_even():
    bb = tvm.relax.BlockBuilder()
    v = tvm.relax.Var("x", tvm.relax.TensorType((6,), "float32"))
    with bb.function("main", [v]):
        bb.emit_func_output(bb.emit(tvm.relax.op.round(v)))
    out = _run(bb.get(), np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32))
    np.testing.assert_array_equal(out, [0, 2, 2, 0, -2, -2])


@pytest.mark.slow
@pytest.mark.parametrize("spec,prec", [(CONV, W8A8), (DW, W8A8), (FC, W8A8), (CONV, Precision(2, 2)),
                                       (CONV, Precision(3, 3)), (FC, Precision(2, 4)), (FC, Precision(4, 8))],
                         ids=lambda v: v.fqn if isinstance(v, LayerSpec) else v.label)
def test_integer_layer_is_exact(spec, prec):
    mod, (x,) = L.single_layer_module(spec, prec, seed=3)
    p = L.random_int_params(spec, prec, seed=3)
    out = _run(mod, x)
    ref = L.reference_int_layer(x, spec, p)
    assert out.dtype == np.uint8  # profiled rows: unsigned codes in and out (a ReLU absorbed)
    np.testing.assert_array_equal(out, ref)
    assert len(np.unique(out)) > 2  # not a saturated or constant output


@pytest.mark.slow
@pytest.mark.parametrize("relu_input", [True, False], ids=["uint8-in", "int8-in"])
def test_int8_conv_agrees_with_torch_quantlayer(relu_input):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, 1, 1)
    q = QuantLayer(conv, W8A8).eval()
    x = torch.randn(2, 8, 7, 7)
    x = torch.relu(x) if relu_input else x
    with torch.no_grad():
        ref = q(x)
    in_grid, out_grid = grid_of(q.in_quant), grid_of(q.out_quant)
    p = layer_int_params(q, in_grid, out_grid)
    s_in, s_out, qmin, qmax = in_grid.scale, out_grid.scale, in_grid.lo, in_grid.hi
    assert q.in_quant.signed is (not relu_input)
    xq = torch.clamp(torch.round(x / s_in), qmin, qmax).numpy().astype(p.in_dtype).transpose(0, 2, 3, 1)
    spec = LayerSpec("c", "conv", 8, 16, (3, 3), padding=(1, 1), in_hw=(7, 7), out_hw=(7, 7), batch=2)
    bb = tvm.relax.BlockBuilder()
    v = tvm.relax.Var("x", tvm.relax.TensorType(xq.shape, p.in_dtype))
    with bb.function("main", [v]):
        with bb.dataflow():
            out = bb.emit_output(L.emit_int8_layer(bb, v, spec, p))
        bb.emit_func_output(out)
    got = _run(bb.get(), np.ascontiguousarray(xq)).astype(np.int32).transpose(0, 3, 1, 2)
    want = torch.round(ref / s_out).numpy().astype(np.int32)
    diff = np.abs(got - want)
    # integer accumulation + rounded int32 bias vs torch's float32 conv: exact except rare ties, <= 1 LSB
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99, (diff.max(), (diff == 0).mean())


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(x + self.c2(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.slow
def test_export_mixed_plan_matches_torch_fake_quant(tmp_path):
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.rand(1, 1, 6, 6)
    plan = BitPlan.from_dict({"c1": W8A8, "c2": Precision(2, 2), "fc": FP32})
    target = TvmTarget("host", work_dir=str(tmp_path / "work"))
    res = target.export(model, plan, x, str(tmp_path / "out"))
    check = json.loads(open(res.manifest).read())["verification"]
    assert check["ok"] and "max_lsb" not in check, check  # fc is fp32: a float output, compared in float
    assert res.integer_layers == ("c1", "c2")
    model.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Softsign())  # TVM's importer has no Softsign
    with pytest.raises(ExportError, match="Softsign"):
        target.export(model, BitPlan.from_dict({"c1": W8A8, "c2.0": W8A8, "fc": FP32}), x, str(tmp_path / "b"))


@pytest.mark.slow
def test_export_tiny_zoo_model(tmp_path):
    from hwmpq.zoo import create_model

    torch.manual_seed(0)
    model = create_model("test_tiny").eval()
    x = torch.randn(1, 1, 8, 8)
    plan = BitPlan.from_dict({"conv1": W8A8, "conv2": Precision(2, 2), "dw": W8A8, "pw": Precision(4, 4),
                              "fc": FP32})
    res = TvmTarget("host", work_dir=str(tmp_path / "work")).export(model, plan, x, str(tmp_path / "out"))
    manifest = json.loads(open(res.manifest).read())
    assert manifest["verification"]["ok"], manifest["verification"]
    assert set(res.integer_layers) == {"conv1", "conv2", "dw", "pw"} and res.float_layers == ("fc",)
    bad = BitPlan.from_dict({**plan.as_dict(), "dw": Precision(2, 2)})
    with pytest.raises(ExportError, match="dw"):
        TvmTarget("host", work_dir=str(tmp_path / "work")).export(model, bad, x, str(tmp_path / "bad"))
