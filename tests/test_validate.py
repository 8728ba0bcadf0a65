"""``validate``: random plans exported and timed end to end in ORT against the LUT's prediction."""

import json

import pytest

from hwmpq.lut.model import MissingEntriesError
from hwmpq.lut.validate import format_report, random_plans, validate
from hwmpq.profilers.probes import SPEED_PROBES
from hwmpq.records import FP32, MeasureConfig

CFG = MeasureConfig(warmup=2, repeat=9)


@pytest.mark.slow
def test_validate_reports_predicted_and_measured_per_plan(tiny_ort, tmp_path):
    t = tiny_ort
    with pytest.raises(MissingEntriesError):  # nothing profiled: refused before exporting anything
        validate(t.store, t.model, t.x, 2, CFG, target=t.target)
    t.profile(CFG)
    out = tmp_path / "val.json"
    report = validate(t.store, t.model, t.x, 3, CFG, seed=1, json_out=str(out), target=t.target,
                      model_name="test_tiny")
    assert len(report.plans) == 3
    for r in report.plans:
        assert r.error_msg is None and r.measured_ms > 0 and r.predicted_ms > 0
        assert r.error_pct == pytest.approx((r.predicted_ms - r.measured_ms) / r.measured_ms * 100)
        assert set(r.plan) == {s.fqn for s in t.specs}
    errs = [abs(r.error_pct) for r in report.plans]
    assert report.mape_pct == pytest.approx(sum(errs) / 3) and report.worst_pct == pytest.approx(max(errs))
    # the speed probes were profiled with the model and timed again beside the plans; the gate's factor
    # is the slowest probe's
    for probe in SPEED_PROBES:
        assert t.store.get("layer", probe.signature, FP32, CFG).ok
    assert set(report.speed_factors) == {p.fqn for p in SPEED_PROBES} and report.speed_attempts >= 1
    assert report.speed_factor == max(report.speed_factors.values()) > 0
    for r in report.plans:
        scaled = r.predicted_ms * report.speed_factor
        assert r.speed_error_pct == pytest.approx((scaled - r.measured_ms) / r.measured_ms * 100)
    assert report.speed_mape_pct == pytest.approx(sum(abs(r.speed_error_pct) for r in report.plans) / 3)
    assert "speed probes" in format_report(report) and "speed_reference_memory" in format_report(report)
    saved = json.loads(out.read_text())
    assert saved["model"] == "test_tiny" and len(saved["plans"]) == 3 and saved["config"]["repeat"] == 9
    assert "MAPE" in format_report(report)
    with pytest.raises(ValueError, match="n_plans"):
        validate(t.store, t.model, t.x, 0, CFG, target=t.target)


def test_random_plans_only_use_allowed_precisions_and_are_seeded():
    import numpy as np

    from hwmpq.lut.table import LatencyTable
    from hwmpq.records import FP32, Precision

    cands = (Precision(4, 32), Precision(8, 8), FP32)
    lat = np.array([[np.inf, 1.0, 2.0], [0.5, 1.0, 2.0]])
    table = LatencyTable(("conv", "fc"), cands, lat, np.zeros_like(lat))
    plans = random_plans(table, 20, seed=3)
    assert all(p["conv"] != Precision(4, 32) for p in plans)
    assert {p["fc"] for p in plans} == set(cands)
    assert [p.layers for p in plans] == [p.layers for p in random_plans(table, 20, seed=3)]
