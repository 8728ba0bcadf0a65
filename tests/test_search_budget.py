"""Budget parsing, feasibility and repair on hand-made LatencyTables where the right answer is known."""

import numpy as np
import pytest

from hwmpq.lut.table import LatencyTable
from hwmpq.records import FP32, Precision
from hwmpq.search.base import Budget, BudgetError
from hwmpq.search.budget import cheapest_plan, check_feasible, float_latency_ms, parse_budget, repair, within

W8, W4 = Precision(8, 8), Precision(4, 8)
CANDS = (FP32, W8, W4)


def table(layer_ms, transitions=(), constant_ms=0.0, energy=None):
    lat = np.asarray(layer_ms, dtype=float)
    en = np.asarray(energy, dtype=float) if energy is not None else lat / 10
    return LatencyTable(tuple(f"l{i}" for i in range(len(lat))), CANDS, lat, en, tuple(transitions), constant_ms,
                        target="hand")


# 3 layers; fp32 / w8a8 / w4a8 latencies; the fp32 plan is 6.0 ms + 1 ms constant
T = table([[2.0, 1.0, 0.5], [2.0, 1.0, 0.5], [2.0, 1.0, np.inf]], constant_ms=1.0)


def test_parse_relative_and_absolute():
    assert float_latency_ms(T)[0] == pytest.approx(7.0)
    assert parse_budget(T, "0.5x").latency_ms == pytest.approx(3.5)
    assert parse_budget(T, "2.5ms").latency_ms == pytest.approx(2.5)
    assert parse_budget(T, budget_ms=4.0).latency_ms == 4.0
    b = parse_budget(T, budget_mj=0.3)
    assert b.energy_mj == 0.3 and b.latency_ms is None
    # fastest plan: 0.5 + 0.5 + 1.0 + 1 ms constant = 3.0 ms; halfway to fp32's 7.0 ms is 5.0 ms
    assert parse_budget(T, "0.5range").latency_ms == pytest.approx(5.0)
    assert parse_budget(T, "0range").latency_ms == pytest.approx(3.0)
    for bad in ("fast", "-0.5x", "0x", "1.5range", "xrange"):
        with pytest.raises(BudgetError):
            parse_budget(T, bad)
    with pytest.raises(BudgetError, match="either"):
        parse_budget(T, "0.5x", budget_ms=3.0)
    with pytest.raises(BudgetError, match="give a latency budget"):
        parse_budget(T)


def test_infeasible_budget_refused_with_min_latency():
    # fastest: 0.5 + 0.5 + 1.0 + 1.0 constant = 3.0 ms
    check_feasible(T, Budget(latency_ms=3.0))
    with pytest.raises(BudgetError, match=r"fastest plan the LUT knows takes 3 ms") as e:
        check_feasible(T, Budget(latency_ms=2.9))
    assert "at least 3 ms" in str(e.value)
    with pytest.raises(BudgetError, match="energy budget"):
        check_feasible(T, Budget(energy_mj=0.1))  # most frugal: 0.05 + 0.05 + 0.1 = 0.2 mJ


def test_cheapest_plan_accounts_for_transitions():
    # layer 0 alone is cheapest at w4a8, but a w4a8 -> fp32 boundary costs 5 ms; layer 1 can only run fp32
    t = np.zeros((3, 3))
    t[2, 0] = 5.0
    tab = table([[2.0, 1.5, 0.5], [1.0, np.inf, np.inf]], transitions=[(0, 1, t)])
    idx = cheapest_plan(tab)
    assert idx == [1, 0]  # w8a8 then fp32: 1.5 + 1.0 = 2.5 < 0.5 + 1.0 + 5.0
    assert tab.predict_indices(idx)[0] == pytest.approx(2.5)


def test_repair_lowers_least_sensitive_layer_first_and_ends_within_budget():
    tab = table([[2.0, 1.0, 0.5]] * 3, constant_ms=0.0)
    start = [0, 0, 0]  # 6 ms
    sens = np.array([5.0, 0.1, 1.0])  # layer 1 least sensitive, then 2, then 0
    idx, steps = repair(tab, start, Budget(latency_ms=4.6), sens)
    assert within(tab, idx, Budget(latency_ms=4.6))
    # layer 1 goes fp32 -> w8a8 (5 ms), then w8a8 -> w4a8 (4.5 ms): within; layers 0 and 2 untouched
    assert [s.layer for s in steps] == ["l1", "l1"]
    assert idx == [0, 2, 0]
    idx, steps = repair(tab, start, Budget(latency_ms=4.0), sens)
    assert [s.layer for s in steps] == ["l1", "l1", "l2"] and idx == [0, 2, 1]
    assert steps[-1].latency_ms == pytest.approx(3.5)


def test_repair_with_per_candidate_sensitivity_prefers_cheap_loss_per_ms():
    tab = table([[2.0, 1.0, 0.5]] * 2)
    sens = np.array([[0, 0.01, 1.0], [0, 0.5, 0.6]])  # layer 0 at w8a8 almost free; layer 1 dislikes any drop
    idx, steps = repair(tab, [0, 0], Budget(latency_ms=3.0), sens)
    assert idx == [1, 0] and len(steps) == 1


def test_repair_already_within_is_untouched_and_bad_sensitivity_is_refused():
    idx, steps = repair(T, [1, 1, 1], Budget(latency_ms=10.0), np.zeros(3))
    assert idx == [1, 1, 1] and steps == []
    with pytest.raises(ValueError, match="sensitivity must be"):
        repair(T, [0, 0, 0], Budget(latency_ms=4.0), np.zeros(5))


def test_repair_out_of_a_local_minimum_goes_to_the_cheapest_plan():
    # both layers fp32 (2.0 ms) or both w4a8 (0.5 ms); a boundary between them costs 3 ms each way, so from
    # fp32/fp32 every single change is dearer (greedy repair is stuck), but w4a8/w4a8 (1.0 ms) fits
    t = np.zeros((3, 3))
    t[0, 2] = t[2, 0] = 3.0
    t[0, 1] = t[1, 0] = t[1, 2] = t[2, 1] = 3.0
    tab = table([[2.0, 1.5, 0.5], [2.0, 1.5, 0.5]], transitions=[(0, 1, t)])
    idx, steps = repair(tab, [0, 0], Budget(latency_ms=1.2), np.zeros(2))
    assert idx == [2, 2] and within(tab, idx, Budget(latency_ms=1.2))
    assert [(s.layer, s.from_label, s.to_label) for s in steps] == [("l0", "fp32", "w4a8"), ("l1", "fp32", "w4a8")]
    assert steps[-1].latency_ms == pytest.approx(1.0)
    with pytest.raises(BudgetError, match="even the cheapest plan"):
        repair(tab, [0, 0], Budget(latency_ms=0.9), np.zeros(2))


def test_cheapest_plan_is_never_above_a_uniform_plan():
    """Per-layer argmin is w8a8 everywhere, but the int8 boundary costs more than the rows save: descent
    from the argmin alone is stuck at 2.3 ms (every single-layer change costs more); the fp32 plan is 2.0."""
    t = np.array([[0.0, 0.5], [0.5, 0.5]])
    tab = LatencyTable(("a", "b"), (FP32, W8), np.array([[1.0, 0.9], [1.0, 0.9]]), np.zeros((2, 2)), ((0, 1, t),))
    assert tab.predict_indices([1, 1])[0] == pytest.approx(2.3)
    assert tab.cheapest_indices() == [0, 0] and tab.min_latency_ms() == pytest.approx(2.0)
    assert tab.cheapest_indices(fixed={1: 1}) == [1, 1]  # held layers stay held
