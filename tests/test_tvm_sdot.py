"""The sdot int8 kernel (targets/tvm/sdot.py) without an ARM CPU: weight packing, the uint8 -> int8 shift
with its bias correction (numpy), and the same TE computation untensorized on this CPU (real TVM build)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hwmpq.targets.tvm import layers as L
from hwmpq.targets.tvm import sdot
from hwmpq.targets.tvm.presets import PRESETS

from hwmpq.records import W8A8, LayerSpec

SPECS = [
    LayerSpec("conv3x3", "conv", 16, 16, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8)),
    LayerSpec("conv3x3_s2_odd", "conv", 6, 10, (3, 3), (2, 2), (1, 1), in_hw=(7, 7), out_hw=(4, 4), batch=2),
    LayerSpec("conv1x1", "conv", 32, 8, (1, 1), in_hw=(5, 5), out_hw=(5, 5)),
    LayerSpec("stem_c1", "conv", 1, 8, (3, 3), (1, 1), (1, 1), in_hw=(6, 6), out_hw=(6, 6)),
    LayerSpec("dilated", "conv", 8, 8, (3, 3), (1, 1), (2, 2), (2, 2), in_hw=(7, 7), out_hw=(7, 7)),
    LayerSpec("linear", "linear", 24, 10, batch=3),
]
IDS = [s.fqn for s in SPECS]


def _params(spec: LayerSpec, signed: bool):
    p = replace(L.random_int_params(spec, W8A8, seed=2), in_signed=signed)
    return p, L.int_input(spec, p, seed=3)


def _requantize_np(acc: np.ndarray, p) -> np.ndarray:
    import torch

    f = torch.from_numpy(acc.astype(np.int32)).float() * torch.from_numpy(p.multiplier)
    lo, hi = p.out_range
    return torch.clamp(torch.round(f), lo, hi).to(torch.int8).numpy()


def test_pack_weights_layout_and_zero_padding():
    w = np.random.default_rng(0).integers(-127, 128, (10, 6, 3, 2)).astype(np.int8)
    wp = sdot.pack_weights(w)
    assert wp.shape == (3, 3, 2, 2, 4, 4) and wp.dtype == np.int8
    for o, c, r, s in [(0, 0, 0, 0), (9, 5, 2, 1), (5, 3, 1, 0), (7, 4, 2, 1)]:
        assert wp[o // 4, r, s, c // 4, o % 4, c % 4] == w[o, c, r, s]
    assert not wp[2, :, :, :, 2:].any() and not wp[:, :, :, 1, :, 2:].any()  # O 10 -> 12, C 6 -> 8: zeros
    assert sdot.pack_weights(w[:, :, 0, 0]).shape == (3, 1, 1, 2, 4, 4)  # linear


def test_shifted_bias_makes_the_shift_exact_and_refuses_int32_overflow():
    w = np.array([[127, -3, 5, 0], [-127, -127, -127, -127]], np.int8)
    x = np.array([0, 255, 17, 128], np.int64)
    bias = np.array([7, -2**31 + 128 * 508], np.int32)
    np.testing.assert_array_equal((x - 128) @ w.T.astype(np.int64) + sdot.shifted_bias(w, bias),
                                  x @ w.T.astype(np.int64) + bias)
    with pytest.raises(ValueError, match="overflows int32"):
        sdot.shifted_bias(w, np.array([2**31 - 1, 0], np.int32))


@pytest.mark.parametrize("signed", [False, True], ids=["uint8-in", "int8-in"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_packed_shifted_model_equals_the_integer_reference(spec, signed):
    p, x = _params(spec, signed)
    np.testing.assert_array_equal(_requantize_np(sdot.reference_acc(x, spec, p), p),
                                  L.reference_int_layer(x, spec, p))


def test_which_layers_and_presets_use_sdot():
    assert [n for n, pr in PRESETS.items() if pr.dotprod] == ["arm-a76-dotprod"]
    dw = LayerSpec("dw", "dwconv", 8, 8, (3, 3), (1, 1), (1, 1), groups=8, in_hw=(5, 5), out_hw=(5, 5))
    grouped = LayerSpec("g", "conv", 8, 8, (3, 3), groups=2, in_hw=(5, 5), out_hw=(3, 3))
    assert all(L.uses_sdot(s, True) for s in SPECS) and not any(L.uses_sdot(s, False) for s in SPECS)
    assert not L.uses_sdot(dw, True) and not L.uses_sdot(grouped, True)


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.parametrize("spec", [SPECS[1], SPECS[3], SPECS[5]], ids=[IDS[1], IDS[3], IDS[5]])
def test_untensorized_kernel_is_exact_on_this_cpu(spec):
    """Same TE compute, packing, padding and shift as on ARM, minus the sdot intrinsic (x86 has none)."""
    tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")
    for signed in (False, True):
        p, x = _params(spec, signed)

        def emit(bb, v, p=p):
            acc, bias = sdot.emit_acc(bb, v, spec, p, tensorize=False)
            return L._requantize(bb, acc, replace(p, bias_i32=bias))

        ex = tvm.compile(L._wrap(emit, x), "llvm")
        out = tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        ref = L.reference_int_layer(x, spec, p)
        np.testing.assert_array_equal(out, ref)
        assert len(np.unique(ref)) > 2
