"""``validate``: random plans exported and timed end to end in ORT against the LUT's prediction."""

import json

import pytest
import torch
from hwmpq.lut.model import MissingEntriesError, edges_through_merges, profiling_specs
from hwmpq.lut.store import LutStore
from hwmpq.lut.validate import format_report, random_plans, validate
from hwmpq.targets.ort.target import OrtTarget

from hwmpq.graph import analyse
from hwmpq.records import MeasureConfig
from hwmpq.zoo import create_model

CFG = MeasureConfig(warmup=2, repeat=9)


@pytest.mark.slow
def test_validate_reports_predicted_and_measured_per_plan(tmp_path):
    from hwmpq.profilers.runner import profile

    model = create_model("test_tiny").eval()
    x = torch.zeros(1, 1, 8, 8)
    specs, _ = analyse(model, x)
    edges = edges_through_merges(model, x)
    target = OrtTarget(threads=1)
    store = LutStore.open(tmp_path / "ort.lut", target=target.id, device=target.device())
    with pytest.raises(MissingEntriesError):  # nothing profiled: refused before exporting anything
        validate(store, model, x, 2, CFG, target=target)
    profile(profiling_specs(specs, edges, target), edges, target, store, CFG, progress=False)
    out = tmp_path / "val.json"
    report = validate(store, model, x, 3, CFG, seed=1, json_out=str(out), target=target, model_name="test_tiny")
    assert len(report.plans) == 3
    for r in report.plans:
        assert r.error_msg is None and r.measured_ms > 0 and r.predicted_ms > 0
        assert r.error_pct == pytest.approx((r.predicted_ms - r.measured_ms) / r.measured_ms * 100)
        assert set(r.plan) == {s.fqn for s in specs}
    errs = [abs(r.error_pct) for r in report.plans]
    assert report.mape_pct == pytest.approx(sum(errs) / 3) and report.worst_pct == pytest.approx(max(errs))
    saved = json.loads(out.read_text())
    assert saved["model"] == "test_tiny" and len(saved["plans"]) == 3 and saved["config"]["repeat"] == 9
    assert "MAPE" in format_report(report)
    with pytest.raises(ValueError, match="n_plans"):
        validate(store, model, x, 0, CFG, target=target)
    store.close()
    target.cleanup()


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
