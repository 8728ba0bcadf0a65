"""Post-training search (``hwmpq search --ptq``, hwmpq/search/ptq.py) on the real ort-x86 target: an ILP plan
from Hessian-trace sensitivities under the LUT budget, calibrated, never trained (no fit, no optimizer
step), exported and measured, with the top-1 agreement with the float model reported; unlabelled data
(an .npz without ``y``) gives agreement only; combinations that would train are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import hwmpq
from hwmpq.api import SearchOptions
from hwmpq.cli import _register, app
from hwmpq.records import load_plan

PROTOCOL = ["--warmup", "1", "--repeat", "3"]  # a small LUT repeat, as tests/test_search_loop.py cfg()


@pytest.fixture(scope="module")
def runner():
    _register()
    return CliRunner()


@pytest.fixture
def no_training(monkeypatch):
    """Records every call of hwmpq.train.fit and every optimizer step while the real search runs."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import hwmpq.train

    seen: list[str] = []
    real_fit = hwmpq.train.fit

    def fit_spy(*args, **kwargs):
        seen.append("fit")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(hwmpq.train, "fit", fit_spy)
    handle = register_optimizer_step_pre_hook(lambda opt, a, kw: seen.append("step"))
    yield seen
    handle.remove()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, _tiny_trained_state):
    """test_tiny's float weights trained on digits (the conftest fixture), as a --weights file."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(_tiny_trained_state, path)
    return str(path)


@pytest.fixture(scope="module")
def lut(tmp_path_factory):
    """test_tiny's LUT on ort-x86, profiled once for the module under the searches' protocol, and an energy
    budget halfway between uniform w8a8 and fp32: at 8x8 pixels fp32 is the fastest plan, so only an
    energy budget makes the ILP quantize."""
    from hwmpq.records import FP32, BitPlan, MeasureConfig, Precision
    from hwmpq.zoo import create_model

    path = tmp_path_factory.mktemp("lut") / "ort.lut"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        done = hwmpq.profile(create_model("test_tiny").eval(), torch.zeros(1, 1, 8, 8), target="ort-x86", lut=path,
                             config=MeasureConfig(warmup=1, repeat=3, threads=1))
    finally:
        torch.set_num_threads(threads)
    fqns = done.table.fqns
    mj = [done.table.predict(BitPlan.uniform(fqns, p))[1] for p in (FP32, Precision(8, 8))]
    return str(path), repr(sum(mj) / 2)


def search(runner, *args):
    """``hwmpq search`` of test_tiny on ort-x86 under the module's LUT protocol, with ``args``."""
    return runner.invoke(app, ["search", "--model", "test_tiny", "--target", "ort-x86", *PROTOCOL, "--quiet", *args])


