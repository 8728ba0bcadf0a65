"""tvm:host transition chains (stand-in -> export's glue -> stand-in) over a loopback RPC server: their
outputs against the numpy reference, and the profiler + LUT model picking them up like ORT's."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e .[tvm])")

from tvm_rpc_fixture import rpc_server  # noqa: E402

from hwmpq.records import FP32, W8A8, MeasureConfig, Precision  # noqa: E402
from hwmpq.targets.tvm import layers as L  # noqa: E402
from hwmpq.targets.tvm import rpc as R  # noqa: E402
from hwmpq.targets.tvm.target import TvmTarget  # noqa: E402

pytestmark = [pytest.mark.tvm, pytest.mark.slow]
QUICK = MeasureConfig(warmup=2, repeat=5, number=2, timeout_s=60.0, rounds=1)  # one upload per job
W2A2, W4A4 = Precision(2, 2), Precision(4, 4)


@pytest.fixture(scope="module")
def server():
    with rpc_server() as (addr, _proc):
        yield addr


@pytest.fixture(scope="module")
def target(server, tmp_path_factory):
    t = TvmTarget("host", rpc=server, work_dir=str(tmp_path_factory.mktemp("tvm-tr")))
    yield t
    t.close()


@pytest.mark.parametrize("shape,src,dst", [
    ((1, 16, 6, 6), FP32, W8A8), ((1, 16, 6, 6), W8A8, W8A8), ((1, 16, 6, 6), W8A8, FP32),
    ((1, 16, 6, 6), W2A2, W4A4), ((1, 16, 6, 6), W8A8, W2A2), ((1, 24), W8A8, W4A4), ((1, 24), W4A4, FP32),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v.label)
def test_chain_output_matches_reference_and_times(target, shape, src, dst):
    build = target.build_transition(shape, src, dst)
    assert build.error_msg is None, build.error_msg
    art = json.loads(build.artifact)
    x = np.load(art["inputs"])["arr_0"]
    got = R.outputs_remote(target._pool.get(), art["lib"], [x])
    ref = L.reference_transition(x, shape, src, dst)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if dst.is_float:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    elif src.is_float:  # a float producer may land a value on the other side of a rounding step
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1 and (got == ref).mean() >= 0.99
    else:
        np.testing.assert_array_equal(got, ref)
    assert np.abs(ref.astype(float)).max() > 0  # the chain carries signal, not a saturated zero tensor
    run = target.run(build, QUICK)
    assert run.error_msg is None and len(run.latencies_ms) == QUICK.repeat


def test_bad_transitions_are_build_results(target):
    bad = target.build_transition((1, 8, 4), W8A8, W8A8)
    assert bad.artifact is None and "NCHW" in bad.error_msg
    refused = target.build_transition((1, 8, 4, 4), Precision(16, 16), W8A8)
    assert refused.artifact is None and "w16a16" in refused.error_msg and "allowed" in refused.error_msg


def test_profiler_measures_tvm_transitions_into_the_table(target, tmp_path, monkeypatch):
    import torch

    from hwmpq.graph import analyse
    from hwmpq.lut.model import build_table, edges_through_merges
    from hwmpq.lut.store import LutStore
    from hwmpq.profilers.probes import profiling_specs
    from hwmpq.profilers.runner import profile
    from hwmpq.zoo import create_model

    model, x = create_model("test_tiny").eval(), torch.randn(1, 1, 8, 8)
    specs, _ = analyse(model, x)
    edges = edges_through_merges(model, x)
    # the RPC server serves one session at a time: reuse the module's target, fp32 + int8 keep this short
    monkeypatch.setattr(target, "precisions", type(target.precisions)(conv=(FP32, W8A8), dwconv=(FP32, W8A8),
                                                                         linear=(FP32, W8A8)))
    all_specs = profiling_specs(specs, edges, target)
    stand_ins = [s for s in all_specs if s.fqn.startswith("stand_in")]
    assert {s.input_shape for s in stand_ins} == {e.tensor_shape for e in edges}
    with LutStore.open(tmp_path / "lut.sqlite", target=target.id, device=target.device()) as store:
        report = profile(all_specs, edges, target, store, QUICK, progress=False)
        assert report.failed == 0, report
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a missing transition entry would warn
            table = build_table(store, specs, edges, QUICK, target)
        for st in stand_ins:  # the stand-ins were profiled as layers, at every precision of the chains
            assert all(store.get("layer", st.signature, p, QUICK) is not None for p in (FP32, W8A8))
        chains = store.measurements("transition")
        assert len(chains) == 4 * len(stand_ins) and not any(m.error_msg for m in chains)
    assert len(table.transitions) == len(edges)  # every edge got a matrix (no missing entry: no warning)
    assert all(t.shape == (2, 2) and np.isfinite(t).all() for _, _, t in table.transitions)
    assert set(table.candidates) == {FP32, W8A8}
