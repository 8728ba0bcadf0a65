"""Layer rows timed in the model's cache state (lut/model_cache.py): a whole model runs, untimed, before
every timed run of the layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hwmpq.lut.model import build_table, profiling_specs
from hwmpq.lut.model_cache import ModelCache, cache_signature, context_id, prepare, uniform_plans
from hwmpq.lut.validate import format_report, validate
from hwmpq.profilers.jobs import plan_jobs
from hwmpq.profilers.runner import profile
from hwmpq.targets.fake import FakeTarget
from hwmpq.targets.ort import layers
from hwmpq.targets.ort.target import OrtTarget
from hwmpq.targets.ort.timing import make_session, random_feeds, time_session

from hwmpq.graph import analyse
from hwmpq.records import FP32, BitPlan, BuildResult, LayerSpec, MeasureConfig, Precision
from hwmpq.zoo import create_model

W8A8 = Precision(8, 8)
CONV = LayerSpec("c", "conv", 8, 8, (3, 3), padding=(1, 1), in_hw=(8, 8), out_hw=(8, 8), bias=False,
                 macs=8 * 8 * 9 * 64, params=8 * 8 * 9)


def test_time_session_runs_the_context_before_every_timed_run(tmp_path):
    session = make_session(layers.layer_model(CONV, FP32).SerializeToString(), 1)
    feeds = random_feeds(session)
    calls = []
    run = time_session(session, feeds, MeasureConfig(warmup=3, repeat=7, number=2),
                       before=lambda: calls.append(1))
    assert run.error_msg is None and len(run.latencies_ms) == 7 and all(t > 0 for t in run.latencies_ms)
    assert len(calls) == 14  # not during warm-up, once before each of repeat x number timed runs
    calls.clear()
    assert time_session(session, feeds, MeasureConfig(warmup=1, repeat=3)).error_msg is None and not calls


def test_ort_target_runs_the_context_model_and_reports_a_broken_one(tmp_path):
    target = OrtTarget(threads=1, workdir=str(tmp_path / "w"))
    build = target.build_layer(CONV, FP32)
    other = tmp_path / "model.onnx"
    onnx.save(layers.layer_model(CONV, W8A8), other)
    cfg = MeasureConfig(warmup=1, repeat=5)
    run = target.run(BuildResult(build.artifact, context=str(other)), cfg)
    assert run.error_msg is None and len(run.latencies_ms) == 5
    broken = target.run(BuildResult(build.artifact, context=str(tmp_path / "missing.onnx")), cfg)
    assert broken.latencies_ms is None and "context model" in broken.error_msg
    target.cleanup()


def _tiny():
    model = create_model("test_tiny").eval()
    x = torch.zeros(1, 1, 8, 8)
    specs, _ = analyse(model, x)
    from hwmpq.lut.model import edges_through_merges

    return model, x, specs, edges_through_merges(model, x)


def test_twins_follow_their_plain_rows_for_the_models_layers_only():
    _, _, specs, edges = _tiny()
    target = OrtTarget(threads=1)
    cache = ModelCache("m" * 16, {FP32: "/a/fp32.onnx", W8A8: "/a/w8a8.onnx"}, frozenset(s.fqn for s in specs))
    jobs = plan_jobs(profiling_specs(specs, edges, target), edges, target, model_cache=cache)
    twins = [j for j in jobs if j.context]
    fqns = {s.fqn for s in specs}
    expected = {(s.signature, p) for s in specs for p in target.precisions.for_layer(s) if p in (FP32, W8A8)}
    assert {(next(x for x in specs if x.fqn == t.fqns[0]).signature, t.precision) for t in twins} == expected
    for t in twins:
        plain = jobs[jobs.index(t) - 1]  # right after its plain row: the same chunk, the same machine speed
        assert plain.kind == "layer" and not plain.context and plain.precision == t.precision
        assert t.signature == cache_signature(plain.signature, context_id(cache.model, t.precision))
        assert set(t.fqns) <= fqns and t.context_artifact == cache.artifacts[t.precision]
        assert '"model_cache"' in t.description and "in the model's cache" in t.label
    assert len({(j.kind, j.signature, j.precision, j.src_precision) for j in jobs}) == len(jobs)
    assert plan_jobs(profiling_specs(specs, edges, target), edges, target) == [j for j in jobs if not j.context]


def test_a_target_that_cannot_run_whole_models_is_refused(tmp_path):
    model, x, specs, edges = _tiny()
    with pytest.raises(ValueError, match="--model-cache"):
        prepare(model, x, specs, edges, FakeTarget(), str(tmp_path))


@pytest.mark.slow
def test_profiled_twins_replace_the_rows_of_the_table_and_validate_reports_them(tiny_ort, tmp_path):
    """Real ORT: the uniform plans are exported, every layer row of the model gets a twin timed after
    the model ran; build_table(model_cache=True) reads the twins; validate prices the plans both ways."""
    t = tiny_ort
    cfg = MeasureConfig(warmup=2, repeat=9)
    t.profile(cfg)
    plain = build_table(t.store, t.specs, t.edges, cfg, t.target)
    with pytest.warns(UserWarning, match="no twin timed in the model's cache"):
        np.testing.assert_allclose(build_table(t.store, t.specs, t.edges, cfg, t.target, model_cache=True).layer_ms,
                                   plain.layer_ms)
    assert validate(t.store, t.model, t.x, 1, cfg, target=t.target).cache_mape_pct is None
    cache = prepare(t.model, t.x, t.specs, t.edges, t.target, str(tmp_path / "uniform"))
    assert set(cache.artifacts) == set(uniform_plans(t.specs, t.target)) == set(plain.candidates)
    report = profile(profiling_specs(t.specs, t.edges, t.target), t.edges, t.target, t.store, cfg, progress=False,
                     model_cache=cache)
    assert report.complete and report.failed == 0
    n_twins = sum(len(t.target.precisions.for_layer(s)) for s in {s.signature: s for s in t.specs}.values())
    assert report.measured == n_twins  # the plain rows were kept; only the twins were measured
    table = build_table(t.store, t.specs, t.edges, cfg, t.target, model_cache=True)
    overhead = t.store.get("overhead", "overhead", FP32, cfg).quoted_ms(cfg.statistic)
    for i, s in enumerate(t.specs):
        for j, p in enumerate(table.candidates):
            if p in t.target.precisions.for_layer(s):
                twin = t.store.get("layer", cache_signature(s.signature, context_id(cache.model, p)), p, cfg)
                assert twin.ok and table.layer_ms[i, j] == pytest.approx(max(twin.quoted_ms("p10") - overhead, 0))
    for (i, j, a), (k, m, b) in zip(table.transitions, plain.transitions, strict=True):  # transitions unchanged
        assert (i, j) == (k, m) and np.array_equal(a, b)
    val = validate(t.store, t.model, t.x, 2, cfg, target=t.target)
    assert val.cache_mape_pct is not None and "model's cache state" in format_report(val)
    for r in val.plans:  # the main prediction is the default table's; the one with the twins beside it
        plan = BitPlan.from_dict({f: Precision.parse(r.plan[f]) for f in table.fqns})
        assert r.predicted_ms == pytest.approx(plain.predict(plan)[0])
        assert r.predicted_cache_ms == pytest.approx(table.predict(plan)[0])


@pytest.mark.slow
def test_profile_cli_times_the_twins_with_model_cache(tmp_path):
    import typer
    from hwmpq.lut.cli import lut_app
    from hwmpq.lut.store import LutStore
    from hwmpq.profilers.cli import register
    from typer.testing import CliRunner

    app = typer.Typer()
    register(app)
    app.add_typer(lut_app, name="lut")
    lut = str(tmp_path / "cache.lut")
    args = ["profile", "--target", "ort-x86", "--model", "test_tiny", "--lut", lut, "--warmup", "1", "--repeat", "5",
            "--rounds", "1", "--quiet"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    with LutStore.read(lut) as store:
        plain = len(store.measurements("layer"))
    res = CliRunner().invoke(app, [*args, "--model-cache"])  # resumes: only the twins are measured
    assert res.exit_code == 0, res.output
    _, _, specs, _ = _tiny()
    target = OrtTarget(threads=1)
    with LutStore.read(lut) as store:
        rows = store.measurements("layer")
        twins = sum(len(target.precisions.for_layer(s)) for s in {s.signature: s for s in specs}.values())
        assert len(rows) == plain + twins and all(m.ok for m in rows)
    shown = CliRunner().invoke(app, ["lut", "show", lut], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "in model cache fp32" in shown.output, shown.output
    fake = CliRunner().invoke(app, ["profile", "--target", "fake", "--model", "test_tiny", "--lut",
                                    str(tmp_path / "fake.lut"), "--quiet", "--model-cache"])
    assert fake.exit_code == 2 and "--model-cache" in fake.output, fake.output
