"""The ort-x86 target: single-layer graphs build, run in real ONNX Runtime sessions, fuse into integer
kernels where ORT can, compute what the QDQ semantics say, and report failures as data."""

from collections import Counter

import numpy as np
import onnx
import pytest

from hwmpq.records import FP32, BuildResult, LayerSpec, MeasureConfig, Precision
from hwmpq.targets import get_target
from hwmpq.targets.energy import modeled_energy_mj
from hwmpq.targets.ort import layers
from hwmpq.targets.ort.target import ORT_PRECISIONS, W8A8, OrtTarget
from hwmpq.targets.ort.timing import make_session, random_feeds, summarize

FAST = MeasureConfig(warmup=1, repeat=3)
CONV = LayerSpec("c", "conv", 8, 16, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8), bias=False,
                 macs=8 * 16 * 9 * 64, params=8 * 16 * 9)
DW = LayerSpec("d", "dwconv", 16, 16, (3, 3), (2, 2), (1, 1), groups=16, in_hw=(8, 8), out_hw=(4, 4), bias=False,
               macs=16 * 9 * 16, params=16 * 9)
LIN = LayerSpec("l", "linear", 32, 10, bias=True, macs=320, params=330)
SPECS = {"conv": CONV, "dwconv": DW, "linear": LIN}


def optimized_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    path = tmp_path / "opt.onnx"
    make_session(model.SerializeToString(), 1, optimized_path=str(path))
    return Counter(n.op_type for n in onnx.load(path).graph.node)


@pytest.fixture(scope="module")
def target():
    t = OrtTarget(threads=1)
    yield t
    t.cleanup()


@pytest.mark.parametrize("kind", ["conv", "dwconv", "linear"])
def test_every_declared_precision_builds_and_runs(target, kind):
    spec = SPECS[kind]
    for p in ORT_PRECISIONS.for_kind(kind):
        build = target.build_layer(spec, p)
        assert build.error_msg is None, (kind, p.label, build.error_msg)
        run = target.run(build, FAST)
        assert run.error_msg is None, (kind, p.label, run.error_msg)
        st = summarize(run.latencies_ms)
        assert st.n == 3 and 0 < st.p10_ms <= st.median_ms <= st.p90_ms


@pytest.mark.parametrize(("spec", "fused"), [(CONV, "QLinearConv"), (DW, "QLinearConv"), (LIN, "QGemm")],
                         ids=["conv", "dwconv", "linear"])
def test_w8a8_becomes_an_integer_kernel(tmp_path, spec, fused):
    ops = optimized_ops(layers.layer_model(spec, Precision(8, 8)), tmp_path)
    assert ops[fused] == 1 and ops["Conv"] == 0 and ops["Gemm"] == 0, ops


def test_int16_runs_as_float_between_qdq_and_int4_linear_is_matmulnbits(tmp_path):
    ops16 = optimized_ops(layers.layer_model(CONV, Precision(16, 16)), tmp_path)
    assert ops16["Conv"] == 1 and ops16["QLinearConv"] == 0
    ops4 = optimized_ops(layers.layer_model(LIN, Precision(4, 32)), tmp_path)
    assert ops4["MatMulNBits"] == 1


def test_w8a8_layer_computes_the_qdq_semantics():
    """QLinearConv output codes equal DQ -> float conv (numpy) -> Q within one code (integer requantize)."""
    spec = LayerSpec("c", "conv", 4, 6, (1, 1), in_hw=(3, 3), out_hw=(3, 3), bias=False)
    model = layers.layer_model(spec, Precision(8, 8))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    sess = make_session(model.SerializeToString(), 1)
    x = np.random.default_rng(1).integers(0, 60, (1, 4, 3, 3)).astype(np.uint8)
    got = sess.run(None, {"x": x})[0].astype(int) - 128
    w = inits["y_w_q"].astype(np.float32) * inits["y_w_scale"].reshape(-1, 1, 1, 1)
    b = inits["y_b_q"] * inits["y_b_scale"]
    xf = x.astype(np.float32) * inits["y_in_scale"]
    y = np.einsum("oi,nihw->nohw", w[:, :, 0, 0], xf) + b.reshape(1, -1, 1, 1)
    want = np.clip(np.round(y / inits["y_scale"]), -128, 127)
    assert np.abs(got - want).max() <= 1
    assert (got == want).mean() > 0.9


