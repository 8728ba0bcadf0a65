"""The int8 dot-product kernel (targets/tvm/dotconv.py): weight packing, the input shift with its bias
correction (numpy), the sdot computation untensorized on this CPU, and the VNNI kernel tensorized and
run on this CPU at several register tiles (real TVM builds). sdot itself runs in test_tvm_arm.py (qemu)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hwmpq.records import W8A8, LayerSpec
from hwmpq.targets.tvm import dotconv
from hwmpq.targets.tvm import layers as L
from hwmpq.targets.tvm.dot_intrin import SDOT, VNNI
from hwmpq.targets.tvm.presets import PRESETS

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
    return torch.clamp(torch.round(f), lo, hi).numpy().astype(p.out_dtype)


def test_pack_weights_layout_and_zero_padding():
    w = np.random.default_rng(0).integers(-127, 128, (10, 6, 3, 2)).astype(np.int8)
    wp = dotconv.pack_weights(w, SDOT.lanes)
    assert wp.shape == (3, 3, 2, 2, 4, 4) and wp.dtype == np.int8
    for o, c, r, s in [(0, 0, 0, 0), (9, 5, 2, 1), (5, 3, 1, 0), (7, 4, 2, 1)]:
        assert wp[o // 4, r, s, c // 4, o % 4, c % 4] == w[o, c, r, s]
    assert not wp[2, :, :, :, 2:].any() and not wp[:, :, :, 1, :, 2:].any()  # O 10 -> 12, C 6 -> 8: zeros
    assert dotconv.pack_weights(w[:, :, 0, 0]).shape == (3, 1, 1, 2, 4, 4)  # linear
    wv = dotconv.pack_weights(w, VNNI.lanes)  # 16 lanes: O 10 -> 16
    assert wv.shape == (1, 3, 2, 2, 16, 4) and wv[0, 2, 1, 1, 9, 1] == w[9, 5, 2, 1] and not wv[0, ..., 10:, :].any()


def test_shifted_bias_makes_the_shift_exact_and_refuses_int32_overflow():
    w = np.array([[127, -3, 5, 0], [-127, -127, -127, -127]], np.int8)
    x = np.array([0, 255, 17, 128], np.int64)
    bias = np.array([7, -2**31 + 128 * 508], np.int32)
    np.testing.assert_array_equal((x - 128) @ w.T.astype(np.int64) + dotconv.shifted_bias(w, bias),
                                  x @ w.T.astype(np.int64) + bias)
    with pytest.raises(ValueError, match="overflows int32"):
        dotconv.shifted_bias(w, np.array([2**31 - 1, 0], np.int32))
    x8 = np.array([-128, 127, 17, 0], np.int64)  # VNNI takes uint8: int8 codes shift by +128
    np.testing.assert_array_equal((x8 + 128) @ w.T.astype(np.int64) + dotconv.shifted_bias(w, bias, 128),
                                  x8 @ w.T.astype(np.int64) + bias)


@pytest.mark.parametrize("intrin", [SDOT, VNNI], ids=["sdot", "vnni"])
@pytest.mark.parametrize("signed", [False, True], ids=["uint8-in", "int8-in"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_packed_shifted_model_equals_the_integer_reference(spec, signed, intrin):
    p, x = _params(spec, signed)
    np.testing.assert_array_equal(_requantize_np(dotconv.reference_acc(x, spec, p, intrin), p),
                                  L.reference_int_layer(x, spec, p))


def test_which_layers_and_presets_use_sdot():
    assert [n for n, pr in PRESETS.items() if pr.dotprod] == ["arm-a76-dotprod"]
    dw = LayerSpec("dw", "dwconv", 8, 8, (3, 3), (1, 1), (1, 1), groups=8, in_hw=(5, 5), out_hw=(5, 5))
    grouped = LayerSpec("g", "conv", 8, 8, (3, 3), groups=2, in_hw=(5, 5), out_hw=(3, 3))
    assert all(L.uses_dot_kernel(s, SDOT) for s in SPECS) and not any(L.uses_dot_kernel(s, None) for s in SPECS)
    assert not L.uses_dot_kernel(dw, SDOT) and not L.uses_dot_kernel(grouped, VNNI)
    assert PRESETS["arm-a76-dotprod"].dot_intrin() is SDOT and PRESETS["arm-a72"].dot_intrin() is None


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.parametrize("spec", [SPECS[1], SPECS[3], SPECS[5]], ids=[IDS[1], IDS[3], IDS[5]])
def test_untensorized_kernel_is_exact_on_this_cpu(spec):
    """Same TE compute, packing, padding and shift as on ARM, minus the sdot intrinsic (x86 has none)."""
    tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")
    for signed in (False, True):
        p, x = _params(spec, signed)

        def emit(bb, v, p=p):
            return dotconv.emit_int8(bb, v, spec, p, SDOT, tensorize=False)

        ex = tvm.compile(L._wrap(emit, x), "llvm")
        out = tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        ref = L.reference_int_layer(x, spec, p)
        np.testing.assert_array_equal(out, ref)
        assert len(np.unique(ref)) > 2


def _has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512_vnni", "avx512bw"} <= set(flags)


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.skipif(not _has_vnni(), reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("spec", SPECS + [LayerSpec("wide", "conv", 40, 48, (3, 3), (1, 1), (1, 1), in_hw=(6, 6),
                                                    out_hw=(6, 6))], ids=IDS + ["wide"])
def test_vnni_kernel_is_exact_on_this_cpu_at_every_tile(spec):
    """The tensorized vpdpbusd kernel, requantize fused, at each candidate register tile, equals the
    integer reference (uint8 codes as they are, int8 codes shifted)."""
    tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")
    from hwmpq.targets.tvm.presets import get_preset, tvm_target

    target = tvm_target(get_preset("host"))
    assert get_preset("host").dot_intrin() is VNNI
    for signed in (False, True):
        p, x = _params(spec, signed)
        wl = dotconv.workload_of(spec, p, VNNI, list(x.shape))
        ref = L.reference_int_layer(x, spec, p)
        args = [x, dotconv.pack_weights(p.w_q, VNNI.lanes),
                dotconv.shifted_bias(p.w_q, p.bias_i32, dotconv.input_shift(VNNI, p.in_dtype)), p.multiplier]
        tiles = dotconv.candidate_tiles(wl, VNNI)
        for t in tiles[:2] + tiles[-1:]:
            lib = tvm.compile(tvm.IRModule({"main": dotconv.kernel_primfunc(wl, VNNI, t)}), target)
            out = tvm.runtime.tensor(np.zeros(ref.shape, ref.dtype))
            lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
            np.testing.assert_array_equal(out.numpy(), ref, err_msg=f"{spec.fqn} {t} signed={signed}")
        assert len(np.unique(ref)) > 2
