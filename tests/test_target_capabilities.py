"""What each target declares it can do, as data: offered and emulated precisions, and its capabilities."""

from __future__ import annotations

import dataclasses

import pytest

from hwmpq.records import FP32, BitPlan, MeasureConfig, Precision
from hwmpq.targets import get_target
from hwmpq.targets.base import (
    CAPABILITY_PROTOCOLS,
    Capabilities,
    ExportResult,
    Target,
    TargetPrecisions,
    check_capabilities,
)
from hwmpq.targets.fake import FakeTarget

W8A8, W4A8, W16A16, W4A32 = Precision(8, 8), Precision(4, 8), Precision(16, 16), Precision(4, 32)


def test_ort_emulates_w4a8_and_w16a16_only():
    pytest.importorskip("onnxruntime")
    precisions = get_target("ort-x86").precisions
    assert set(precisions.emulated) == {W4A8, W16A16}
    assert W4A32 in precisions.linear and W4A32 not in precisions.emulated  # MatMulNBits is a real kernel
    assert set(precisions.native) == {FP32, W8A8, W4A32}
    for kind in ("conv", "dwconv", "linear"):  # every emulated precision is offered for every op kind
        assert set(precisions.emulated) <= set(precisions.for_kind(kind))


def test_fake_and_tvm_emulate_nothing():
    assert get_target("fake").precisions.emulated == ()
    from hwmpq.targets.tvm.presets import get_preset

    assert get_preset("host").precisions.emulated == ()
    assert get_preset("arm-a72").precisions.emulated == ()


def test_emulated_must_be_offered():
    with pytest.raises(ValueError, match="w4a8"):
        TargetPrecisions(conv=(FP32, W8A8), dwconv=(FP32,), linear=(FP32,), emulated=(W4A8,))


# ------------------------------------------------------------------ capabilities


def _targets():
    out = [get_target("fake")]
    try:
        out.append(get_target("ort-x86"))
    except ImportError:
        pass
    return out


def test_each_target_declares_its_capabilities_and_implements_them():
    expected = {
        "fake": Capabilities(),
        "ort-x86": Capabilities(transitions=True, pairs=True, overhead=True, energy=True, kernel_trace=True,
                                export=True, measure_artifact=True, cleanup=True),
    }
    for target in _targets():
        assert isinstance(target, Target) and target.threads == 1
        assert target.capabilities == expected[target.id]
        check_capabilities(target)
        for name, proto in CAPABILITY_PROTOCOLS.items():  # a declared capability has its methods
            assert not getattr(target.capabilities, name) or isinstance(target, proto)


def test_tvm_declares_transitions_overhead_and_whole_models():
    pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")
    target = get_target("tvm:host")
    assert target.capabilities == Capabilities(transitions=True, overhead=True, export=True, measure_artifact=True)
    check_capabilities(target)


def test_a_capability_without_its_methods_is_refused():
    class Claims(FakeTarget):
        capabilities = Capabilities(pairs=True, export=True)

    with pytest.raises(TypeError, match=r"\['pairs', 'export'\].*PairBuilder, Exporter"):
        check_capabilities(Claims())
    with pytest.raises(TypeError, match="must be a Capabilities"):
        check_capabilities(type("Odd", (FakeTarget,), {"capabilities": {"pairs": True}})())


def test_a_switched_off_capability_is_not_used(resnet_graph):
    """The profile plan and the kernels-in-context profile read the record, not the methods."""
    pytest.importorskip("onnxruntime")
    from hwmpq.profilers.context import profile_context
    from hwmpq.profilers.jobs import plan_jobs

    specs, edges = resnet_graph
    ort = get_target("ort-x86")
    kinds = {j.kind for j in plan_jobs(specs, edges, ort)}
    assert kinds == {"overhead", "layer", "transition"}
    ort.capabilities = dataclasses.replace(ort.capabilities, transitions=False, overhead=False)
    assert {j.kind for j in plan_jobs(specs, edges, ort)} == {"layer"}
    ort.capabilities = dataclasses.replace(ort.capabilities, kernel_trace=False)
    assert profile_context(None, None, specs, edges, ort, None, MeasureConfig()) == 0  # returns before any use
    assert get_target("ort-x86").capabilities.transitions  # the class's record is untouched


def test_export_and_measure_are_refused_without_the_capability(tmp_path):
    pytest.importorskip("onnxruntime")
    from torch import nn

    import hwmpq

    ort = get_target("ort-x86")
    ort.capabilities = dataclasses.replace(ort.capabilities, export=False, measure_artifact=False)
    with pytest.raises(ValueError, match="has no exporter"):
        hwmpq.export(nn.Linear(4, 2), BitPlan((("weight", FP32),)), target=ort, out=str(tmp_path))
    with pytest.raises(ValueError, match="cannot time whole models"):
        hwmpq.measure(ExportResult(str(tmp_path), str(tmp_path / "model.onnx"), str(tmp_path / "manifest.json")),
                      target=ort)


@pytest.fixture(scope="module")
def resnet_graph():
    import torch

    from hwmpq.graph import analyse
    from hwmpq.zoo import create_model

    return analyse(create_model("resnet20").eval(), torch.zeros(1, 3, 32, 32))