def test_refused_precision_and_failures_are_results(target):
    bad = target.build_layer(CONV, Precision(4, 32))
    assert bad.artifact is None and "cannot run w4a32" in bad.error_msg
    assert target.run(bad, FAST).error_msg
    missing = target.run(BuildResult("/nonexistent/model.onnx"), FAST)
    assert missing.latencies_ms is None and "session creation failed" in missing.error_msg
    slow = target.run(target.build_layer(CONV, FP32), MeasureConfig(warmup=0, repeat=10_000, timeout_s=0.01))
    assert slow.error_msg and "timeout" in slow.error_msg
    wrong_threads = target.run(target.build_layer(CONV, FP32), MeasureConfig(threads=2, repeat=1))
    assert "threads" in wrong_threads.error_msg


def test_transitions_and_overhead_build_and_run(target, tmp_path):
    for src, dst in [(FP32, Precision(8, 8)), (Precision(8, 8), FP32), (Precision(8, 8), Precision(16, 16)),
                     (Precision(4, 32), FP32)]:
        shape = (1, 32) if src.a_bits == 32 and src.w_bits == 4 else (1, 8, 4, 4)
        build = target.build_transition(shape, src, dst)
        assert build.error_msg is None
        assert target.run(build, FAST).error_msg is None
    assert target.run(target.build_overhead(), FAST).error_msg is None
    ops = optimized_ops(layers.transition_model((1, 8, 4, 4), Precision(8, 8), Precision(8, 8)), tmp_path)
    assert ops["QLinearConv"] == 2, ops  # both stand-ins stay integer kernels in the chain
    sess = make_session(layers.transition_model((1, 8, 4, 4), FP32, Precision(8, 8)).SerializeToString(), 1)
    assert sess.run(None, random_feeds(sess))[0].dtype == np.uint8


