"""aarch64 TVM RPC server under qemu-user (scripts/arm_rpc_sysroot.sh): a cross-compiled layer and a
whole exported model run on it and match the integer reference / torch. Functional only: emulated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")

import torch  # noqa: E402
from tvm_rpc_fixture import ROOT, free_port, rpc_server  # noqa: E402

from hwmpq.records import FP32, W8A8, BitPlan, LayerSpec, MeasureConfig, Precision  # noqa: E402
from hwmpq.targets.tvm import layers as L  # noqa: E402
from hwmpq.targets.tvm import rpc as R  # noqa: E402
from hwmpq.targets.tvm.target import TvmTarget  # noqa: E402

pytestmark = [pytest.mark.tvm, pytest.mark.arm, pytest.mark.slow]
SCRIPT = ROOT / "scripts" / "arm_rpc_sysroot.sh"


def _ready() -> bool:
    return subprocess.run(["bash", str(SCRIPT), "check"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def arm_server():
    if not _ready():
        pytest.skip("no aarch64 RPC sysroot or binfmt_misc registration: run `sudo scripts/arm_rpc_sysroot.sh "
                    "setup` (needs root, the Debian mirror and PyPI)")
    port = free_port()
    with rpc_server(port, cmd=["bash", str(SCRIPT), "serve", str(port)], start_timeout_s=600) as (addr, _):
        yield addr


def test_cross_compiled_layers_run_exactly_on_aarch64(arm_server, tmp_path):
    target = TvmTarget("arm-a76-dotprod", rpc=arm_server, work_dir=str(tmp_path), timeout_s=600)
    try:
        _check_layers_and_timing(target)
    finally:
        target.close()  # the server serves one session at a time


def _check_layers_and_timing(target: TvmTarget) -> None:
    dev = target.device()
    assert dev.emulated and dev.details["llvm_get_system_triple"].startswith("aarch64")
    spec = LayerSpec("conv", "conv", 8, 8, (3, 3), (1, 1), (1, 1), in_hw=(6, 6), out_hw=(6, 6))
    for prec in (W8A8, Precision(2, 2)):
        build = target.build_layer(spec, prec)
        assert build.error_msg is None, build.error_msg
        art = json.loads(build.artifact)
        x = np.load(art["inputs"])["arr_0"]
        out = R.outputs_remote(target._pool.get(), art["lib"], [x])
        np.testing.assert_array_equal(out, L.reference_int_layer(x, spec, L.random_int_params(spec, prec)))
    run = target.run(build, MeasureConfig(warmup=1, repeat=3))
    assert run.error_msg is None and len(run.latencies_ms) == 3  # emulated timing: rows get emulated=True


def _sdot_count(lib: str) -> int:
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", lib], capture_output=True, text=True, check=True)
    return sum(1 for ln in dis.stdout.splitlines() if "\tsdot\t" in ln)


SDOT_SPECS = [
    LayerSpec("conv3x3", "conv", 16, 16, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8)),
    LayerSpec("conv3x3_s2", "conv", 16, 32, (3, 3), (2, 2), (1, 1), in_hw=(8, 8), out_hw=(4, 4)),
    LayerSpec("conv1x1", "conv", 32, 8, (1, 1), in_hw=(5, 5), out_hw=(5, 5)),
    LayerSpec("stem_c1_o10", "conv", 1, 10, (3, 3), (1, 1), (1, 1), in_hw=(6, 6), out_hw=(6, 6)),
    LayerSpec("linear", "linear", 64, 12),
    LayerSpec("linear_o10", "linear", 24, 10, batch=2),
]


def test_dotprod_int8_layers_use_sdot_and_are_exact_on_aarch64(arm_server, tmp_path):
    """arm-a76-dotprod: the profiled w8a8 conv/linear .so holds sdot and equals the integer reference on
    the (emulated) aarch64 server; arm-a72 (no dotprod) and depthwise keep the Relax kernel."""
    a76 = TvmTarget("arm-a76-dotprod", rpc=arm_server, work_dir=str(tmp_path), timeout_s=600)
    try:
        counts = _check_sdot_layers(a76)
    finally:
        a76.close()  # the server serves one session at a time
    print("sdot per .so:", counts)
    assert all(n > 0 for n in counts.values()), counts
    dw = LayerSpec("dw", "dwconv", 16, 16, (3, 3), (1, 1), (1, 1), groups=16, in_hw=(6, 6), out_hw=(6, 6))
    a72 = TvmTarget("arm-a72", work_dir=str(tmp_path))
    for target, spec in ((a76, dw), (a72, SDOT_SPECS[0])):
        build = target.build_layer(spec, W8A8)
        assert build.error_msg is None and _sdot_count(json.loads(build.artifact)["lib"]) == 0


def _check_sdot_layers(a76: TvmTarget) -> dict[str, int]:
    assert a76.device().details["int8_kernel"] == "sdot-tiled"
    counts = {}
    for spec in SDOT_SPECS:
        build = a76.build_layer(spec, W8A8)
        assert build.error_msg is None, build.error_msg
        art = json.loads(build.artifact)
        counts[spec.fqn] = _sdot_count(art["lib"])
        x = np.load(art["inputs"])["arr_0"]
        assert x.dtype == np.uint8  # hwmpq's post-ReLU codes: the shifted path
        out = R.outputs_remote(a76._pool.get(), art["lib"], [x])
        ref = L.reference_int_layer(x, spec, L.random_int_params(spec, W8A8))
        np.testing.assert_array_equal(out, ref)
        assert len(np.unique(ref)) > 2
    return counts


def test_sdot_kernel_is_exact_on_aarch64_at_every_tile(arm_server, tmp_path):
    """The tiled sdot kernel (requantize fused) cross-compiled at several register tiles, uint8 and int8
    codes, run on the aarch64 server: equal to the integer reference at each tile."""
    import tvm

    from hwmpq.targets.tvm import dotconv
    from hwmpq.targets.tvm.dot_intrin import SDOT
    from hwmpq.targets.tvm.presets import get_preset, tvm_target
    from hwmpq.targets.tvm.target import export_library

    preset = get_preset("arm-a76-dotprod")
    spec = LayerSpec("conv", "conv", 12, 24, (3, 3), (1, 1), (1, 1), in_hw=(8, 8), out_hw=(8, 8))
    sess_target = TvmTarget("arm-a76-dotprod", rpc=arm_server, work_dir=str(tmp_path), timeout_s=600)
    checked = 0
    try:
        sess = sess_target._pool.get()
        for signed in (False, True):
            p = dotconv_params(spec, signed)
            x = L.int_input(spec, p, seed=3)
            wl = dotconv.workload_of(spec, p, SDOT, list(x.shape))
            tiles = dotconv.candidate_tiles(wl, SDOT)
            for t in tiles[:2] + tiles[-1:]:
                mod = L._wrap(lambda bb, v, p=p, t=t: dotconv.emit_int8(bb, v, spec, p, SDOT, tiles=t), x)
                lib = tmp_path / f"k{signed}-{t.tile_w}x{t.tile_o}.so"
                export_library(tvm.compile(mod, tvm_target(preset)), lib, preset)
                assert _sdot_count(str(lib)) > 0
                out = R.outputs_remote(sess, str(lib), [x])
                np.testing.assert_array_equal(out, L.reference_int_layer(x, spec, p), err_msg=f"{t} {signed}")
                checked += 1
    finally:
        sess_target.close()
    assert checked == 6


def dotconv_params(spec: LayerSpec, signed: bool):
    from dataclasses import replace

    return replace(L.random_int_params(spec, W8A8, seed=2), in_signed=signed)


def _export_tiny(arm_server, tmp_path, preset: str, plan: BitPlan):
    """test_tiny (seeded) exported for ``preset`` over the emulated server: (ExportResult, manifest dict)."""
    from hwmpq.zoo import create_model

    torch.manual_seed(0)
    model = create_model("test_tiny").eval()
    target = TvmTarget(preset, rpc=arm_server, work_dir=str(tmp_path / "w"), timeout_s=600)
    try:
        res = target.export(model, plan, torch.randn(1, 1, 8, 8), str(tmp_path / "out"))
    finally:
        target.close()
    return res, json.loads(Path(res.manifest).read_text())


def test_dotprod_export_uses_sdot_and_matches_torch_on_aarch64(arm_server, tmp_path):
    plan = BitPlan.from_dict({n: W8A8 for n in ("conv1", "conv2", "dw", "pw", "fc")})
    res, manifest = _export_tiny(arm_server, tmp_path, "arm-a76-dotprod", plan)
    print("export verification:", manifest["verification"], "sdot in model.so:", _sdot_count(res.artifact))
    assert manifest["verification"]["ok"] and manifest["emulated"], manifest["verification"]
    assert manifest["verification"]["max_lsb"] < 1e-6  # fixed seed: exactly torch's codes (observed 0.0)
    assert manifest["dot_layers"] == ["conv1", "conv2", "pw", "fc"]  # dw: the Relax kernel
    assert manifest["int8_kernel"] == "sdot-tiled"
    assert _sdot_count(res.artifact) > 0


def test_exported_model_matches_torch_on_aarch64(arm_server, tmp_path):
    plan = BitPlan.from_dict({"conv1": W8A8, "conv2": Precision(2, 2), "dw": W8A8, "pw": Precision(4, 4),
                              "fc": FP32})
    res, manifest = _export_tiny(arm_server, tmp_path, "arm-a72", plan)
    assert manifest["verification"]["ok"] and manifest["emulated"], manifest["verification"]
    assert "aarch64" in subprocess.run(["file", res.artifact], capture_output=True, text=True).stdout


def _tiny_plan_file(tmp_path: Path) -> tuple[BitPlan, Path]:
    from hwmpq.records import save_plan

    plan = BitPlan.from_dict({"conv1": W8A8, "conv2": W8A8, "dw": W8A8, "pw": Precision(4, 4), "fc": FP32})
    save_plan(plan, tmp_path / "plan.json")
    return plan, tmp_path / "plan.json"


@pytest.mark.skipif(subprocess.run(["which", "aarch64-linux-gnu-g++"], capture_output=True).returncode != 0,
                    reason="no aarch64-linux-gnu-g++ (apt-get install g++-aarch64-linux-gnu)")
def test_export_without_board_writes_unverified_artifact(tmp_path):
    """`hwmpq export --target tvm:arm-a76-dotprod` without --rpc/--tracker: a real cross-compile, a
    manifest marked not verified with the reason, a warning, exit 0."""
    _, plan_path = _tiny_plan_file(tmp_path)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "hwmpq", "export", "--model", "test_tiny", "--plan", str(plan_path),
                          "--out", str(out), "--target", "tvm:arm-a76-dotprod", "--data", "digits"],
                         capture_output=True, text=True, env={**os.environ, "HWMPQ_TVM_WORK_DIR": str(tmp_path / "w")},
                         timeout=600)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "warning: model.so NOT verified: no --rpc/--tracker given" in res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verified"] is False and manifest["verification"].startswith("no --rpc/--tracker given")
    assert manifest["device"] is None and manifest["emulated"] is None
    assert manifest["dot_layers"] == ["conv1", "conv2"] and manifest["integer_layers"][-1] == "pw"
    info = subprocess.run(["file", str(out / "model.so")], capture_output=True, text=True).stdout
    assert "aarch64" in info and "ELF" in info
    assert _sdot_count(str(out / "model.so")) > 0  # the w8a8 convs went through sdot


def test_export_without_board_runs_later_on_the_board(arm_server, tmp_path):
    """The model.so written without a board equals torch's fake-quant output once it reaches one."""
    from hwmpq.targets.tvm.export import agreement, prepare_model
    from hwmpq.zoo import create_model

    plan, _ = _tiny_plan_file(tmp_path)
    torch.manual_seed(0)
    model = create_model("test_tiny").eval()
    x = torch.randn(1, 1, 8, 8)
    res = TvmTarget("arm-a76-dotprod", work_dir=str(tmp_path / "w")).export(model, plan, x, str(tmp_path / "o"))
    assert any("NOT verified" in w for w in res.warnings)
    qmodel, _ = prepare_model(model, plan, x)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    board = TvmTarget("arm-a76-dotprod", rpc=arm_server, work_dir=str(tmp_path / "w"), timeout_s=600)
    try:
        got = R.outputs_remote(board._pool.get(), res.artifact, [x.numpy()])
    finally:
        board.close()
    assert agreement(ref, got, None)["max_abs"] < 1e-5
