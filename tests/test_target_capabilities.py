"""What each target declares it can do, as data: offered and emulated precisions."""

from __future__ import annotations

import pytest
from hwmpq.targets import get_target
from hwmpq.targets.base import TargetPrecisions

from hwmpq.records import FP32, Precision

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
