"""ILP baseline: the known optimum on hand-made tables (against brute force, with transitions), the
Hutchinson estimate against the exact Hessian trace, sensitivities of a real model, the strategy end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from hwmpq.lut.table import LatencyTable
from hwmpq.records import FP32, Precision
from hwmpq.search.ilp import (
    ILPConfig,
    act_quant_error,
    hutchinson_traces,
    solve_ilp,
    sweep,
    weight_quant_error,
)

CANDS = (FP32, Precision(8, 8), Precision(4, 4))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _table(lat, transitions=(), constant=0.0, energy=None):
    lat = np.asarray(lat, dtype=float)
    return LatencyTable(tuple(f"l{i}" for i in range(len(lat))), CANDS[: lat.shape[1]], lat,
                        lat * 0.1 if energy is None else np.asarray(energy, dtype=float), tuple(transitions), constant)


def test_ilp_hand_case_known_optimum():
    # two layers; fp32 costs 4 ms each, int8 2 ms, int4 1 ms; constant 1 ms.
    lat = [[4, 2, 1], [4, 2, 1]]
    omega = np.array([[0, 1, 10], [0, 3, 4]], dtype=float)
    t = _table(lat, constant=1.0)
    assert solve_ilp(omega, t, budget_ms=9.0) == [0, 0]  # everything float fits exactly (4+4+1)
    assert solve_ilp(omega, t, budget_ms=7.0) == [1, 0]  # 2 ms must go: int8 on layer 0 costs 1 (layer 1: 3)
    assert solve_ilp(omega, t, budget_ms=5.0) == [1, 1]  # int8 both: 1+3=4 < int4 on one layer (5 or 10+4)
    assert solve_ilp(omega, t, budget_ms=4.0) == [1, 2]  # 2+1+1 ms; sensitivity 5 (vs 10+3 for the mirror)
    assert solve_ilp(omega, t, budget_ms=2.9) is None  # the fastest plan takes 3 ms


def test_ilp_matches_brute_force_with_transitions():
    rng = np.random.default_rng(1)
    L, P = 5, 3
    lat = rng.uniform(1, 3, (L, P)) * np.array([1, 0.5, 0.3])
    lat[2, 2] = np.inf  # layer 2 cannot run int4
    T = rng.uniform(0, 0.3, (P, P))
    np.fill_diagonal(T, 0)
    T_forbid = T.copy()
    T_forbid[0, 2] = np.inf  # fp32 -> int4 across this edge cannot run
    t = _table(lat, ((0, 1, T), (1, 2, T_forbid), (3, 4, -0.5 * T)), constant=0.2)
    omega = rng.uniform(0, 1, (L, P)) * np.array([0, 1, 3])
    for budget in (3.5, 4.0, 5.0, 6.0, 8.0):
        best = None
        for idx in itertools.product(range(P), repeat=L):
            if not np.isfinite(lat[np.arange(L), idx]).all() or (idx[1] == 0 and idx[2] == 2):
                continue
            if t.predict_indices(idx)[0] <= budget:
                v = omega[np.arange(L), idx].sum()
                if best is None or v < best[0] - 1e-12:
                    best = (v, idx)
        got = solve_ilp(omega, t, budget)
        if best is None:
            assert got is None
        else:
            assert omega[np.arange(L), got].sum() == pytest.approx(best[0])
            assert t.predict_indices(got)[0] <= budget + 1e-9


def test_ilp_energy_budget_and_sweep():
    lat = [[4, 2, 1], [4, 2, 1]]
    energy = [[1, 5, 5], [1, 5, 5]]  # float is the frugal choice here
    omega = np.array([[0, 1, 2], [0, 1, 2]], dtype=float)
    t = _table(lat, energy=energy)
    assert solve_ilp(omega, t, budget_ms=6.0, budget_mj=6.0) == [0, 1] or solve_ilp(
        omega, t, budget_ms=6.0, budget_mj=6.0) == [1, 0]
    assert solve_ilp(omega, t, budget_ms=4.5, budget_mj=6.0) is None  # 4.5 ms needs two quantized layers: 10 mJ
    plans = sweep(omega, t, points=5)
    lats = [t.predict_indices(p)[0] for p in plans]
    assert plans[0] == [2, 2] and plans[-1] == [0, 0]
    assert lats == sorted(lats)  # looser budget, slower and less sensitive plan
    sens = [omega[np.arange(2), p].sum() for p in plans]
    assert sens == sorted(sens, reverse=True)


def test_quant_errors_shrink_with_bits():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    errs = [weight_quant_error(w, b) for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] > 0 and weight_quant_error(w, 32) == 0.0
    # 8-bit symmetric per-channel error is about step^2/12 per element
    step = w.reshape(8, -1).abs().amax(1) / 127
    expected = float((step**2 / 12).mean()) * w.numel()
    assert errs[2] == pytest.approx(expected, rel=0.2)
    x = torch.relu(torch.randn(4, 8, 5, 5))
    aerrs = [act_quant_error(x, b) for b in (2, 4, 8)]
    assert aerrs[0] > aerrs[1] > aerrs[2] > 0 and act_quant_error(x, 32) == 0.0


def test_hutchinson_matches_exact_hessian_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    tr_w, tr_a, _ = hutchinson_traces(model, ("0", "2"), x, y, samples=400, seed=0)
    for k, fqn in enumerate(("0", "2")):
        w0 = model.get_submodule(fqn).weight.detach()

        def loss_of(w, fqn=fqn):
            m = {n: p for n, p in model.named_parameters()}
            m[f"{fqn}.weight"] = w
            return nn.functional.cross_entropy(torch.func.functional_call(model, m, (x,)), y)

        H = torch.autograd.functional.hessian(loss_of, w0).reshape(w0.numel(), w0.numel())
        exact = float(torch.trace(H)) / w0.numel()
        # Rademacher Hutchinson variance per sample: 2 * sum of squared off-diagonal entries
        off = H - torch.diag(torch.diag(H))
        std = float(torch.sqrt(2 * (off**2).sum() / 400)) / w0.numel()
        assert abs(tr_w[k] - exact) <= 4 * std + 1e-9, (fqn, tr_w[k], exact, std)
        assert abs(tr_w[k] - exact) <= 0.25 * abs(exact)
    assert np.isfinite(tr_a).all()


def test_sensitivity_of_a_trained_model_is_monotone():
    from test_nemo import fake_table, trained_tiny

    from hwmpq.search.ilp import sensitivity_matrix

    model, splits = trained_tiny()
    table = fake_table(model, torch.zeros(1, 1, 8, 8))
    omega, traces = sensitivity_matrix(model, splits, table, ILPConfig(hutchinson_samples=4, batches=1))
    col = {c: k for k, c in enumerate(table.candidates)}
    assert (omega[:, col[FP32]] == 0).all()
    w8, w4a8, w4, w2 = (col[Precision(8, 8)], col[Precision(4, 8)], col[Precision(4, 4)], col[Precision(2, 2)])
    assert (omega[:, w8] < omega[:, w4a8]).all() and (omega[:, w4a8] <= omega[:, w4]).all()
    assert (omega[:, w4] < omega[:, w2]).all()
    assert len(traces["trace_w"]) == len(table.fqns)


@pytest.mark.slow
def test_ilp_strategy_end_to_end(tmp_path):
    from test_nemo import fake_table, trained_tiny

    from hwmpq.search.base import Budget, BudgetError, SearchInputs, run_search
    from hwmpq.search.evaluate_pool import ProxyConfig
    from hwmpq.search.pareto import load_front

    model, splits = trained_tiny()
    x = torch.zeros(1, 1, 8, 8)
    table = fake_table(model, x)
    budget = 0.5 * (table.predict_indices([0] * len(table.fqns))[0] + table.min_latency_ms())
    cfg = ILPConfig(hutchinson_samples=4, batches=1, sweep_points=4, proxy=ProxyConfig(eval_samples=200),
                    out_dir=str(tmp_path))
    res = run_search(SearchInputs(model, splits, table, Budget(latency_ms=budget), x, progress=False), cfg)
    assert res.predicted_ms <= budget and table.predict(res.plan)[0] == pytest.approx(res.predicted_ms)
    front = load_front(tmp_path / "front.json")
    assert front and all(0 <= p.accuracy <= 1 for p in front) and (tmp_path / "front.png").is_file()
    with pytest.raises(BudgetError, match="fastest plan"):
        run_search(SearchInputs(model, splits, table, Budget(latency_ms=0.5 * table.min_latency_ms()), x,
                                progress=False), cfg)
