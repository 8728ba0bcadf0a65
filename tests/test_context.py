"""Kernels in context (profilers/context.py measures, lut/context.py prices): each layer's kernel timed
inside the model's uniform and mixed plans and alone; the latency model adds the difference to the layer's row."""

import numpy as np
import onnx
import pytest

from hwmpq.lut.context import apply_deltas, kernel_deltas
from hwmpq.lut.model import build_table
from hwmpq.lut.validate import format_report, validate
from hwmpq.profilers.context import (
    KIND,
    MIXED_PLANS,
    context_plans,
    kernel_signature,
    match_kernels,
    model_signature,
    output_glue,
    profile_context,
    uniform_plans,
)
from hwmpq.records import FP32, BitPlan, Edge, LayerSpec, MeasureConfig, Precision
from hwmpq.targets.ort import layers
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import make_session, random_feeds

W8 = Precision(8, 8)
A = LayerSpec("a", "conv", 4, 8, (3, 3), padding=(1, 1), in_hw=(4, 4), out_hw=(4, 4))
B = LayerSpec("b", "conv", 8, 8, (1, 1), in_hw=(4, 4), out_hw=(4, 4), bias=False)
FC = LayerSpec("fc", "linear", 8, 10, bias=True, macs=80, params=90)


def test_model_signature_follows_layers_and_edges():
    e = Edge("a", "b", (1, 8, 4, 4))
    sig = model_signature([A, B], [e])
    assert sig == model_signature([A, B], [e, Edge("a", "zz", (1, 8, 4, 4))])  # edges to other layers ignored
    assert sig != model_signature([A, B], [Edge("a", "b", (1, 8, 4, 4), "relu6")])
    assert sig != model_signature([B, A], [e])


def test_kernel_signatures_tell_model_layer_and_where_apart():
    sigs = {kernel_signature(m, f, w) for m in ("m1", "m2") for f in ("a", "b") for w in ("in_model", "alone")}
    assert len(sigs) == 8
    with pytest.raises(ValueError, match="where"):
        kernel_signature("m1", "a", "in_pair")


def test_uniform_plans_keep_fp32_where_a_precision_is_not_allowed():
    plans = uniform_plans([A, FC], OrtTarget(threads=1))
    w4a32 = Precision(4, 32)  # weight-only int4: linear layers only
    assert set(plans) == {FP32, W8, Precision(4, 8), Precision(16, 16), w4a32}
    assert dict(plans[w4a32].layers) == {"a": FP32, "fc": w4a32}
    assert dict(plans[W8].layers) == {"a": W8, "fc": W8}


def test_output_glue_is_the_first_output_edge_of_each_layer():
    edges = [Edge("a", "b", (1, 8, 4, 4), "relu", "add"), Edge("a", "fc", (1, 8), "relu6")]
    assert output_glue([A, B, FC], edges) == {"a": ("relu", "add"), "b": ("none", "none"), "fc": ("none", "none")}


def test_deltas_are_added_to_the_rows_at_their_precision_floored_at_zero():
    lat = np.array([[1.0, 0.4], [2.0, np.inf]])
    out = apply_deltas(lat, [A, B], (FP32, W8), {("a", FP32): 0.25, ("a", W8): -1.0, ("b", W8): 5.0})
    np.testing.assert_array_equal(out, [[1.25, 0.0], [2.0, np.inf]])
    np.testing.assert_array_equal(lat, [[1.0, 0.4], [2.0, np.inf]])  # not modified in place


def test_layer_model_appends_the_add_and_activation_to_a_float_output_only():
    x = random_feeds(make_session(layers.layer_model(A, FP32).SerializeToString(), 1))["x"]
    plain = make_session(layers.layer_model(A, FP32).SerializeToString(), 1).run(None, {"x": x})[0]
    r = np.random.default_rng(0).standard_normal(plain.shape).astype(np.float32)
    glued = make_session(layers.layer_model(A, FP32, "relu6", "add").SerializeToString(), 1)
    np.testing.assert_allclose(glued.run(None, {"x": x, "r": r})[0], np.clip(plain + r, 0, 6), rtol=1e-5, atol=1e-5)
    quantized = layers.layer_model(A, W8, "relu6", "add")  # integer output: the glue is the pair chains'
    assert [n.op_type for n in quantized.graph.node] == [n.op_type for n in layers.layer_model(A, W8).graph.node]
    with pytest.raises(ValueError, match="merge"):
        layers.layer_model(A, FP32, "relu", "concat")


