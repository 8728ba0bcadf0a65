"""Layers in context (lut/context.py): per-precision factors solved from the model's uniform plans."""

import numpy as np
import pytest
from hwmpq.lut.context import (
    KIND,
    apply_context,
    context_factors,
    model_signature,
    profile_context,
    uniform_indices,
)
from hwmpq.lut.model import build_table
from hwmpq.lut.table import LatencyTable
from hwmpq.lut.validate import format_report, validate

from hwmpq.records import FP32, BitPlan, Edge, LayerSpec, MeasureConfig, Precision

W8, W4 = Precision(8, 8), Precision(4, 32)
# three conv layers allow fp32 and w8a8; the linear layer also allows w4a32 (weight-only)
TABLE = LatencyTable(
    ("c1", "c2", "c3", "fc"), (FP32, W8, W4),
    np.array([[1.0, 0.4, np.inf], [2.0, 0.8, np.inf], [1.0, 0.5, np.inf], [0.1, 0.05, 0.04]]),
    np.zeros((4, 3)),
    ((0, 1, np.array([[-0.1, 0.2, 0.0], [0.3, 0.05, 0.0], [0.0, 0.0, 0.0]])),),
    constant_ms=0.01)


def test_factors_reproduce_the_uniform_plans_they_come_from():
    alpha = {FP32: 0.10, W8: 0.25}
    scaled = apply_context(TABLE, alpha)
    plans = uniform_indices(TABLE)
    assert plans[2] == [0, 0, 0, 2]  # w4a32: the classifier only, fp32 elsewhere
    measured = {TABLE.candidates[p]: scaled.predict_indices(idx)[0] for p, idx in plans.items()}
    got = context_factors(TABLE, measured)
    assert got[FP32] == pytest.approx(0.10) and got[W8] == pytest.approx(0.25)
    # w4a32 holds 0.04 of its plan's 4.04 ms of rows: too little to tell, no factor
    assert got[W4] == 0.0
    for idx in plans.values():  # the scaled table predicts every uniform plan as measured
        assert apply_context(TABLE, got).predict_indices(idx)[0] == pytest.approx(scaled.predict_indices(idx)[0])
    mixed = [0, 1, 0, 2]  # a plan that is not uniform gets each layer's own factor
    rows = TABLE.layer_ms[np.arange(4), mixed]
    want = TABLE.predict_indices(mixed)[0] + 0.1 * (rows[0] + rows[2]) + 0.25 * rows[1]
    assert apply_context(TABLE, got).predict_indices(mixed)[0] == pytest.approx(want)


def test_no_fp32_row_no_factors_and_wild_factors_are_clipped():
    assert context_factors(TABLE, {W8: 3.0}) == {}
    plans = uniform_indices(TABLE)
    measured = {FP32: 100 * TABLE.predict_indices(plans[0])[0]}
    with pytest.warns(UserWarning, match="outside"):
        assert context_factors(TABLE, measured)[FP32] == 1.0


def test_model_signature_follows_layers_and_edges():
    a = LayerSpec("a", "conv", 4, 8, (3, 3), padding=(1, 1), in_hw=(4, 4), out_hw=(4, 4))
    b = LayerSpec("b", "conv", 8, 8, (1, 1), in_hw=(4, 4), out_hw=(4, 4), bias=False)
    e = Edge("a", "b", (1, 8, 4, 4))
    sig = model_signature([a, b], [e])
    assert sig == model_signature([a, b], [e, Edge("a", "zz", (1, 8, 4, 4))])  # edges to other layers ignored
    assert sig != model_signature([a, b], [Edge("a", "b", (1, 8, 4, 4), "relu6")])
    assert sig != model_signature([b, a], [e])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:in-context factor")  # test_tiny's rows are mostly fixed costs: far off
def test_uniform_plans_are_timed_once_and_scale_the_table(tiny_ort):
    """Real ORT: after the layer profile, every candidate's uniform plan is exported and timed into a
    "model" row; a second call measures nothing; the table built with them (``context=True``) differs
    from the default one by exactly the factors they give; validate reports both."""
    t = tiny_ort
    cfg = MeasureConfig(warmup=2, repeat=9)
    t.profile(cfg)
    plain = build_table(t.store, t.specs, t.edges, cfg, t.target)
    assert profile_context(t.model, t.x, t.specs, t.edges, t.target, t.store, cfg) == len(uniform_indices(plain))
    rows = t.store.measurements(KIND)
    assert rows and all(m.ok and m.signature == model_signature(t.specs, t.edges) for m in rows)
    assert profile_context(t.model, t.x, t.specs, t.edges, t.target, t.store, cfg) == 0  # resumed: nothing to do
    measured = {m.precision: m.quoted_ms(cfg.statistic) for m in rows}
    factors = context_factors(plain, measured)
    assert FP32 in factors
    table = build_table(t.store, t.specs, t.edges, cfg, t.target, context=True)
    np.testing.assert_allclose(table.layer_ms, apply_context(plain, factors).layer_ms)
    assert not np.allclose(table.layer_ms[np.isfinite(table.layer_ms)], plain.layer_ms[np.isfinite(plain.layer_ms)])
    report = validate(t.store, t.model, t.x, 2, cfg, target=t.target)
    assert report.context_factors and report.context_mape_pct is not None
    for r in report.plans:  # the main prediction is the default table's; the in-context one beside it
        assert r.predicted_ms == pytest.approx(plain.predict(_plan(plain, r.plan))[0])
        assert r.predicted_context_ms == pytest.approx(table.predict(_plan(plain, r.plan))[0])
    assert "in-context factors" in format_report(report)


def _plan(table, labels: dict[str, str]):
    return BitPlan.from_dict({f: Precision.parse(labels[f]) for f in table.fqns})


@pytest.mark.slow
def test_profile_cli_times_the_uniform_plans_with_context(tmp_path):
    import typer
    from hwmpq.lut.cli import lut_app
    from hwmpq.lut.store import LutStore
    from hwmpq.profilers.cli import register
    from typer.testing import CliRunner

    app = typer.Typer()
    register(app)
    app.add_typer(lut_app, name="lut")
    lut = str(tmp_path / "ctx.lut")
    args = ["profile", "--target", "ort-x86", "--model", "test_tiny", "--lut", lut, "--warmup", "1", "--repeat", "5",
            "--rounds", "1", "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    with LutStore.read(lut) as store:
        assert not store.measurements(KIND)  # off by default
    res = CliRunner().invoke(app, [*args, "--context"])
    assert res.exit_code == 0, res.output
    with LutStore.read(lut) as store:
        rows = store.measurements(KIND)
        assert len(rows) == len({m.precision for m in store.measurements("layer")}) and all(m.ok for m in rows)
    shown = CliRunner().invoke(app, ["lut", "show", lut])
    assert shown.exit_code == 0 and "whole model" in shown.output and "uniform fp32" in shown.output, shown.output
