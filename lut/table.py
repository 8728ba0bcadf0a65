"""The tensor form of a LUT that the searches consume, and whole-plan prediction.

A plan's latency is modelled as (DESIGN.md, "The LUT"):
    sum_l  layer_ms[l, p_l]  +  sum_(i->j) transition_ms[e][p_i, p_j]  +  constant_ms
and its expectation under independent per-layer distributions P_l is
    sum_l P_l . layer_ms[l]  +  sum_e P_i^T T_e P_j  +  constant_ms
which is differentiable in the distributions. Energy has the same form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hwmpq.records import BitPlan, Precision


@dataclass(frozen=True)
class LatencyTable:
    """Per-layer costs over one candidate list shared by all layers.

    ``layer_ms[l, p]`` is ``inf`` where layer l cannot run candidate p (the search masks it out).
    ``transitions`` holds (src index, dst index, [P, P] ms matrix) per edge; ``energy_mj`` mirrors
    ``layer_ms`` (``transition_mj`` likewise, zero when not modelled)."""

    fqns: tuple[str, ...]
    candidates: tuple[Precision, ...]
    layer_ms: np.ndarray  # [L, P]
    energy_mj: np.ndarray  # [L, P]
    transitions: tuple[tuple[int, int, np.ndarray], ...] = ()
    constant_ms: float = 0.0
    target: str = ""
    device: str = ""
    emulated: bool = False

    def __post_init__(self) -> None:
        L, P = len(self.fqns), len(self.candidates)
        if self.layer_ms.shape != (L, P) or self.energy_mj.shape != (L, P):
            raise ValueError(f"LatencyTable: expected [{L}, {P}] arrays, got {self.layer_ms.shape} "
                             f"and {self.energy_mj.shape}")
        for i, j, t in self.transitions:
            if t.shape != (P, P) or not (0 <= i < L and 0 <= j < L):
                raise ValueError(f"LatencyTable: bad transition ({i}, {j}) of shape {t.shape}")

    @property
    def allowed(self) -> np.ndarray:
        """[L, P] boolean mask of candidates each layer can run."""
        return np.isfinite(self.layer_ms)

    def index(self, plan: BitPlan) -> list[int]:
        plan.validate_against(self.fqns)
        d = plan.as_dict()
        out = []
        for f in self.fqns:
            if d[f] not in self.candidates:
                raise ValueError(f"layer {f!r}: {d[f].label} is not a candidate {[c.label for c in self.candidates]}")
            out.append(self.candidates.index(d[f]))
        return out

    def plan_from_indices(self, idx, **kw) -> BitPlan:
        return BitPlan(tuple((f, self.candidates[int(i)]) for f, i in zip(self.fqns, idx, strict=True)), **kw)

    def predict_indices(self, idx) -> tuple[float, float]:
        """(latency_ms, energy_mj) of the plan choosing candidate ``idx[l]`` for layer l."""
        idx = np.asarray(idx, dtype=int)
        rows = np.arange(len(self.fqns))
        lat = float(self.layer_ms[rows, idx].sum()) + self.constant_ms
        lat += sum(float(t[idx[i], idx[j]]) for i, j, t in self.transitions)
        return lat, float(self.energy_mj[rows, idx].sum())

    def predict(self, plan: BitPlan) -> tuple[float, float]:
        return self.predict_indices(self.index(plan))

    def expected(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable expected (latency_ms, energy_mj) for per-layer probabilities ``probs`` [L, P]
        (rows sum to 1, zero where not allowed)."""
        lat_t = torch.as_tensor(np.where(self.allowed, self.layer_ms, 0.0), dtype=probs.dtype)
        en_t = torch.as_tensor(np.where(self.allowed, self.energy_mj, 0.0), dtype=probs.dtype)
        lat = (probs * lat_t).sum() + self.constant_ms
        for i, j, t in self.transitions:
            tt = torch.as_tensor(np.nan_to_num(t, posinf=0.0), dtype=probs.dtype)
            lat = lat + probs[i] @ tt @ probs[j]
        return lat, (probs * en_t).sum()

    def extreme_indices(self, fastest: bool = True, energy: bool = False) -> list[int]:
        """Per-layer argmin (or argmax) of the layer cost alone (transitions ignored)."""
        cost = self.energy_mj if energy else self.layer_ms
        masked = np.where(self.allowed, cost, np.inf if fastest else -np.inf)
        return list((masked.argmin(axis=1) if fastest else masked.argmax(axis=1)).astype(int))

    def cheapest_indices(self, fixed: dict[int, int] | None = None, energy: bool = False) -> list[int]:
        """The cheapest plan the table knows (latency, or energy), layers in ``fixed`` (layer -> candidate)
        held: coordinate descent on the full prediction, transitions included, from the per-layer argmin
        and from the cheapest uniform plan (a candidate where allowed, else the layer's argmin), the better
        result. Exact without transitions; with them an upper bound on the true minimum, never above a
        uniform plan (from the per-layer argmin alone, descent once stopped above the fp32 plan on a table
        whose boundaries cost more than the int8 rows saved)."""
        pos = 1 if energy else 0
        fixed = dict(fixed or {})
        base = [int(i) for i in self.extreme_indices(fastest=True, energy=energy)]
        uniform = [[fixed.get(k, p if self.allowed[k, p] else base[k]) for k in range(len(self.fqns))]
                   for p in range(len(self.candidates))]
        best_uniform = min(uniform, key=lambda idx: self.predict_indices(idx)[pos])
        runs = [self._descend(start, fixed, pos) for start in (base, best_uniform)]
        return min(runs, key=lambda idx: self.predict_indices(idx)[pos])

    def _descend(self, idx: list[int], fixed: dict[int, int], pos: int) -> list[int]:
        """Coordinate descent from ``idx`` (``fixed`` layers held): change one layer at a time while the
        prediction (latency: ``pos`` 0, energy: 1) falls."""
        idx = list(idx)
        for layer, p in fixed.items():
            idx[layer] = int(p)
        best = self.predict_indices(idx)[pos]
        improved = True
        while improved:
            improved = False
            for layer in (k for k in range(len(self.fqns)) if k not in fixed):
                for p in np.flatnonzero(self.allowed[layer]):
                    trial = list(idx)
                    trial[layer] = int(p)
                    cost = self.predict_indices(trial)[pos]
                    if cost < best - 1e-12:
                        best, idx, improved = cost, trial, True
        return idx

    def min_latency_ms(self) -> float:
        """Smallest reachable latency (see :meth:`cheapest_indices`)."""
        return self.predict_indices(self.cheapest_indices())[0]