def test_kernel_samples_gives_each_layer_kernel_of_a_chain_in_order(tmp_path):
    target = OrtTarget(threads=1, workdir=str(tmp_path / "w"))
    path = tmp_path / "chain.onnx"
    onnx.save(layers.chain_model(A, W8, B, FP32, "relu"), path)
    kernels = target.kernel_samples(str(path), runs=7)
    assert [op for op, _, _ in kernels] == ["QLinearConv", "Conv"]
    assert sorted(kernels[0][1]) == sorted(A.input_shape) and kernels[1][1] == B.input_shape  # (int8: NHWC)
    assert all(len(ms) == 7 and min(ms) >= 0 for _, _, ms in kernels)
    assert not list((tmp_path / "w").glob("kernels*.json"))  # the trace is removed
    target.cleanup()


def test_kernels_are_matched_to_layers_by_input_shape_then_time_then_order():
    conv1 = LayerSpec("b1.conv1", "conv", 16, 32, (3, 3), stride=(2, 2), padding=(1, 1), in_hw=(8, 8), out_hw=(4, 4))
    short = LayerSpec("b1.shortcut", "conv", 16, 32, (1, 1), stride=(2, 2), in_hw=(8, 8), out_hw=(4, 4))
    conv2 = LayerSpec("b1.conv2", "conv", 32, 32, (3, 3), padding=(1, 1), in_hw=(4, 4), out_hw=(4, 4))
    conv3 = LayerSpec("b2.conv1", "conv", 32, 32, (3, 3), padding=(1, 1), in_hw=(4, 4), out_hw=(4, 4))
    specs = [conv1, conv2, short, conv3]
    alone = {"b1.conv1": 0.011, "b1.shortcut": 0.005, "b1.conv2": 0.040, "b2.conv1": 0.040}
    # ORT ran the shortcut first, its int8 inputs in NHWC; conv2 and b2.conv1 share a signature
    shapes = [(1, 8, 8, 16), (1, 8, 8, 16), (1, 4, 4, 32), (1, 4, 4, 32)]
    got = match_kernels(specs, shapes, [0.006, 0.012, 0.043, 0.041], alone)
    assert got == ["b1.shortcut", "b1.conv1", "b1.conv2", "b2.conv1"]
    assert match_kernels(specs, [(1, 16, 8, 8), (1, 16, 8, 8), (1, 32, 4, 4), (1, 32, 4, 4)],  # fp32: NCHW
                         [0.012, 0.006, 0.043, 0.041], alone) == ["b1.conv1", "b1.shortcut", "b1.conv2", "b2.conv1"]
    assert match_kernels(specs, shapes[:3], [0.006, 0.012, 0.043], alone) is None  # a kernel short
    assert match_kernels(specs, [(1, 8, 8, 16)] * 4, [0.006, 0.012, 0.043, 0.041], alone) is None  # no 4x4 input


