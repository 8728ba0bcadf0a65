"""tvm:host through a loopback RPC server on 127.0.0.1: real builds, real timings, failures as results."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")

from tvm_rpc_fixture import free_port, kill_tree, rpc_server, rpc_tracker  # noqa: E402

from hwmpq.records import FP32, W8A8, LayerSpec, MeasureConfig, Precision  # noqa: E402
from hwmpq.targets import get_target  # noqa: E402
from hwmpq.targets.tvm.presets import UnknownPresetError  # noqa: E402
from hwmpq.targets.tvm.rpc import RpcAddressError  # noqa: E402
from hwmpq.targets.tvm.target import TvmTarget  # noqa: E402

pytestmark = pytest.mark.tvm
CONV = LayerSpec("conv", "conv", 8, 8, (3, 3), (1, 1), (1, 1), in_hw=(6, 6), out_hw=(6, 6))
LINEAR = LayerSpec("fc", "linear", 16, 4)
QUICK = MeasureConfig(warmup=2, repeat=5, number=2, timeout_s=60.0, rounds=1)  # one upload per job


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tvm-work"))


@pytest.fixture(scope="module")
def server():
    with rpc_server() as (addr, _proc):
        yield addr


@pytest.mark.slow
def test_loopback_profile_fp32_and_int8(server, work_dir):
    target = get_target("tvm:host", rpc=server, work_dir=work_dir)
    dev = target.device()
    assert "linux" in dev.details["llvm_get_system_triple"] and dev.details["llvm_get_system_cpu"]
    assert dev.emulated is False and dev.fingerprint.startswith("tvm:host-")
    for spec, prec in [(CONV, FP32), (CONV, W8A8), (LINEAR, W8A8)]:
        build = target.build_layer(spec, prec)
        assert build.error_msg is None, build.error_msg
        res = target.run(build, QUICK)
        assert res.error_msg is None, res.error_msg
        assert len(res.latencies_ms) == QUICK.repeat and all(0 < t < 1000 for t in res.latencies_ms)


def test_unknown_preset_is_clear():
    with pytest.raises(UnknownPresetError, match="known presets"):
        get_target("tvm:arm-a99")


def test_bad_addresses_are_clear():
    with pytest.raises(RpcAddressError, match="HOST:PORT"):
        TvmTarget("host", rpc="localhost")
    with pytest.raises(RpcAddressError, match="--key"):
        TvmTarget("host", tracker="127.0.0.1:9190")


@pytest.mark.slow
def test_unreachable_rpc_is_a_recorded_result(work_dir):
    target = TvmTarget("host", rpc=f"127.0.0.1:{free_port()}", work_dir=work_dir, timeout_s=10)
    build = target.build_layer(LINEAR, FP32)  # building needs no device
    assert build.error_msg is None
    res = target.run(build, QUICK)
    assert res.latencies_ms is None and "unreachable" in res.error_msg and "rpc_server" in res.error_msg


def test_arm_preset_without_device_says_what_to_pass(work_dir):
    target = TvmTarget("arm-a72", work_dir=work_dir)
    res = target.run(type("B", (), {"artifact": json.dumps({"lib": "x", "inputs": _inputs(work_dir)}),
                                    "error_msg": None})(), QUICK)
    assert res.latencies_ms is None and "--rpc" in res.error_msg


def _inputs(work_dir: str) -> str:
    path = f"{work_dir}/dummy_inputs.npz"
    np.savez(path, np.zeros(3, np.float32))
    return path


def test_precision_the_target_cannot_run_is_a_build_result(work_dir):
    target = TvmTarget("host", work_dir=work_dir)
    res = target.build_layer(CONV, Precision(5, 5))
    assert res.artifact is None and "cannot run w5a5" in res.error_msg
    dw = LayerSpec("dw", "dwconv", 8, 8, (3, 3), padding=(1, 1), groups=8, in_hw=(6, 6), out_hw=(6, 6))
    assert "cannot run w2a2" in target.build_layer(dw, Precision(2, 2)).error_msg
    rgb = LayerSpec("stem", "conv", 3, 8, (3, 3), padding=(1, 1), in_hw=(6, 6), out_hw=(6, 6))
    assert "multiple of 8" in target.build_layer(rgb, Precision(2, 2)).error_msg


def test_layer_that_fails_to_build_is_a_result(work_dir):
    # a 5x5 kernel on a 2x2 input without padding: Relax refuses the shape; the message names the layer
    bad = LayerSpec("bad.conv", "conv", 4, 4, (5, 5), in_hw=(2, 2), out_hw=(1, 1))
    res = TvmTarget("host", work_dir=work_dir).build_layer(bad, FP32)
    assert res.artifact is None and "bad.conv" in res.error_msg and "failed" in res.error_msg


@pytest.mark.slow
def test_server_dies_mid_profile_then_resumes(work_dir):
    port = free_port()
    target = TvmTarget("host", rpc=f"127.0.0.1:{port}", work_dir=work_dir, timeout_s=60)
    build = target.build_layer(LINEAR, W8A8)
    with rpc_server(port) as (_addr, proc):
        first = target.run(build, QUICK)
        assert first.error_msg is None, first.error_msg
        kill_tree(proc)
        dead = target.run(build, QUICK)
    assert dead.latencies_ms is None and "tvm:host" in dead.error_msg
    assert first.latencies_ms  # what was measured before the crash is still there
    with rpc_server(port):
        again = target.run(build, QUICK)
        if again.error_msg is not None:  # one retry: a fresh server on a loaded box may miss the deadline
            again = target.run(build, QUICK)
    assert again.error_msg is None, again.error_msg


@pytest.mark.slow
def test_tracker_spreads_over_boards(work_dir):
    with rpc_tracker() as tracker, rpc_server(tracker=tracker, wait=False), rpc_server(tracker=tracker, wait=False):
        target = TvmTarget("host", tracker=tracker, key="hwmpq-test", work_dir=work_dir)
        _wait_boards(tracker, 2)
        build = target.build_layer(LINEAR, FP32)
        results = [target.run(build, QUICK) for _ in range(4)]
        assert all(r.error_msg is None for r in results), [r.error_msg for r in results]
        assert target._pool.size == 2  # two boards held, measurements rotate over both


def _wait_boards(tracker: str, n: int) -> None:
    import time

    from tvm import rpc

    host, port = tracker.split(":")
    for _ in range(600):
        q = rpc.connect_tracker(host, int(port)).summary().get("queue_info", {}).get("hwmpq-test", {})
        if q.get("free", 0) >= n:
            return
        time.sleep(0.2)
    raise RuntimeError("boards did not register with the tracker")


@pytest.mark.slow
def test_profile_into_lut_marks_emulated_rows_and_search_refuses_them(server, tmp_path):
    import torch

    from hwmpq.graph import analyse
    from hwmpq.lut.model import ForeignTableError, build_table
    from hwmpq.lut.store import LutStore
    from hwmpq.profilers.runner import profile
    from hwmpq.zoo import create_model

    specs, edges = analyse(create_model("test_tiny").eval(), torch.randn(1, 1, 8, 8))
    specs = [s for s in specs if s.kind == "linear"]  # one tiny layer keeps this fast
    # a loopback x86 server forced to count as emulated (as an aarch64 qemu server is detected)
    target = TvmTarget("host", rpc=server, work_dir=str(tmp_path / "w"), emulated=True)
    target.precisions = type(target.precisions)(conv=(FP32,), dwconv=(FP32,), linear=(FP32, W8A8))
    lut = tmp_path / "lut.sqlite"
    with LutStore.open(lut, target=target.id, device=target.device()) as store:
        report = profile(specs, [], target, store, QUICK, progress=False, transitions=False)
        assert report.measured >= 2 and report.failed == 0, report
        with pytest.raises(ForeignTableError, match="emulated"):
            build_table(store, specs, [], QUICK, target)
        table = build_table(store, specs, [], QUICK, target, allow_emulated=True)
        assert table is not None
        again = profile(specs, [], target, store, QUICK, progress=False, transitions=False)
        assert again.measured == 0 and again.skipped == report.total  # resumes: nothing measured twice
