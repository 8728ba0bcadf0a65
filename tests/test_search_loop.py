"""The closed loop with the real ort-x86 target: profile -> search -> QAT -> export -> measure, and the
loop's refusals (missing LUT entries, a LUT of another device, an infeasible budget) through the CLI."""

import json

import pytest
from typer.testing import CliRunner

from hwmpq.records import load_plan
from hwmpq.search.loop import LoopConfig, prepare, run_loop

TINY_SEARCH = {"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "limit_batches": 2}


def cfg(tmp_path, **kw):
    base = dict(method="ssps", model="test_tiny", data="digits", target="ort-x86", lut=str(tmp_path / "lut.sqlite"),
                warmup=1, repeat=3, budget="1.0x", search=dict(TINY_SEARCH), finetune_epochs=1,
                finetune_limit_batches=2, out=str(tmp_path / "plan.json"), progress=False)
    base.update(kw)
    return LoopConfig(**base)


def test_missing_lut_entries_name_the_layers_and_offer_profiling(tmp_path):
    from hwmpq.lut.model import MissingEntriesError

    with pytest.raises(MissingEntriesError, match=r"conv1.*--profile-missing"):
        prepare(cfg(tmp_path))


def test_lut_of_another_device_is_refused(tmp_path):
    from hwmpq.lut.store import ForeignLutError, LutStore
    from hwmpq.targets.base import DeviceInfo

    LutStore.open(tmp_path / "lut.sqlite", target="ort-x86", device=DeviceInfo("some-other-machine")).close()
    with pytest.raises(ForeignLutError, match="not measured here"):
        prepare(cfg(tmp_path, profile_missing=True))


@pytest.mark.slow
def test_closed_loop_on_ort_x86(tmp_path):
    rows = run_loop(cfg(tmp_path, profile_missing=True, baselines=("8",)))
    main, uni = rows
    assert main["method"] == "ssps" and uni["method"] == "uniform w8a8"
    assert main["predicted_ms"] <= main["budget_ms"] + 1e-9
    for r in rows:
        assert r["measured_ms"] is not None and r["measured_ms"] > 0
        assert 0.0 <= r["test_acc"] <= 1.0
    plan = load_plan(tmp_path / "plan.json")
    assert len(plan) == 5
    assert (tmp_path / "plan_export" / "model.onnx").is_file()
    report = json.loads((tmp_path / "plan.report.json").read_text())
    assert len(report["rows"]) == 2
    trace = json.loads((tmp_path / "plan.trace.json").read_text())
    assert len(trace["fixing_order"]) == 5


def test_cli_refuses_infeasible_budget_before_training(tmp_path, monkeypatch):
    """Through `hwmpq search`: exit code 2, the smallest reachable latency in the message, no plan written.
    The LUT is a hand table for test_tiny's layers (a measured LUT of a model this small is noise-dominated:
    its transition terms T_e = C(a,b) - (C(a,a)+C(b,b))/2 carry timing noise and its cheapest plan can even
    predict a negative latency)."""
    import numpy as np

    from hwmpq.cli import _register, app
    from hwmpq.lut.table import LatencyTable
    from hwmpq.records import FP32, Precision
    from hwmpq.search import loop

    def hand_table(cfg, model, x, target, measure):
        fq = ("conv1", "conv2", "dw", "pw", "fc")
        lat = np.tile([1.0, 0.5], (5, 1))
        return LatencyTable(fq, (FP32, Precision(8, 8)), lat, lat / 10, (), 0.5, target="ort-x86")

    monkeypatch.setattr(loop, "load_table", hand_table)
    _register()
    res = CliRunner().invoke(app, ["search", "--model", "test_tiny", "--data", "digits", "--lut",
                                   str(tmp_path / "lut.sqlite"), "--budget-ms", "2.9", "--out",
                                   str(tmp_path / "p2.json"), "--quiet"])
    assert res.exit_code == 2, res.output
    assert "infeasible" in res.output and "raise the budget to at least 3 ms" in res.output
    assert not (tmp_path / "p2.json").exists()


def test_search_stat_assist_runs_the_float_warm_up_before_the_fine_tune(tmp_path, monkeypatch):
    """FrostNet's StatAssist from the search (--stat-assist): the plan's float model is trained before it is
    quantized (the real warm-up runs; the spy only records that it did, and on which model)."""
    import hwmpq.frost as frost

    seen = []
    real = frost.float_warmup

    def spy(model, splits, epochs, **kw):
        seen.append((epochs, any("quant" in n for n, _ in model.named_modules())))
        return real(model, splits, epochs, **kw)

    monkeypatch.setattr(frost, "float_warmup", spy)
    rows = run_loop(cfg(tmp_path, method="uniform", target="fake", profile_missing=True, qat={"stat_assist": True},
                        search={"bits": "8"}))
    assert seen and seen[0][0] >= 1 and seen[0][1] is False  # a float model, at least one epoch
    assert rows[0]["test_acc"] is not None


@pytest.mark.parametrize("flags,expected", [
    ([], [(1, "tensor")]),
    (["--stat-assist"], [(1, None), (1, "tensor")]),
], ids=["plain", "stat-assist"])
def test_cli_search_stat_assist_trains_the_float_model_before_the_quantized_fine_tune(tmp_path, monkeypatch,
                                                                                      flags, expected):
    """`hwmpq search --stat-assist` through the CLI: every training run is recorded with the placement of the
    model it trained. With the flag, a float epoch (StatAssist's warm-up) comes before the QAT epoch of the
    quantized plan; without it, only the QAT epoch runs."""
    import hwmpq.train as train
    from hwmpq.cli import _register, app
    from hwmpq.qmodules import placement_of

    runs, real = [], train.fit

    def spy(model, splits, **kw):
        runs.append((kw["epochs"], placement_of(model)))
        return real(model, splits, **kw)

    monkeypatch.setattr(train, "fit", spy)
    _register()
    res = CliRunner().invoke(app, ["search", "--method", "uniform", "--bits", "8", "--model", "test_tiny", "--data",
                                   "digits", "--target", "fake", "--lut", str(tmp_path / "lut.sqlite"),
                                   "--profile-missing", "--warmup", "1", "--repeat", "3", "--finetune-limit-batches",
                                   "2", "--out", str(tmp_path / "plan.json"), "--quiet", *flags])
    assert res.exit_code == 0, res.output
    assert runs == expected
    assert load_plan(tmp_path / "plan.json")