def test_ptq_ilp_search_is_calibrated_not_trained_and_reports_agreement(runner, tmp_path, pretrained, lut,
                                                                        no_training, one_thread):
    path, budget_mj = lut
    out = tmp_path / "plan.json"
    res = search(runner, "--ptq", "--data", "digits", "--weights", pretrained, "--lut", path, "--profile-missing",
                 "--budget-mj", budget_mj, "--baseline", "8", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert no_training == [], "a --ptq search trained weights"
    main, uniform = json.loads(out.with_suffix(".report.json").read_text())["rows"]
    assert main["method"] == "ilp" and uniform["method"] == "uniform w8a8"
    assert main["predicted_mj"] <= main["budget_mj"] * (1 + 1e-9)
    plan = load_plan(out)
    assert len(plan) == 5 and any(not p.is_float for _, p in plan.layers)
    for row in (main, uniform):
        assert 0.0 <= row["agreement"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0
        assert row["measured_ms"] is not None and row["measured_ms"] > 0
    manifest = json.loads((tmp_path / "plan_export" / "manifest.json").read_text())
    assert (tmp_path / "plan_export" / "model.onnx").is_file() and manifest["agreement"] == main["agreement"]
    assert "agreement" in res.output and "post-training (--ptq)" in " ".join(res.output.split())


def test_ptq_on_unlabelled_npz_reports_agreement_only(runner, tmp_path, digits, pretrained, lut, no_training,
                                                      one_thread):
    """An .npz without ``y``: the ILP's traces use the float model's predictions as labels; no accuracy."""
    x = torch.cat([digits.train.tensors[0], digits.test.tensors[0]]).numpy()
    np.savez(tmp_path / "unlabelled.npz", x=x)
    path, budget_mj = lut
    out = tmp_path / "plan.json"
    res = search(runner, "--ptq", "--data", str(tmp_path / "unlabelled.npz"), "--weights", pretrained,
                 "--lut", path, "--budget-mj", budget_mj, "--out", str(out))
    assert res.exit_code == 0, res.output
    assert no_training == []
    report = json.loads(out.with_suffix(".report.json").read_text())
    (row,) = report["rows"]
    assert row["test_acc"] is None and 0.0 <= row["agreement"] <= 1.0 and report["float_test_acc"] is None
    text = " ".join(res.output.split())  # the table's title wraps
    assert "own top-1 predictions as labels" in text and "no accuracy, agreement only" in text
    refused = search(runner, "--data", str(tmp_path / "unlabelled.npz"), "--lut", path, "--budget", "0.5range",
                     "--out", str(tmp_path / "never.json"))
    assert refused.exit_code == 2 and "has no labels" in refused.output and "without --ptq" in refused.output


@pytest.mark.parametrize("flags, match", [
    (["--method", "ssps"], "--method ssps trains a supernet"), (["--method", "dnas"], "use --method ilp"),
    (["--sam"], "cannot be combined with --sam"), (["--stat-assist"], "--stat-assist"),
    (["--grad-boost"], "--grad-boost"), (["--finetune-epochs", "1"], "--finetune-epochs 1"),
    (["--calibration-batches", "0"], "must be >= 1")])
def test_ptq_refuses_what_would_train_before_any_work(runner, tmp_path, flags, match):
    res = search(runner, "--ptq", "--data", "digits", "--lut", str(tmp_path / "never.lut"), "--budget", "0.5range",
                 "--out", str(tmp_path / "plan.json"), *flags)
    assert res.exit_code == 2 and match in res.output, res.output
    assert not (tmp_path / "never.lut").exists()


def test_api_ptq_defaults_to_ilp_and_refuses_training(tmp_path, digits, tiny_trained, no_training, one_thread):
    from hwmpq.data import splits_from_datasets
    from hwmpq.qat_options import QATOptions
    from hwmpq.records import MeasureConfig

    lut = tmp_path / "fake.lut"
    with pytest.raises(ValueError, match="--method saq trains a supernet"):
        hwmpq.search(tiny_trained, digits, target="fake", lut=lut, budget="0.5range", method="saq",
                     options=SearchOptions(ptq=True))
    for opts in (SearchOptions(ptq=True, finetune_epochs=2), SearchOptions(ptq=True, qat=QATOptions(sam=True))):
        with pytest.raises(ValueError, match="cannot be combined"):
            hwmpq.search(tiny_trained, digits, target="fake", lut=lut, budget="0.5range", options=opts)
    assert not lut.exists()
    x, y = digits.test.tensors
    unlabelled = torch.utils.data.TensorDataset(digits.train.tensors[0], torch.full((len(digits.train),), -1))
    data = splits_from_datasets("train unlabelled", unlabelled, unlabelled, digits.test, num_classes=10)
    found = hwmpq.search(tiny_trained, data, target="fake", lut=lut, budget="0.5range",
                         config=MeasureConfig(warmup=0, repeat=3, rounds=1),
                         options=SearchOptions(ptq=True, progress=False))
    assert found.result.trace["method"] == "ilp" and found.predicted_ms <= found.budget.latency_ms + 1e-9
    assert 0.0 <= found.agreement <= 1.0 and 0.0 <= found.test_acc <= 1.0  # the test split is labelled
    assert no_training == []
