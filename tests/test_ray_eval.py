"""Parallel candidate evaluation: a spawn process pool and a local Ray instance give the same accuracies
as the serial evaluation, in job order, on real quantized evaluations (digits, trained test_tiny)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hwmpq.search.evaluate_pool import EvalContext, Evaluator, ProxyConfig, evaluate_plan, make_context

JOBS = [(0, 0, 0, 0, 0), (1, 1, 1, 1, 1), (4, 4, 4, 4, 4), (1, 3, 0, 2, 1)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ctx(one_thread) -> EvalContext:
    from test_nemo import fake_table, trained_tiny

    model, splits = trained_tiny()
    table = fake_table(model, torch.zeros(1, 1, 8, 8))
    c = make_context(model, splits, table.fqns, table.candidates, ProxyConfig(eval_samples=200))
    c.serial = [evaluate_plan(c, j) for j in JOBS]
    return c


def test_serial_evaluation_is_deterministic_and_ordered(ctx):
    with Evaluator(ctx, workers=0) as ev:
        assert ev.map(JOBS) == ctx.serial and ev.backend == "serial" and ev.n_evaluated == 4
    assert ctx.serial[0] > 0.7 and ctx.serial[2] < ctx.serial[0] - 0.3  # w2a2 everywhere breaks the model


@pytest.mark.slow
def test_process_pool_matches_serial(ctx):
    with Evaluator(ctx, workers=2) as ev:
        assert ev.backend == "process"
        assert ev.map(JOBS) == ctx.serial
        assert ev.map(JOBS[::-1]) == ctx.serial[::-1]


def test_bad_worker_count():
    with pytest.raises(ValueError, match="workers"):
        Evaluator(None, workers=-1)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'hwmpq[ray]')")
def test_ray_local_matches_serial(ctx):
    import ray

    try:
        with Evaluator(ctx, workers=2, ray_address="local") as ev:
            assert ev.backend == "ray"
            assert ev.map(JOBS) == ctx.serial
    finally:
        ray.shutdown()


def test_ray_missing_is_a_clear_error(ctx, monkeypatch):
    import sys

    from hwmpq.search.evaluate_pool import RayUnavailableError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as on a machine without it
    with pytest.raises(RayUnavailableError, match=r"pip install 'hwmpq\[ray\]'"):
        Evaluator(ctx, workers=1, ray_address="local")
