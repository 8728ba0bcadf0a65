"""Tensor placement (one activation quantizer per tensor) and the ORT graphs it exports: integer residual
streams, absorbed activations, float islands with a DQ where they begin, real ONNX Runtime sessions."""

import copy
import json
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwmpq.graph import analyse
from hwmpq.placement import TensorQuantizer
from hwmpq.qmodules import QuantLayer, calibrate, placement_of, quant_layers, quantize
from hwmpq.records import FP32, BitPlan, Precision
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import make_session
from hwmpq.zoo import create_model

W8A8 = Precision(8, 8)


class Block(nn.Module):
    """conv-bn-relu -> conv-bn, + identity shortcut, relu; then pool and a classifier."""

    def __init__(self, act=nn.ReLU) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act = act()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        y = F.relu(y + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _model(act=nn.ReLU) -> nn.Module:
    torch.manual_seed(0)
    m = Block(act)
    for bn in (m.bn1, m.bn2):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.normal_(bn.bias, 0, 0.1)
    return m.eval()


def _quantized(model, plan, x):
    q = quantize(copy.deepcopy(model), plan)
    calibrate(q, [x])
    return q.eval()


def _export(q, plan, tmp_path, name="out"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = OrtTarget(threads=1).export(q, plan, torch.zeros(1, 3, 12, 12), str(tmp_path / name))
    opt = Counter(n.op_type for n in onnx.load(tmp_path / name / "model.opt.onnx").graph.node)
    return res, opt, [str(w.message) for w in caught]


def _agreement(q, path, x):
    sess = make_session(path, 1)
    got = np.concatenate([sess.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    with torch.no_grad():
        ref = q(x).numpy()
    return float((ref.argmax(1) == got.argmax(1)).mean()), float(np.abs(ref - got).max()), float(np.abs(ref).max())


def test_one_quantizer_per_tensor_shared_by_producer_and_consumers():
    model = create_model("resnet20", num_classes=10, in_chans=1).eval()
    x = torch.randn(4, 1, 28, 28)
    fqns = [s.fqn for s in analyse(model, x[:1])[0]]
    q = quantize(copy.deepcopy(model), BitPlan.uniform(fqns, W8A8))
    assert placement_of(q) == "tensor"
    # the input, 21 conv outputs (ReLU absorbed), 9 residual adds, the pooled tensor, the logits
    assert len(q.tensor_quant) == 1 + 21 + 9 + 1 + 1
    producers = {}
    for node in q.graph.nodes:
        if node.op == "call_module" and node.target.startswith("tensor_quant."):
            producers.setdefault(node.target, node.args[0])
    layers = quant_layers(q)
    # every layer reads a quantizer some producer wrote: none of them re-quantizes its input
    assert {id(layer.input_quantizer) for layer in layers.values()} <= {id(m) for m in q.tensor_quant.values()}
    after_relu = [m for m in q.tensor_quant.values() if not m.signed]
    assert len(after_relu) >= 9 + 10  # the adds' and the conv1s' outputs are unsigned (ReLU absorbed)
    assert all(isinstance(m, QuantLayer) for m in layers.values()) and len(layers) == len(fqns)
    state = q.state_dict()
    q2 = quantize(copy.deepcopy(model), BitPlan.uniform(fqns, W8A8))
    q2.load_state_dict(state)  # the same plan gives the same quantizer names: checkpoints load


@pytest.mark.slow
def test_residual_block_exports_as_one_integer_stream(tmp_path):
    model = _model()
    x = torch.randn(64, 3, 12, 12)
    fqns = [s.fqn for s in analyse(model, x[:1])[0]]
    plan = BitPlan.uniform(fqns, W8A8)
    q = _quantized(model, plan, x)
    res, opt, warns = _export(q, plan, tmp_path)
    assert opt["QLinearAdd"] == 1 and opt["Add"] == 0, opt
    assert opt["QLinearConv"] == 3 and opt["QGemm"] == 1 and opt["QLinearGlobalAveragePool"] == 1, opt
    assert opt["QuantizeLinear"] == 1 and opt["DequantizeLinear"] == 1, opt  # one Q in, one DQ out
    assert opt["Relu"] == 0 and not warns
    marked = Counter(n.op_type for n in onnx.load(tmp_path / "out" / "model.onnx").graph.node)
    assert marked["Relu"] == 0  # absorbed into the unsigned quantizers' ranges, exactly
    agree, diff, scale = _agreement(q, res.artifact, x)
    assert agree >= 0.98 and diff < 0.05 * scale, (agree, diff, scale)


@pytest.mark.slow
def test_relu6_is_absorbed_by_capping_the_step_size(tmp_path):
    model = _model(nn.ReLU6)
    x = 4 * torch.randn(64, 3, 12, 12)  # conv1's outputs reach far beyond 6
    fqns = [s.fqn for s in analyse(model, x[:1])[0]]
    plan = BitPlan.uniform(fqns, W8A8)
    q = _quantized(model, plan, x)
    capped = [m for m in q.tensor_quant.values() if isinstance(m, TensorQuantizer) and m.ceiling == 6.0]
    assert len(capped) == 1 and float(capped[0].effective_scale().detach()) * 255 <= 6.0 + 1e-5
    res, opt, _ = _export(q, plan, tmp_path)
    assert Counter(n.op_type for n in onnx.load(tmp_path / "out" / "model.onnx").graph.node)["Clip"] == 0
    assert opt["QLinearConv"] == 3, opt
    agree, diff, scale = _agreement(q, res.artifact, x)
    assert agree >= 0.98 and diff < 0.05 * scale, (agree, diff, scale)


@pytest.mark.slow
def test_a_float_layer_is_an_island_with_a_dq_in_and_a_q_out(tmp_path):
    model = _model()
    x = torch.randn(64, 3, 12, 12)
    plan = BitPlan.from_dict({"stem": W8A8, "conv1": W8A8, "conv2": FP32, "fc": W8A8})
    q = _quantized(model, plan, x)
    res, opt, warns = _export(q, plan, tmp_path)
    assert res.float_layers == ("conv2",) and set(res.integer_layers) == {"stem", "conv1", "fc"}
    # conv2 stays a float Conv (ORT's WeightBiasQuantization is off) between a DQ and a Q; its output is
    # quantized where it joins the residual add, which stays integer
    assert opt["QLinearConv"] == 2 and opt["Conv"] == 1 and opt["QLinearAdd"] == 1 and opt["Add"] == 0, opt
    assert opt["QuantizeLinear"] == 2 and opt["DequantizeLinear"] == 2, opt  # the model's ends + the island's
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["float_layers"] == ["conv2"] and manifest["dequantized_tensors"]
    assert manifest["disabled_optimizers"] == ["WeightBiasQuantization"]
    agree, diff, scale = _agreement(q, res.artifact, x)
    assert agree >= 0.98 and diff < 0.05 * scale, (agree, diff, scale)


@pytest.mark.slow
def test_an_op_without_an_integer_kernel_stays_float_with_a_warning_naming_it(tmp_path):
    model = _model(nn.Hardswish)
    x = torch.randn(64, 3, 12, 12)
    fqns = [s.fqn for s in analyse(model, x[:1])[0]]
    plan = BitPlan.uniform(fqns, W8A8)
    q = _quantized(model, plan, x)
    res, opt, warns = _export(q, plan, tmp_path)
    assert opt["QLinearConv"] == 3, opt
    named = [w for w in warns if "no integer kernel" in w]
    assert len(named) == 1 and "'act' (Hardswish)" in named[0] and "test_placement.py" in named[0], warns
    agree, diff, scale = _agreement(q, res.artifact, x)
    assert agree >= 0.98 and diff < 0.05 * scale, (agree, diff, scale)


def test_layer_placement_keeps_per_layer_quantizers():
    model = _model()
    fqns = [s.fqn for s in analyse(model, torch.zeros(1, 3, 12, 12))[0]]
    q = quantize(copy.deepcopy(model), BitPlan.uniform(fqns, W8A8), placement="layer")
    assert placement_of(q) == "layer" and not hasattr(q, "tensor_quant")
    assert all(m.in_quant is not None and m.out_quant is not None for m in quant_layers(q).values())
    with pytest.raises(ValueError, match="placement"):
        quantize(copy.deepcopy(model), BitPlan.uniform(fqns, W8A8), placement="edge")


@pytest.mark.slow
def test_a_float_stem_is_quantized_before_its_max_pool(tmp_path):
    """Quantizing before a pure data movement gives the same values and lets it run on integer codes; the
    exporter writes that max pool channels-last, so the integer stream after it stays channels-last."""
    model = create_model("resnet18", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    fqns = [s.fqn for s in analyse(model, x[:1])[0]]
    plan = BitPlan(tuple((f, FP32 if f == "stem.0" else W8A8) for f in fqns))
    q = _quantized(model, plan, x)
    pool = next(n for n in q.graph.nodes if n.op == "call_module" and isinstance(q.get_submodule(n.target), nn.MaxPool2d))
    assert pool.args[0].target.startswith("tensor_quant.")
    after = [u for u in pool.users]
    assert len(after) == 1 and after[0].target == pool.args[0].target  # the same quantizer re-applied
    quantizer = q.get_submodule(pool.args[0].target)
    y = 3 * torch.randn(2, 64, 32, 32)
    with torch.no_grad():  # max commutes with the monotone quantizer: the same values either way
        assert torch.equal(F.max_pool2d(quantizer(y), 3, 2, 1), quantizer(F.max_pool2d(y, 3, 2, 1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = OrtTarget(threads=1).export(q, plan, x[:1], str(tmp_path / "out"))
    opt = Counter(n.op_type for n in onnx.load(tmp_path / "out" / "model.opt.onnx").graph.node)
    # channels-first, ORT would pool the codes 20x slower and put a Transpose around every block
    assert opt["NhwcMaxPool"] == 1 and opt["MaxPool"] == 0 and opt["Transpose"] <= 2, opt
    assert opt["QLinearAdd"] == 8 and opt["QuantizeLinear"] == 1 and opt["DequantizeLinear"] == 1, opt
    agree, diff, scale = _agreement(q, res.artifact, x)
    assert agree == 1.0 and diff < 0.05 * scale, (agree, diff, scale)


class _SamePadConv(nn.Conv2d):
    """A conv that pads in its own forward (TensorFlow "SAME", as EfficientNet ports write it)."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))


def test_a_float_conv_subclass_stays_a_layer_of_the_quantized_model():
    from hwmpq.qmodules import float_view

    model = nn.Sequential(_SamePadConv(3, 8, 2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 12 * 12, 4)).eval()
    x = torch.randn(4, 3, 12, 12)
    fqns = [s.fqn for s in analyse(model, x[:1])[0]]
    for first in (FP32, W8A8):
        plan = BitPlan(tuple((f, first if f == "0" else W8A8) for f in fqns))
        q = _quantized(model, plan, x)
        assert [s.fqn for s in analyse(float_view(q), x[:1])[0]] == fqns