@pytest.mark.slow
def test_kernels_are_timed_once_and_added_to_the_table(tiny_ort):
    """Real ORT: after the layer profile, every layer's kernel is timed in each uniform plan and alone; a
    second call measures nothing; the table with context is the plain table plus the deltas; validate
    reports the error without them."""
    t = tiny_ort
    cfg = MeasureConfig(warmup=2, repeat=9)
    t.profile(cfg)
    plain = build_table(t.store, t.specs, t.edges, cfg, t.target, context=False)
    np.testing.assert_array_equal(build_table(t.store, t.specs, t.edges, cfg, t.target).layer_ms, plain.layer_ms)
    n = profile_context(t.model, t.x, t.specs, t.edges, t.target, t.store, cfg, rounds=2, runs=5)
    allowed = {(s.fqn, p) for s in t.specs for p in t.target.precisions.for_layer(s)}
    # the uniform plans time each layer at the precisions it allows (w4a32: the linear layer only), the
    # mixed ones every layer at its drawn precision
    assert n == 2 * len(allowed) + 2 * len(t.specs) * MIXED_PLANS
    assert all(m.ok and m.n == 10 for m in t.store.measurements(KIND))  # 2 rounds x 5 runs
    mixed = [(name, dict(plan.layers)) for name, p, plan in context_plans(t.specs, t.target) if p is None]
    assert len(mixed) == MIXED_PLANS and len({tuple(m.items()) for _, m in mixed}) == MIXED_PLANS
    assert mixed == [(name, dict(plan.layers)) for name, p, plan in context_plans(t.specs, t.target) if p is None]
    assert profile_context(t.model, t.x, t.specs, t.edges, t.target, t.store, cfg) == 0  # resumed: nothing to do
    deltas = kernel_deltas(t.store, t.specs, t.edges, cfg)
    assert set(deltas) == allowed
    table = build_table(t.store, t.specs, t.edges, cfg, t.target)
    np.testing.assert_allclose(table.layer_ms, apply_deltas(plain.layer_ms, t.specs, plain.candidates, deltas))
    assert not np.array_equal(table.layer_ms, plain.layer_ms)
    report = validate(t.store, t.model, t.x, 2, cfg, target=t.target)
    assert report.context_deltas == len(deltas) and report.plain_mape_pct is not None
    for r in report.plans:  # the main prediction holds the deltas; the one without them beside it
        plan = BitPlan.from_dict({f: Precision.parse(r.plan[f]) for f in table.fqns})
        assert r.predicted_ms == pytest.approx(table.predict(plan)[0])
        assert r.predicted_plain_ms == pytest.approx(plain.predict(plan)[0])
    assert "kernels in context" in format_report(report)


class _OneKernelShort(OrtTarget):
    """ORT, but whole models seem to run one layer kernel fewer than they have layers."""

    def kernel_samples(self, artifact, runs):
        got = super().kernel_samples(artifact, runs)
        return got[:-1] if "hwmpq-context-" in artifact else got  # a whole model, not a layer alone


class _Crashing(OrtTarget):
    """ORT, but tracing a whole model fails."""

    def kernel_samples(self, artifact, runs):
        if "hwmpq-context-" in artifact:
            raise RuntimeError("no trace")
        return super().kernel_samples(artifact, runs)


@pytest.mark.slow
def test_a_plan_whose_kernels_cannot_be_matched_or_traced_is_skipped_with_a_warning(tiny_ort):
    t = tiny_ort
    cfg = MeasureConfig(warmup=1, repeat=5)
    t.profile(cfg)
    rows = len(t.store)
    for target, message in ((_OneKernelShort(threads=1), "do not match"), (_Crashing(threads=1), "no trace")):
        with pytest.warns(UserWarning, match=message):
            assert profile_context(t.model, t.x, t.specs, t.edges, target, t.store, cfg, rounds=1, runs=3) == 0
        target.cleanup()
    assert len(t.store) == rows and kernel_deltas(t.store, t.specs, t.edges, cfg) == {}  # the layer rows stay


@pytest.mark.slow
def test_profile_cli_times_kernels_in_context_by_default(tmp_path):
    import typer
    from typer.testing import CliRunner

    from hwmpq.lut.cli import lut_app
    from hwmpq.lut.store import LutStore
    from hwmpq.profilers.cli import register

    app = typer.Typer()
    register(app)
    app.add_typer(lut_app, name="lut")
    lut = str(tmp_path / "ctx.lut")
    args = ["profile", "--target", "ort-x86", "--model", "test_tiny", "--lut", lut, "--warmup", "1", "--repeat", "5",
            "--rounds", "1", "--quiet"]
    res = CliRunner().invoke(app, [*args, "--no-context"])
    assert res.exit_code == 0, res.output
    with LutStore.read(lut) as store:
        assert not store.measurements(KIND)
        layers_at = {m.precision for m in store.measurements("layer")}
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    with LutStore.read(lut) as store:
        rows = store.measurements(KIND)
        assert {m.precision for m in rows} == layers_at and all(m.ok for m in rows)
    shown = CliRunner().invoke(app, ["lut", "show", lut], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "kernels in context" in shown.output, shown.output
