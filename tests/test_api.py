"""The Python API (hwmpq/api.py): the README's "Python API" block run as it is written, each verb's argument
handling and refusals (on the deterministic fake target where no real timing is needed), and the lazy
top-level names (``import hwmpq`` and the CLI start without torch)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import hwmpq
from hwmpq.api import ProfileOptions, SearchOptions, as_splits
from hwmpq.records import MeasureConfig, RecordError
from hwmpq.search.base import BudgetError

REPO = Path(__file__).resolve().parents[1]
QUICK = MeasureConfig(warmup=0, repeat=3, rounds=1)  # the fake target's latency does not depend on it
TINY_SSPS = dict(epochs=2, warmup_epochs=1, batch_size=32, limit_batches=2)
X = torch.zeros(1, 1, 8, 8)
pytestmark = pytest.mark.filterwarnings("ignore:.*transition entries are not in the LUT")  # fake: no transitions


def readme_block() -> str:
    """The first ```python block under the README's "## Python API" heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return hwmpq.create_model("test_tiny")


@pytest.mark.slow
def test_readme_python_api_block_runs(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_block(), "README.md: Python API", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert re.search(r"predicted [\d.]+ ms, measured [\d.]+ ms, test acc [\d.]+", out), out
    assert (tmp_path / "cpu.lut").is_file() and (tmp_path / "export" / "model.onnx").is_file()


def test_import_hwmpq_and_its_cli_do_not_import_torch():
    code = "import sys, hwmpq, hwmpq.cli; hwmpq.MeasureConfig; assert 'torch' not in sys.modules, 'torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr


def test_lazy_names_resolve_and_search_is_both_package_and_verb():
    import hwmpq.search.loop  # noqa: F401 (a submodule import binds hwmpq.search to the package)
    from hwmpq.graph import analyse
    from hwmpq.search import SSPSConfig

    assert hwmpq.analyse is analyse and hwmpq.SSPSConfig is SSPSConfig
    assert callable(hwmpq.search) and hwmpq.search.SSPSConfig is SSPSConfig
    assert {"profile", "search", "export", "measure", "quantize_", "layer_graph"} <= set(hwmpq.__all__)
    with pytest.raises(AttributeError):
        hwmpq.no_such_name  # noqa: B018


def test_unknown_or_wrong_targets_are_refused(tmp_path):
    from hwmpq.targets import UnknownTargetError

    with pytest.raises(UnknownTargetError, match="unknown target 'nosuch'.*ort-x86"):
        hwmpq.profile(tiny(), X, target="nosuch", lut=tmp_path / "a.lut")
    with pytest.raises(UnknownTargetError, match="tvm-typo"):
        hwmpq.export(tiny(), hwmpq.BitPlan(()), target="tvm-typo", out=tmp_path / "e", example_input=X)
    with pytest.raises(TypeError, match="target must be a name"):
        hwmpq.profile(tiny(), X, target=object(), lut=tmp_path / "a.lut")
    assert not (tmp_path / "a.lut").exists()


def test_config_threads_must_match_a_target_object(tmp_path):
    from hwmpq.targets.fake import FakeTarget

    with pytest.raises(ValueError, match="threads=2"):
        hwmpq.profile(tiny(), X, target=FakeTarget(threads=1), lut=tmp_path / "a.lut",
                      config=MeasureConfig(threads=2))


def test_profile_builds_the_table_and_resumes_with_the_luts_protocol(tmp_path):
    lut = tmp_path / "fake.lut"
    quiet = ProfileOptions(progress=False)
    first = hwmpq.profile(tiny(), X, target="fake", lut=lut, config=QUICK, options=quiet)
    assert first.measured > 0 and first.kept == 0 and first.failed == 0 and first.table_error is None
    assert first.table.fqns == ("conv1", "conv2", "dw", "pw", "fc") and first.target == "fake"
    again = hwmpq.profile(tiny(), X, target="fake", lut=lut, options=quiet)  # config: the LUT's own
    assert again.config.key == QUICK.key and again.measured == 0 and again.kept == first.measured
    assert again.table.predict_indices([0] * 5) == first.table.predict_indices([0] * 5)


def test_a_foreign_lut_is_refused_unless_forced(tmp_path):
    from hwmpq.lut.store import ForeignLutError, LutStore
    from hwmpq.targets.base import DeviceInfo

    lut = tmp_path / "other.lut"
    LutStore.open(lut, target="fake", device=DeviceInfo("some-other-machine")).close()
    with pytest.raises(ForeignLutError, match="not measured here"):
        hwmpq.profile(tiny(), X, target="fake", lut=lut, config=QUICK, options=ProfileOptions(progress=False))
    with pytest.raises(ForeignLutError):
        hwmpq.search(tiny(), "digits", target="fake", lut=lut, budget="0.9x", config=QUICK,
                     options=SearchOptions(progress=False))
    with pytest.warns(UserWarning, match="using a foreign LUT"):
        forced = hwmpq.profile(tiny(), X, target="fake", lut=lut, config=QUICK,
                               options=ProfileOptions(progress=False, force=True))
    assert forced.measured > 0 and forced.table is not None


@pytest.mark.parametrize("budget, error, match", [
    ("fast", BudgetError, "expected e.g. 0.6x"), ("1.5range", BudgetError, r"\[0, 1\]"),
    ("-1ms", BudgetError, "positive"), (None, BudgetError, "give a budget"), (True, TypeError, "budget must be")])
def test_bad_budgets_are_refused_before_any_work(tmp_path, budget, error, match):
    lut = tmp_path / "never.lut"
    with pytest.raises(error, match=match):
        hwmpq.search(tiny(), "digits", target="fake", lut=lut, budget=budget, options=SearchOptions(progress=False))
    assert not lut.exists()


def test_unknown_methods_are_refused_before_any_work(tmp_path):
    lut = tmp_path / "never.lut"
    with pytest.raises(ValueError, match="use dnas, ssps"):
        hwmpq.search(tiny(), "digits", target="fake", lut=lut, budget="0.9x", method="annealing")
    with pytest.raises(TypeError, match="no search strategy for dict"):
        hwmpq.search(tiny(), "digits", target="fake", lut=lut, budget="0.9x", method={"epochs": 2})
    with pytest.raises(ValueError, match="unknown dataset"):
        hwmpq.search(tiny(), "no-such-data", target="fake", lut=lut, budget="0.9x")
    assert not lut.exists()


def test_dataloaders_become_splits(digits):
    x, y = digits.train.tensors
    one = as_splits(DataLoader(TensorDataset(x, y), batch_size=7))
    assert one.train is one.val is one.test and one.num_classes == 10 and one.input_shape == (1, 8, 8)
    two = as_splits((DataLoader(TensorDataset(x, y)), DataLoader(digits.val)))
    assert two.val is two.test is digits.val and len(two.train) == len(x)
    assert as_splits(digits) is digits

    class Stream(IterableDataset):
        def __iter__(self):
            yield x[0], y[0]

    with pytest.raises(ValueError, match="IterableDataset"):
        as_splits(DataLoader(Stream()))
    with pytest.raises(TypeError, match="data must be"):
        as_splits(42)


def test_search_on_a_dataloader_returns_a_tuned_model_in_the_targets_placement(tmp_path, digits, one_thread):
    from hwmpq.qmodules import placement_of
    from hwmpq.search.ssps import SSPSConfig

    loader = DataLoader(TensorDataset(*digits.train.tensors), batch_size=64, shuffle=True)
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = hwmpq.search(model, loader, target="fake", lut=tmp_path / "fake.lut", budget="0.9x", config=QUICK,
                         method=SSPSConfig(**TINY_SSPS),
                         options=SearchOptions(finetune_limit_batches=2, progress=False))
    assert len(found.plan) == 5 and found.predicted_ms <= found.budget.latency_ms + 1e-9
    assert placement_of(found.model) == "tensor" and 0.0 <= found.test_acc <= 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model untouched
    baseline = hwmpq.search(model, digits, target="fake", lut=found.lut, method="uniform",
                            options=SearchOptions(finetune_epochs=0, progress=False))
    assert {p.label for _, p in baseline.plan.layers} == {"w8a8"} and baseline.budget.latency_ms == float("inf")


def test_export_calibrates_a_float_model_with_a_warning_and_measure_reads_the_folder(tmp_path, one_thread):
    from hwmpq.qmodules import placement_of
    from hwmpq.records import BitPlan, Precision

    model = tiny().eval()
    plan = BitPlan.uniform(["conv1", "conv2", "dw", "pw", "fc"], Precision(8, 8))
    with pytest.raises(ValueError, match="give data"):
        hwmpq.export(model, plan, target="ort-x86", out=tmp_path / "e", example_input=X)
    with pytest.raises(RecordError):
        hwmpq.export(model, BitPlan.uniform(["conv1"], Precision(8, 8)), target="ort-x86",
                     out=tmp_path / "e", data="digits")
    with pytest.warns(UserWarning, match="calibrating its quantizers on one batch of digits"):
        done = hwmpq.export(model, plan, target="ort-x86", out=tmp_path / "e", data="digits")
    assert Path(done.artifact).is_file() and "conv1" in done.integer_layers
    assert placement_of(model) is None  # the caller's float model stays float
    timing = hwmpq.measure(tmp_path / "e", target="ort-x86", config=MeasureConfig(warmup=2, repeat=10))
    assert 0 < timing.p10_ms <= timing.median_ms <= timing.p90_ms and timing.n == len(timing.latencies_ms)
    with pytest.raises(FileNotFoundError, match="no exported model"):
        hwmpq.measure(tmp_path, target="ort-x86")
