"""Budgets: parsing CLI text, feasibility before training, and repair of an over-budget plan.

All functions here take numbers (a LatencyTable, index lists, sensitivity arrays) and return numbers,
so tests can state the right answer (NNCF ``choose_qconfig_sequence`` style).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hwmpq.lut.table import LatencyTable
from hwmpq.records import FP32

from .base import Budget, BudgetError


def float_latency_ms(table: LatencyTable) -> tuple[float, float]:
    """(latency_ms, energy_mj) of the all-fp32 plan by the LUT (the reference of ``--budget 0.6x``)."""
    if FP32 not in table.candidates:
        raise BudgetError("--budget Nx is relative to the fp32 plan, but fp32 is not a candidate of this LUT; "
                          "give --budget-ms instead")
    k = table.candidates.index(FP32)
    if not table.allowed[:, k].all():
        bad = [f for f, ok in zip(table.fqns, table.allowed[:, k], strict=True) if not ok]
        raise BudgetError(f"the LUT has no fp32 latency for layers {bad}; give --budget-ms instead of --budget Nx")
    return table.predict_indices([k] * len(table.fqns))


def parse_budget_text(budget: str) -> tuple[str, float]:
    """("range", fraction), ("x", fraction) or ("ms", latency) from budget text (see :func:`parse_budget`),
    checked without a table, so that a malformed budget is refused before any profiling or training."""
    text = budget.strip().lower()
    try:
        if text.endswith("range"):
            kind, value = "range", float(text[: -len("range")])
        elif text.endswith("x"):
            kind, value = "x", float(text[:-1])
        else:
            kind, value = "ms", float(text.removesuffix("ms"))
    except ValueError:
        raise BudgetError(f"--budget {budget!r}: expected e.g. 0.6x (of the fp32 latency), 0.5range "
                          "(between the fastest plan and fp32) or 2.5ms") from None
    if kind == "range" and not 0 <= value <= 1:
        raise BudgetError(f"--budget {budget!r}: the range fraction must be in [0, 1]")
    if kind == "x" and not value > 0:
        raise BudgetError(f"--budget {budget!r}: the fraction must be positive")
    return kind, value


def parse_budget(table: LatencyTable, budget: str | None = None, budget_ms: float | None = None,
                 budget_mj: float | None = None) -> Budget:
    """``budget`` is ``0.6x`` (fraction of the fp32 plan's LUT latency), ``0.5range`` (that far from the
    fastest plan the LUT knows towards the fp32 plan: works on any device, whatever its int8 speed-up),
    or plain ms (``2.5``/``2.5ms``)."""
    lat = budget_ms
    if budget is not None:
        kind, value = parse_budget_text(budget)
        if budget_ms is not None:
            raise BudgetError("give either --budget or --budget-ms, not both")
        if kind == "range":
            fastest = table.predict_indices(cheapest_plan(table))[0]
            lat = fastest + value * max(0.0, float_latency_ms(table)[0] - fastest)
        elif kind == "x":
            lat = value * float_latency_ms(table)[0]
        else:
            lat = value
    return Budget(latency_ms=lat, energy_mj=budget_mj)


def cheapest_plan(table: LatencyTable, fixed: Mapping[int, int] | None = None, energy: bool = False) -> list[int]:
    """The cheapest plan the LUT knows, with layers in ``fixed`` (layer -> candidate) held.

    Exact without transitions (per-layer argmin); with transitions, per-layer argmin followed by coordinate
    descent (exact on the tables tested; in general an upper bound on the true minimum)."""
    return table.cheapest_indices(dict(fixed or {}), energy=energy)


def within(table: LatencyTable, idx: Sequence[int], budget: Budget) -> bool:
    lat, en = table.predict_indices(idx)
    return ((budget.latency_ms is None or lat <= budget.latency_ms + 1e-9)
            and (budget.energy_mj is None or en <= budget.energy_mj + 1e-9))


def check_feasible(table: LatencyTable, budget: Budget, fixed: Mapping[int, int] | None = None) -> None:
    """Refuse (before any training) a budget no plan can meet; the message gives the smallest reachable cost."""
    if budget.latency_ms is not None:
        idx = cheapest_plan(table, fixed)
        lat = table.predict_indices(idx)[0]
        if lat > budget.latency_ms + 1e-9:
            raise BudgetError(f"latency budget {budget.latency_ms:.4g} ms is infeasible on {table.target or 'this LUT'}: "
                              f"the fastest plan the LUT knows takes {lat:.4g} ms (constant {table.constant_ms:.3g} ms "
                              f"included); raise the budget to at least {lat:.4g} ms")
    if budget.energy_mj is not None:
        idx = cheapest_plan(table, fixed, energy=True)
        en = table.predict_indices(idx)[1]
        if en > budget.energy_mj + 1e-12:
            raise BudgetError(f"energy budget {budget.energy_mj:.4g} mJ is infeasible: the most frugal plan the LUT "
                              f"knows needs {en:.4g} mJ; raise the budget to at least {en:.4g} mJ")
    if budget.latency_ms is not None and budget.energy_mj is not None:
        if not within(table, cheapest_plan(table, fixed), budget) and \
                not within(table, cheapest_plan(table, fixed, energy=True), budget):
            raise BudgetError("the latency and energy budgets cannot be met by one plan the LUT knows; relax one")


@dataclass(frozen=True)
class RepairStep:
    layer: str
    from_label: str
    to_label: str
    latency_ms: float
    energy_mj: float


def _moves(table: LatencyTable, idx: list[int], budget: Budget) -> list[tuple[int, int, float]]:
    """(layer, candidate, saving) for every single-layer change that lowers the violated cost."""
    lat, en = table.predict_indices(idx)
    over_lat = budget.latency_ms is not None and lat > budget.latency_ms + 1e-9
    out = []
    for layer in range(len(table.fqns)):
        for p in np.flatnonzero(table.allowed[layer]):
            if p == idx[layer]:
                continue
            trial = list(idx)
            trial[layer] = int(p)
            t_lat, t_en = table.predict_indices(trial)
            saving = (lat - t_lat) if over_lat else (en - t_en)
            if saving > 1e-12:
                out.append((layer, int(p), saving))
    return out


def repair(table: LatencyTable, idx: Sequence[int], budget: Budget, sensitivity: np.ndarray,
           max_steps: int = 10_000) -> tuple[list[int], list[RepairStep]]:
    """Lower precision on the least sensitive layers until the plan fits ``budget``.

    ``sensitivity`` is ``[L]`` (one number per layer: the least sensitive layer is changed first, to its
    cheapest-saving next candidate) or ``[L, P]`` (estimated loss of layer l at candidate p: each step takes
    the change with the smallest sensitivity increase per ms saved). Returns the plan and the steps taken."""
    idx = [int(i) for i in idx]
    sens = np.asarray(sensitivity, dtype=float)
    if sens.shape not in ((len(table.fqns),), (len(table.fqns), len(table.candidates))):
        raise ValueError(f"sensitivity must be [L] or [L, P] for L={len(table.fqns)}, P={len(table.candidates)}; "
                         f"got {sens.shape}")
    steps: list[RepairStep] = []
    while not within(table, idx, budget):
        moves = _moves(table, idx, budget)
        if not moves:  # a local minimum (transitions make single changes cost more): the cheapest plan fits
            return _to_cheapest(table, idx, budget, steps)
        if len(steps) >= max_steps:
            raise BudgetError(f"repair took {max_steps} steps without reaching the budget")
        if sens.ndim == 1:
            # least sensitive layer first; within it, the smallest saving (the gentlest precision drop)
            layer, p, _ = min(moves, key=lambda m: (sens[m[0]], m[2]))
        else:
            layer, p, _ = min(moves, key=lambda m: ((sens[m[0], m[1]] - sens[m[0], idx[m[0]]]) / m[2], m[0]))
        old = idx[layer]
        idx[layer] = p
        lat, en = table.predict_indices(idx)
        steps.append(RepairStep(table.fqns[layer], table.candidates[old].label, table.candidates[p].label, lat, en))
    return idx, steps


def _to_cheapest(table: LatencyTable, idx: list[int], budget: Budget,
                 steps: list[RepairStep]) -> tuple[list[int], list[RepairStep]]:
    """Change every layer that differs from the cheapest plan (the one feasibility was checked against)."""
    cheap = table.cheapest_indices(energy=budget.latency_ms is None)
    if not within(table, cheap, budget):
        raise BudgetError("repair could not bring the plan within budget: even the cheapest plan the LUT knows "
                          "is over it; raise the budget")
    for layer, (old, p) in enumerate(zip(idx, cheap, strict=True)):
        if old != p:
            idx[layer] = p
            lat, en = table.predict_indices(idx)
            steps.append(RepairStep(table.fqns[layer], table.candidates[old].label, table.candidates[p].label,
                                    lat, en))
    return idx, steps
