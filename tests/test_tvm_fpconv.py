"""The fp32 tiled kernel (targets/tvm/fpconv.py): weight packing, outputs against torch's fp32 conv at
several register tiles and loop orders (real TVM builds on this CPU), the compile-time lowering of the
Relax float layers to it (fp_lowering.py), and its tile tuning database (fp_tuning.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")

import torch  # noqa: E402

from hwmpq.records import FP32, LayerSpec  # noqa: E402
from hwmpq.targets.tvm import fp_tuning, fpconv  # noqa: E402
from hwmpq.targets.tvm import layers as L  # noqa: E402
from hwmpq.targets.tvm.fp_lowering import lower_float_layers  # noqa: E402
from hwmpq.targets.tvm.presets import get_preset, tvm_target  # noqa: E402
from hwmpq.targets.tvm.target import TvmTarget  # noqa: E402

pytestmark = pytest.mark.tvm
KERNEL = get_preset("host").fp_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="this CPU has no AVX-512: tvm:host keeps the Relax fp32 ops")
SPECS = [
    LayerSpec("conv3x3", "conv", 32, 32, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8)),
    LayerSpec("stem7x7s2", "conv", 3, 16, (7, 7), (2, 2), (3, 3), in_hw=(12, 12), out_hw=(6, 6)),
    LayerSpec("s2_odd_o", "conv", 20, 24, (3, 3), (2, 2), (1, 1), in_hw=(7, 7), out_hw=(4, 4), batch=2),
    LayerSpec("pw_nobias", "conv", 16, 32, (1, 1), in_hw=(5, 5), out_hw=(5, 5), bias=False),
    LayerSpec("dilated", "conv", 16, 16, (3, 3), (1, 1), (2, 2), (2, 2), in_hw=(7, 7), out_hw=(7, 7)),
    LayerSpec("linear", "linear", 40, 10, batch=3),
]


def test_pack_weights_layout_and_zero_padding():
    w = np.random.default_rng(0).normal(size=(20, 35, 3, 2)).astype(np.float32)
    wp = fpconv.pack_weights(w, 16)  # [O/16, C/16, KH, KW, 16, 16], O 20 -> 32, C 35 -> 48
    assert wp.shape == (2, 3, 3, 2, 16, 16)
    for o, c, r, s in [(0, 0, 0, 0), (19, 34, 2, 1), (7, 17, 1, 0)]:
        assert wp[o // 16, c // 16, r, s, c % 16, o % 16] == w[o, c, r, s]
    assert not wp[1, :, :, :, :, 4:].any() and not wp[:, 2, :, :, 3:].any()
    assert fpconv.pack_weights(w[:3, :3], 16).shape == (1, 1, 3, 2, 3, 16)  # C < 16: one block of C


def _run_kernel(wl, tiles, args):
    lib = tvm.compile(tvm.IRModule({"main": fpconv.kernel_primfunc(wl, tiles)}), tvm_target(get_preset("host")))
    dev = tvm.cpu()
    tensors = [tvm.runtime.tensor(a, device=dev) for a in args]
    lib.jit()(*tensors)
    return tensors[-1].numpy()


@needs_kernel
@pytest.mark.parametrize("spec", SPECS, ids=[s.fqn for s in SPECS])
def test_kernel_matches_torch_at_several_tiles(spec):
    wl = fpconv.workload_of(spec, list(spec.input_shape), KERNEL.lanes, spec.bias, relu=spec.fqn == "conv3x3")
    args = fp_tuning.kernel_args(wl, seed=1)
    rng = np.random.default_rng(1)  # kernel_args' draws, to rebuild the unpacked weights
    rng.normal(0, 1, args[0].shape)
    w = rng.normal(0, 0.1, (wl.o, wl.c, *wl.kernel)).astype(np.float32)
    xt, wt = torch.from_numpy(args[0]).double(), torch.from_numpy(w).double()
    bt = torch.from_numpy(args[2]).double() if wl.bias else None
    if wl.linear:
        ref = xt @ wt[:, :, 0, 0].T + (bt if bt is not None else 0)
    else:
        ref = torch.nn.functional.conv2d(xt, wt, bt, wl.stride, wl.padding, wl.dilation)
    ref = (ref.clamp(min=0) if wl.relu else ref).numpy()
    cands = fpconv.candidate_tiles(wl)
    picked = {cands[0], cands[-1], *[t for t in cands if t.tile_w > 1 and t.tile_o > 1][:2]}
    for tiles in picked:
        out = _run_kernel(wl, tiles, args)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4, err_msg=tiles.label())


@needs_kernel
@pytest.mark.parametrize("spec", [SPECS[2], SPECS[3], SPECS[5]], ids=["conv_bias", "conv_nobias", "linear"])
def test_lowering_replaces_the_relax_layer_and_keeps_its_output(spec):
    mod, (x,) = L.single_layer_module(spec, FP32)
    low = lower_float_layers(mod, KERNEL)
    kernels = [f for _, f in low.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1  # bias fused: the bias-free kernel is gone
    wl = fpconv.FpWorkload.from_key(str(kernels[0].attrs[fpconv.WORKLOAD_ATTR]))
    assert wl == fpconv.workload_of(spec, list(spec.input_shape), KERNEL.lanes, spec.bias)
    ex = tvm.compile(low, tvm_target(get_preset("host")))
    out = tvm.relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(out, L._reference_layer(x, spec, FP32, 0), rtol=1e-4, atol=1e-4)


def test_lowering_leaves_depthwise_alone():
    dw = LayerSpec("d", "dwconv", 8, 8, (3, 3), (1, 1), (1, 1), groups=8, in_hw=(5, 5), out_hw=(5, 5))
    mod, _ = L.single_layer_module(dw, FP32)
    low = lower_float_layers(mod, fpconv.AVX512)
    assert not any(isinstance(f, tvm.tirx.PrimFunc) for _, f in low.functions_items())


@needs_kernel
@pytest.mark.slow
def test_tuned_row_is_stored_reused_exact_and_fingerprinted(tmp_path):
    spec = SPECS[0]
    target = TvmTarget("host", work_dir=str(tmp_path), tune_trials=3)
    assert target.device().details["fp32_kernel"] == KERNEL.name
    build = target.build_layer(spec, FP32)
    assert build.error_msg is None, build.error_msg
    (rec,) = fp_tuning.load_db(tmp_path / "tuning-host").values()
    assert rec["trials"] == 3 and rec["ms"] == min(t["ms"] for t in rec["tried"])
    art = json.loads(build.artifact)
    x = np.load(art["inputs"])["arr_0"]
    vm = tvm.relax.VirtualMachine(tvm.runtime.load_module(art["lib"]), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(out, L._reference_layer(x, spec, FP32, 0), rtol=1e-4, atol=1e-4)
    assert KERNEL.name in art["lib"]  # a build of another fp32 kernel is another file
    mod, _ = L.single_layer_module(spec, FP32)
    low = lower_float_layers(mod, KERNEL)
    assert fp_tuning.tune(low, target.tvm_target, tmp_path / "tuning-host", 3) == {}  # reused, not retuned
    ((gv, _),) = fp_tuning.kernels_of(low)
    tuned = fp_tuning.apply_database(low, tmp_path / "tuning-host")
    assert str(tuned[gv].attrs[fpconv.TILES_ATTR]) == fp_tuning.tiles_of(rec).label()


@needs_kernel
@pytest.mark.slow
def test_export_runs_float_layers_on_the_kernel_and_matches_torch(tmp_path, monkeypatch):
    """An fp32 plan's exported model: its dense convs and linear are lowered to the kernel; verified."""
    from hwmpq.records import BitPlan
    from hwmpq.targets.tvm import fp_lowering
    from hwmpq.zoo import create_model

    lowered = []
    real = fp_lowering.lower_float_layers
    monkeypatch.setattr(fp_lowering, "lower_float_layers", lambda m, k: lowered.append(real(m, k)) or lowered[-1])
    torch.manual_seed(0)
    model = create_model("test_tiny").eval()
    x = torch.randn(1, 1, 8, 8)
    plan = BitPlan.from_dict({n: FP32 for n in ("conv1", "conv2", "dw", "pw", "fc")})
    res = TvmTarget("host", work_dir=str(tmp_path / "w")).export(model, plan, x, str(tmp_path / "out"))
    manifest = json.loads(open(res.manifest).read())
    assert manifest["verified"], manifest["verification"]
    (mod,) = lowered
    assert len(fp_tuning.kernels_of(mod)) == 4  # conv1, conv2, pw, fc (dw stays a Relax op)
