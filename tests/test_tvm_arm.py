"""aarch64 TVM RPC server under qemu-user (scripts/arm_rpc_sysroot.sh): a cross-compiled layer and a
whole exported model run on it and match the integer reference / torch. Functional only: emulated."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")

import torch  # noqa: E402
from hwmpq.targets.tvm import layers as L  # noqa: E402
from hwmpq.targets.tvm import rpc as R  # noqa: E402
from hwmpq.targets.tvm.target import TvmTarget  # noqa: E402
from tvm_rpc_fixture import ROOT, free_port, rpc_server  # noqa: E402

from hwmpq.records import FP32, W8A8, BitPlan, LayerSpec, MeasureConfig, Precision  # noqa: E402

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


def test_exported_model_matches_torch_on_aarch64(arm_server, tmp_path):
    from hwmpq.zoo import create_model

    torch.manual_seed(0)
    model = create_model("test_tiny").eval()
    plan = BitPlan.from_dict({"conv1": W8A8, "conv2": Precision(2, 2), "dw": W8A8, "pw": Precision(4, 4),
                              "fc": FP32})
    target = TvmTarget("arm-a72", rpc=arm_server, work_dir=str(tmp_path / "w"), timeout_s=600)
    res = target.export(model, plan, torch.randn(1, 1, 8, 8), str(tmp_path / "out"))
    manifest = json.loads(Path(res.manifest).read_text())
    assert manifest["verification"]["ok"] and manifest["emulated"], manifest["verification"]
    assert "aarch64" in subprocess.run(["file", res.artifact], capture_output=True, text=True).stdout
