"""Pareto tools on hand-made fronts whose right answers are known."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hwmpq.records import FP32, BitPlan, Precision, load_plan
from hwmpq.search.pareto import (
    FrontError,
    FrontPoint,
    NoPlanWithinBudget,
    crowding_distance,
    dominates,
    front_from_csv,
    front_to_csv,
    hypervolume,
    load_front,
    non_dominated_sort,
    pareto_front,
    pick,
    plot_fronts,
    save_front,
)

W8, W4 = Precision(8, 8), Precision(4, 4)


def test_non_dominated_sort_hand_example():
    F = np.array([[1, 5], [2, 3], [3, 1], [2, 4], [4, 4], [2, 3]], dtype=float)
    fronts = [sorted(f.tolist()) for f in non_dominated_sort(F)]
    # (2,4) is dominated by (2,3) only; (4,4) by (2,3), (3,1) and (2,4); the duplicate (2,3) shares front 0
    assert fronts == [[0, 1, 2, 5], [3], [4]]


def test_non_dominated_sort_three_objectives_and_empty():
    F = np.array([[1, 1, 1], [0, 2, 2], [2, 2, 2], [1, 1, 0]], dtype=float)
    assert [sorted(f.tolist()) for f in non_dominated_sort(F)] == [[1, 3], [0], [2]]
    assert non_dominated_sort(np.zeros((0, 2))) == []
    with pytest.raises(ValueError, match=r"\[N, M\]"):
        non_dominated_sort(np.zeros(3))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=25))
def test_sort_invariants(rows):
    F = np.array(rows, dtype=float)
    fronts = non_dominated_sort(F)
    assert sorted(np.concatenate(fronts).tolist()) == list(range(len(F)))
    for k, front in enumerate(fronts):
        for i in front:
            assert not any(dominates(F[j], F[i]) for j in front)  # mutually non-dominated
            if k:
                assert any(dominates(F[j], F[i]) for j in fronts[k - 1])  # something above dominates it


def test_crowding_distance():
    F = np.array([[0, 4], [1, 2], [2, 1], [4, 0]], dtype=float)
    d = crowding_distance(F)
    assert np.isinf(d[0]) and np.isinf(d[3])
    # point 1: (2-0)/4 + (4-1)/4 = 1.25; point 2: (4-1)/4 + (2-0)/4 = 1.25
    assert d[1] == pytest.approx(1.25) and d[2] == pytest.approx(1.25)


def test_hypervolume_known_values():
    assert hypervolume(np.array([[1, 3], [2, 2], [3, 1]]), (4, 4)) == pytest.approx(6.0)
    # a dominated point and a point outside the reference add nothing
    assert hypervolume(np.array([[1, 3], [2, 2], [3, 1], [3, 3], [5, 0]]), (4, 4)) == pytest.approx(6.0)
    assert hypervolume(np.array([[0, 0, 0]]), (1, 2, 3)) == pytest.approx(6.0)
    # boxes of 4 and 2 overlapping in a unit cube
    assert hypervolume(np.array([[0, 0, 1], [1, 1, 0]]), (2, 2, 2)) == pytest.approx(5.0)
    assert hypervolume(np.zeros((0, 2)), (1, 1)) == 0.0


def test_hypervolume_matches_monte_carlo_in_3d():
    rng = np.random.default_rng(0)
    F = rng.uniform(0, 1, (12, 3))
    exact = hypervolume(F, (1, 1, 1))
    s = rng.uniform(0, 1, (200_000, 3))
    dominated = np.zeros(len(s), dtype=bool)
    for f in F:
        dominated |= np.all(s >= f, axis=1)
    assert exact == pytest.approx(dominated.mean(), abs=0.01)


def _pt(acc, lat, en=1.0, size=100.0, measured=None, bits=W8, method="t"):
    plan = BitPlan((("a", bits), ("b", FP32)))
    return FrontPoint(plan, acc, lat, en, size, method, measured)


def test_pick_respects_budget():
    front = [_pt(0.70, 1.0, 3.0), _pt(0.80, 2.0, 2.0), _pt(0.90, 3.0, 1.0), _pt(0.95, 4.0, 5.0)]
    assert pick(front, budget_ms=2.5).accuracy == 0.80
    assert pick(front, budget_ms=3.0).accuracy == 0.90  # the budget is inclusive
    assert pick(front, budget_ms=100).accuracy == 0.95
    assert pick(front, budget_ms=100, budget_mj=2.5).accuracy == 0.90
    assert pick(front, budget_mj=2.0).accuracy == 0.90
    with pytest.raises(NoPlanWithinBudget, match="fastest point takes 1 ms"):
        pick(front, budget_ms=0.5)
    with pytest.raises(ValueError, match="budget_ms"):
        pick(front)


def test_pick_measured_latency_and_ties():
    front = [_pt(0.9, 1.0, measured=3.0), _pt(0.8, 2.0, measured=1.5), _pt(0.8, 1.8, measured=1.9)]
    assert pick(front, budget_ms=2.0).accuracy == 0.9  # by prediction
    p = pick(front, budget_ms=2.0, use_measured=True)
    assert p.measured_ms == 1.5  # measured: 0.9 is over; the tie at 0.8 goes to the faster one


def test_pareto_front_drops_dominated_and_duplicates():
    a = _pt(0.9, 2.0, bits=W8)
    pts = [a, _pt(0.8, 3.0, bits=W4), a]  # W4 point is slower and worse: dominated (same energy/size)
    assert pareto_front(pts) == [a]


def test_front_io_round_trip(tmp_path):
    pts = [_pt(0.9, 2.0, measured=1.7), _pt(0.8, 1.0, bits=W4)]
    json_path, csv_path = save_front(pts, tmp_path / "front.json", meta={"method": "t"})
    assert load_front(json_path) == pts
    back = load_front(csv_path)
    assert [p.plan for p in back] == [p.plan for p in pts] and back[0].measured_ms == 1.7
    assert front_from_csv(front_to_csv(pts))[1].accuracy == 0.8
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"_type": "BitPlan"}))
    with pytest.raises(FrontError, match="not a ParetoFront"):
        load_front(bad)
    with pytest.raises(FrontError, match="no such front file"):
        load_front(tmp_path / "missing.json")


def test_plot_writes_png(tmp_path):
    out = plot_fronts({"a": [_pt(0.9, 2.0, measured=1.8), _pt(0.8, 1.0)], "b": [_pt(0.85, 1.5, 2.0, 50.0)]},
                      tmp_path / "f.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_pick_writes_plan_within_budget(tmp_path):
    import typer

    from hwmpq.search.pareto_cli import register

    app = typer.Typer()
    register(app)
    front = [_pt(0.70, 1.0, bits=W4), _pt(0.90, 3.0, bits=W8)]
    path = save_front(front, tmp_path / "front.json")[0]
    runner = CliRunner()
    res = runner.invoke(app, ["pareto", "pick", "--front", str(path), "--budget-ms", "2", "--out",
                              str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output
    assert load_plan(tmp_path / "plan.json") == front[0].plan
    res = runner.invoke(app, ["pareto", "pick", "--front", str(path), "--budget-ms", "0.5", "--out",
                              str(tmp_path / "p2.json")])
    assert res.exit_code == 2 and "raise the budget" in res.output
    assert not (tmp_path / "p2.json").exists()
    res = runner.invoke(app, ["pareto", "show", "--front", str(path), "--plot", str(tmp_path / "s.png")])
    assert res.exit_code == 0 and "w4a4,fp32" in res.output and (tmp_path / "s.png").is_file()