def test_a_pair_chain_computes_its_two_layers_in_sequence(target, tmp_path):
    """The fp32 chain of two real layers is layer(src) -> activation -> layer(dst) with the same seeded
    weights as their own layer rows; integer chains are one integer stream (no Q/DQ between the kernels,
    a residual add as QLinearAdd) as the exporter emits them; layers that do not chain are refused."""
    expand = LayerSpec("e", "conv", 8, 32, (1, 1), in_hw=(6, 6), out_hw=(6, 6), bias=False)
    dw = LayerSpec("d", "dwconv", 32, 32, (3, 3), padding=(1, 1), groups=32, in_hw=(6, 6), out_hw=(6, 6), bias=False)
    x = np.random.default_rng(0).standard_normal(expand.input_shape).astype(np.float32)
    first = make_session(layers.layer_model(expand, FP32).SerializeToString(), 1)
    second = make_session(layers.layer_model(dw, FP32).SerializeToString(), 1)
    y = first.run(None, {"x": x})[0]
    for activation, glue in [("relu", np.maximum(y, 0)), ("relu6", np.clip(y, 0, 6)), ("none", y),
                             ("silu", y / (1 + np.exp(-y))), ("hardswish", y * np.clip(y + 3, 0, 6) / 6)]:
        want = second.run(None, {"x": glue.astype(np.float32)})[0]
        chain = make_session(layers.chain_model(expand, FP32, dw, FP32, activation).SerializeToString(), 1)
        np.testing.assert_allclose(chain.run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-4, err_msg=activation)
    ops = optimized_ops(layers.chain_model(expand, W8A8, dw, W8A8), tmp_path)
    assert ops["QLinearConv"] == 2 and "QuantizeLinear" not in ops, ops  # the codes flow on (one quantizer)
    # through a residual add: layer(src) + r -> activation -> layer(dst), r a second (float) input
    r = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    want = second.run(None, {"x": np.maximum(y + r, 0)})[0]
    chain = make_session(layers.chain_model(expand, FP32, dw, FP32, "relu", "add").SerializeToString(), 1)
    np.testing.assert_allclose(chain.run(None, {"x": x, "r": r})[0], want, rtol=1e-4, atol=1e-4)
    ops = optimized_ops(layers.chain_model(expand, W8A8, dw, W8A8, "relu", "add"), tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and "Add" not in ops, ops  # an integer residual add
    assert target.run(target.build_pair(expand, W8A8, dw, FP32, "relu6", "add"), FAST).error_msg is None
    assert "only a residual add" in target.build_pair(expand, FP32, dw, FP32, "relu", "concat").error_msg
    for a, b in [(FP32, W8A8), (W8A8, FP32), (Precision(16, 16), Precision(4, 8))]:
        build = target.build_pair(expand, a, dw, b)
        assert build.error_msg is None and target.run(build, FAST).error_msg is None
    assert "cannot chain" in target.build_pair(dw, FP32, expand, FP32).error_msg
    assert "cannot run" in target.build_pair(expand, Precision(4, 32), dw, FP32).error_msg


def test_device_fingerprint_depends_on_threads_and_registry():
    one, two = OrtTarget(threads=1).device(), OrtTarget(threads=2).device()
    assert one.fingerprint != two.fingerprint and one.details["onnxruntime"]
    assert one.details["clock"] == "thread_cpu" and two.details["clock"] == "wall"
    assert get_target("ort-x86", threads=1).id == "ort-x86"
    with pytest.raises(ValueError):
        OrtTarget(threads=0)
    with pytest.raises(ValueError):
        OrtTarget(threads=2, clock="thread_cpu")


def test_energy_is_modeled_and_integer_is_cheaper(target):
    e8, src = target.energy(CONV, Precision(8, 8), 0.1)
    e32, _ = target.energy(CONV, FP32, 0.1)
    e16, _ = target.energy(CONV, Precision(16, 16), 0.1)
    assert src == "modeled" and 0 < e8 < e32
    assert e16 > e8  # int16 runs as float compute on ORT: charged float MACs
    assert modeled_energy_mj(CONV, FP32) == pytest.approx(CONV.macs * 4.6e-9 + (CONV.params * 4 + (8 * 64 + 16 * 64) * 4) * 2.5e-9)


def _saturating_w8a8_conv() -> onnx.ModelProto:
    """A w8a8 conv whose int16 pair sums overflow on AVX2's fast path (u8 inputs 150-255 times weights of
    +-127 with equal signs along a filter: 2 x 255 x 127 > 32767), with an output scale that keeps the
    result off the uint8 rails, so that any saturation shows in the output."""
    from onnx import numpy_helper

    spec = LayerSpec("sat", "conv", 64, 64, (3, 3), padding=(1, 1), in_hw=(8, 8), out_hw=(8, 8), bias=True)
    m = layers.layer_model(spec, Precision.parse("w8a8"))
    rng = np.random.default_rng(0)
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.int8 and a.ndim == 4:
            w = np.where(rng.random((a.shape[0], 1, 1, 1)) < 0.5, 127, -128) * np.ones(a.shape)
            init.CopyFrom(numpy_helper.from_array(w.astype(np.int8), init.name))
        if init.name == "y_scale":
            in_scale = next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == "y_in_scale")
            w_scale = next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == "y_w_scale").max()
            full = 64 * 9 * 255 * 128 * float(in_scale) * float(w_scale)
            init.CopyFrom(numpy_helper.from_array(np.array(full / 127, np.float32), init.name))
    return m


def test_default_int8_path_is_exact_on_this_cpu():
    """Whatever this CPU is, the int8 path OrtTarget picks by default computes what the exact path does, on a
    layer built to saturate AVX2's fast path (on a VNNI CPU it picks the fast path, which is exact there)."""
    from hwmpq.targets.ort.target import fast_int8_is_exact

    m = _saturating_w8a8_conv().SerializeToString()
    exact = make_session(m, 1, exact_u8s8=True)
    chosen = make_session(m, 1, exact_u8s8=OrtTarget().exact_u8s8)
    name = exact.get_inputs()[0].name
    x = np.random.default_rng(1).integers(150, 256, (1, 64, 8, 8)).astype(np.uint8)
    want, got = exact.run(None, {name: x})[0], chosen.run(None, {name: x})[0]
    assert 0.5 < np.mean((want > 0) & (want < 255)), "the output scale must keep most values off the rails"
    np.testing.assert_array_equal(got, want)
    assert OrtTarget().exact_u8s8 is not fast_int8_is_exact()
    assert fast_int8_is_exact("avx2 fma avx512_vnni") and not fast_int8_is_exact("avx2 fma")
    assert OrtTarget(exact_u8s8=True).device().fingerprint != OrtTarget(exact_u8s8=False).device().fingerprint
