"""The torch quantizer computes exactly what ONNX Runtime's QuantizeLinear/DequantizeLinear compute."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from hwmpq.quantizers import LSQQuantizer, qrange

ONNX_TYPES = {(8, True): TensorProto.INT8, (8, False): TensorProto.UINT8, (16, True): TensorProto.INT16,
              (16, False): TensorProto.UINT16, (4, True): TensorProto.INT4, (4, False): TensorProto.UINT4}
NP_TYPES = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
            TensorProto.UINT16: np.uint16}


def ort_qdq(x: np.ndarray, scale: np.ndarray, bits: int, signed: bool, axis: int | None) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear in ONNX Runtime; widths without an ONNX type are stored in 8 bits
    with a Clip to the narrow range first (how hwmpq exports them)."""
    container = bits if bits in (4, 8, 16) else 8
    qtype = ONNX_TYPES[(container, signed)]
    qmin, qmax = qrange(bits, signed)
    inits = [helper.make_tensor("s", TensorProto.FLOAT, scale.shape, scale.ravel().tolist()),
             helper.make_tensor("zp", qtype, scale.shape, [0] * scale.size)]
    nodes, src = [], "x"
    attrs = {} if axis is None else {"axis": axis}
    if container != bits:
        lo, hi = (qmin * scale).astype(np.float32), (qmax * scale).astype(np.float32)
        assert axis is None
        inits += [helper.make_tensor("lo", TensorProto.FLOAT, [], [float(lo)]),
                  helper.make_tensor("hi", TensorProto.FLOAT, [], [float(hi)])]
        nodes.append(helper.make_node("Clip", ["x", "lo", "hi"], ["xc"]))
        src = "xc"
    nodes += [helper.make_node("QuantizeLinear", [src, "s", "zp"], ["q"], **attrs),
              helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def edge_values(scale: float, qmin: int, qmax: int, n: int = 4000, seed: int = 0) -> np.ndarray:
    """Random values plus the hard cases: exact halves (ties), saturation, zero, tiny, huge."""
    rng = np.random.default_rng(seed)
    halves = (np.arange(qmin - 3, qmax + 4) + 0.5) * scale
    ints = np.arange(qmin - 3, qmax + 4) * scale
    special = np.array([0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, qmin * scale * 10, qmax * scale * 10], dtype=np.float64)
    rand = rng.normal(0, (qmax - qmin) * scale / 4, n)
    vals = np.concatenate([halves, ints, special, rand])
    if len(vals) > 40000:
        vals = np.concatenate([vals[:1000], vals[-1000:], rng.choice(vals, 20000)])
    return vals.astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_per_tensor_matches_onnx(bits, signed):
    q = LSQQuantizer(bits, signed=signed)
    qmin, qmax = qrange(bits, signed)
    for scale in (0.0173, 0.5, 3.0517578125e-05):
        x = edge_values(scale, qmin, qmax)
        q.scale.data.fill_(scale)
        q.initialized.fill_(True)
        q.eval()
        got = q(torch.from_numpy(x)).detach().numpy()
        want = ort_qdq(x.reshape(1, -1), np.array(np.float32(scale)), bits, signed, None).ravel()
        np.testing.assert_array_equal(got, want, err_msg=f"bits={bits} signed={signed} scale={scale}")


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_per_channel_weights_match_onnx(bits):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.tensor([0.01, 0.1, 1, 5, 0.3, 2]).reshape(-1, 1, 1, 1)
    q = LSQQuantizer(bits, signed=True, channel_axis=0, num_channels=6)
    q.calibrate(w)
    q.eval()
    got = q(w).detach().numpy()
    scale = q.effective_scale().detach().numpy().astype(np.float32)
    want = ort_qdq(w.numpy(), scale, bits, True, 0)
    np.testing.assert_array_equal(got, want)


def test_ste_gradients_flow_inside_range_only():
    q = LSQQuantizer(8, signed=True)
    q.scale.data.fill_(0.1)
    q.initialized.fill_(True)
    x = torch.tensor([0.05, 1.0, 100.0, -100.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all()


def test_float_bits_is_identity():
    q = LSQQuantizer(32)
    x = torch.randn(10)
    assert torch.equal(q(x), x)
