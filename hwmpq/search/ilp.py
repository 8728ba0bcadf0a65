"""HAWQ-V3-style integer-program baseline.

Sensitivity of layer l at candidate p (a second-order estimate of the loss increase):
    omega[l, p] = tr(H_W)/n_W * ||Q_w(W) - W||^2  +  tr(H_X)/n_X * ||Q_a(X) - X||^2
with Hessian traces of the loss w.r.t. the layer's weight (W) and input activation (X) estimated by
Hutchinson's method (E[v^T H v], Rademacher v) on a few training batches of the float model (BN in eval
mode, not folded). Q_w: per-output-channel symmetric max-abs; Q_a: per-tensor min-max (unsigned when
X >= 0), i.e. plain round-to-nearest, not the trained LSQ steps. The activation term is our addition
(HAWQ-V3 uses the weight term only): without it w4a4 and w4a8 would look equally sensitive. Negative
trace estimates (noise on flat layers) are clipped to a small positive floor.

The plan minimises sum omega under the LUT latency (and optional energy) budget, one-hot per layer, as a
MILP (scipy.optimize.milp / HiGHS); transition costs enter through y_e[p, q] >= x_i[p] + x_j[q] - 1
(exact for the product of binaries because y only appears in the budget rows with cost >= 0); the
per-model constant is subtracted from the budget. ``sweep`` solves a grid of budgets and returns the
distinct plans: the ILP's front.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix
from torch import nn

from hwmpq.data import Splits
from hwmpq.lut.table import LatencyTable

from .base import BudgetError, SearchInputs, SearchResult, register_strategy
from .evaluate_pool import ProxyConfig


@dataclass(frozen=True)
class ILPConfig:
    """``sweep_points`` budgets between the fastest plan and the unconstrained optimum form the front;
    ``evaluate_front`` scores those plans with the accuracy proxy (``workers``/``ray_address`` as NEMO)."""

    hutchinson_samples: int = 16
    batches: int = 2
    batch_size: int = 64
    activation_term: bool = True
    sweep_points: int = 12
    time_limit_s: float = 60.0
    evaluate_front: bool = True
    workers: int = 0
    ray_address: str | None = None
    proxy: ProxyConfig = ProxyConfig()
    out_dir: str | None = None

    def __post_init__(self) -> None:
        if self.hutchinson_samples < 1 or self.batches < 1 or self.batch_size < 1 or self.sweep_points < 1:
            raise ValueError(f"ILPConfig: sample, batch and sweep counts must be >= 1, got {self}")


# ---------------------------------------------------------------- sensitivity


def weight_quant_error(w: torch.Tensor, bits: int) -> float:
    """||Q(W) - W||^2 for per-output-channel symmetric round-to-nearest at ``bits`` (0 for float)."""
    if bits >= 32:
        return 0.0
    w = w.detach().float()
    qmax = 2 ** (bits - 1) - 1
    scale = w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-12) / qmax
    scale = scale.reshape(-1, *([1] * (w.dim() - 1)))
    q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale
    return float(((q - w) ** 2).sum())


def act_quant_error(x: torch.Tensor, bits: int) -> float:
    """||Q(X) - X||^2 for per-tensor min-max round-to-nearest (unsigned if X >= 0; 0 for float)."""
    if bits >= 32:
        return 0.0
    x = x.detach().float()
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0:
        lo = 0.0
    scale = max(hi - lo, 1e-12) / (2**bits - 1)
    q = torch.clamp(torch.round((x - lo) / scale), 0, 2**bits - 1) * scale + lo
    return float(((q - x) ** 2).sum())


def hutchinson_traces(model: nn.Module, fqns: tuple[str, ...], x: torch.Tensor, y: torch.Tensor,
                      samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor]]:
    """Per layer: mean Hessian diagonal (trace / numel) w.r.t. its weight and its input activation, and
    the input activations seen (for the activation error). Runs on a deep copy in eval mode."""
    import copy

    model = copy.deepcopy(model).eval()
    mods = [model.get_submodule(f) for f in fqns]
    acts: list[torch.Tensor] = [None] * len(mods)  # type: ignore[list-item]

    def hook(k):
        def fn(_m, args):
            acts[k] = args[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in enumerate(mods)]
    try:
        x = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x), y)
    finally:
        for h in handles:
            h.remove()
    weights = [m.weight for m in mods]
    tensors = weights + acts
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    acc = np.zeros(len(tensors))
    for _ in range(samples):
        vs = [torch.randint(0, 2, t.shape, generator=gen).float() * 2 - 1 for t in tensors]
        hv = torch.autograd.grad(grads, tensors, grad_outputs=vs, retain_graph=True)
        acc += np.array([float((v * h).sum()) for v, h in zip(vs, hv, strict=True)])
    per_elem = acc / samples / np.array([t.numel() for t in tensors])
    L = len(mods)
    return per_elem[:L], per_elem[L:], [a.detach() for a in acts]


def sensitivity_matrix(model: nn.Module, splits: Splits, table: LatencyTable, config: ILPConfig,
                       seed: int = 0) -> tuple[np.ndarray, dict]:
    """omega [L, P] (inf where the LUT forbids the candidate) and the traces behind it."""
    g = torch.Generator().manual_seed(seed)
    tx, ty = splits.train.tensors
    idx = torch.randperm(len(tx), generator=g)[: config.batches * config.batch_size]
    tr_w = np.zeros(len(table.fqns))
    tr_a = np.zeros(len(table.fqns))
    acts_all: list[list[torch.Tensor]] = []
    chunks = idx.split(config.batch_size)
    for b, chunk in enumerate(chunks):
        w, a, acts = hutchinson_traces(model, table.fqns, tx[chunk], ty[chunk], config.hutchinson_samples, seed + b)
        tr_w += w / len(chunks)
        tr_a += a / len(chunks)
        acts_all.append(acts)
    floor = lambda t: np.maximum(t, 1e-3 * np.median(t[t > 0]) if (t > 0).any() else 1e-12)  # noqa: E731
    tw, ta = floor(tr_w), floor(tr_a)
    omega = np.zeros(table.layer_ms.shape)
    for l_, fqn in enumerate(table.fqns):
        weight = model.get_submodule(fqn).weight
        for p, cand in enumerate(table.candidates):
            omega[l_, p] = tw[l_] * weight_quant_error(weight, cand.w_bits)
            if config.activation_term:
                # the traces are per batch-mean loss; sum errors over the batches, average over them
                err = np.mean([act_quant_error(acts[l_], cand.a_bits) for acts in acts_all])
                omega[l_, p] += ta[l_] * err
    omega[~table.allowed] = np.inf
    return omega, {"trace_w": tr_w.tolist(), "trace_a": tr_a.tolist()}


# ---------------------------------------------------------------- integer program


def solve_ilp(omega: np.ndarray, table: LatencyTable, budget_ms: float | None, budget_mj: float | None = None,
              time_limit_s: float = 60.0) -> list[int] | None:
    """Indices minimising sum omega[l, idx_l] with LUT latency <= budget_ms (and energy <= budget_mj);
    None if infeasible."""
    L, P = omega.shape
    allowed = table.allowed & np.isfinite(omega)
    n_x = L * P
    n_y = len(table.transitions) * P * P
    c = np.concatenate([np.where(allowed, omega, 0.0).ravel(), np.zeros(n_y)])
    upper = np.concatenate([allowed.ravel().astype(float), np.ones(n_y)])
    rows: list[tuple[dict[int, float], float, float]] = []  # (coeffs, lb, ub)
    for layer in range(L):
        rows.append(({layer * P + p: 1.0 for p in range(P)}, 1.0, 1.0))
    if budget_ms is not None:
        lat = {k: float(v) for k, v in enumerate(np.where(allowed, table.layer_ms, 0.0).ravel()) if v}
        for e, (i, j, t) in enumerate(table.transitions):
            for p in range(P):
                for q in range(P):
                    y = n_x + (e * P + p) * P + q
                    if np.isinf(t[p, q]):  # the pair cannot run together
                        rows.append(({i * P + p: 1.0, j * P + q: 1.0}, -np.inf, 1.0))
                        continue
                    if t[p, q] != 0:
                        lat[y] = float(t[p, q])
                        rows.append(({y: 1.0, i * P + p: -1.0, j * P + q: -1.0}, -1.0, np.inf))
                        if t[p, q] < 0:  # a saving: y must not exceed the product either
                            rows.append(({y: 1.0, i * P + p: -1.0}, -np.inf, 0.0))
                            rows.append(({y: 1.0, j * P + q: -1.0}, -np.inf, 0.0))
        rows.append((lat, -np.inf, budget_ms - table.constant_ms))
    if budget_mj is not None:
        en = np.where(allowed, table.energy_mj, 0.0).ravel()
        rows.append(({k: float(v) for k, v in enumerate(en) if v}, -np.inf, budget_mj))
    A = lil_matrix((len(rows), n_x + n_y))
    for r, (coeffs, _lb, _ub) in enumerate(rows):
        for k, v in coeffs.items():
            A[r, k] = v
    cons = LinearConstraint(A.tocsr(), [r[1] for r in rows], [r[2] for r in rows])
    res = milp(c, constraints=cons, integrality=np.concatenate([np.ones(n_x), np.zeros(n_y)]),
               bounds=Bounds(np.zeros(n_x + n_y), upper), options={"time_limit": time_limit_s})
    if res.x is None:
        return None
    return [int(v) for v in res.x[:n_x].reshape(L, P).argmax(1)]


def sweep(omega: np.ndarray, table: LatencyTable, points: int, time_limit_s: float = 60.0) -> list[list[int]]:
    """Distinct ILP plans over ``points`` latency budgets from the fastest plan to the unconstrained optimum."""
    free = solve_ilp(omega, table, None, time_limit_s=time_limit_s)
    hi = table.predict_indices(free)[0]
    lo = table.min_latency_ms()
    plans: dict[tuple[int, ...], None] = {}
    for b in np.linspace(lo, hi, points) if points > 1 else [hi]:
        idx = solve_ilp(omega, table, float(b) * (1 + 1e-9), time_limit_s=time_limit_s)
        if idx is not None:
            plans.setdefault(tuple(idx))
    plans.setdefault(tuple(free))
    return [list(p) for p in plans]


def ilp_front_points(inputs: SearchInputs, config: ILPConfig, omega: np.ndarray) -> dict:
    """The budget sweep as a front (accuracy proxy per plan when ``evaluate_front``), written to
    ``config.out_dir`` when set; returned as trace entries."""
    from hwmpq.graph import analyse

    from .evaluate_pool import Evaluator, make_context, points_from_jobs
    from .nemo import write_front_outputs
    from .pareto import pareto_front

    table = inputs.table
    jobs = [tuple(j) for j in sweep(omega, table, config.sweep_points, config.time_limit_s)]
    params = {s.fqn: s.params for s in analyse(inputs.model, inputs.example_input)[0]}
    if config.evaluate_front:
        ctx = make_context(inputs.model, inputs.splits, table.fqns, table.candidates, config.proxy, inputs.seed)
        with Evaluator(ctx, workers=config.workers, ray_address=config.ray_address) as ev:
            accs = ev.map(jobs)
    else:
        accs = [float("nan")] * len(jobs)
    pts = points_from_jobs(table, jobs, accs, [params[f] for f in table.fqns], "ilp",
                           type(inputs.model).__name__)
    front = pareto_front(pts) if config.evaluate_front else sorted(pts, key=lambda p: p.latency_ms)
    out: dict = {"front": [{"plan": {f: q.label for f, q in p.plan.layers}, "accuracy": p.accuracy,
                            "latency_ms": p.latency_ms, "energy_mj": p.energy_mj, "size_bytes": p.size_bytes}
                           for p in front], "sweep_plans": len(jobs), "evaluations": len(jobs) * config.evaluate_front}
    if config.out_dir:
        files = write_front_outputs(front, config.out_dir, "front", {"method": "ilp", "target": table.target})
        out["files"] = [str(f) for f in files]
    return out


@register_strategy(ILPConfig)
def ilp(inputs: SearchInputs, config: ILPConfig) -> SearchResult:
    t0 = time.perf_counter()
    table = inputs.table
    omega, traces = sensitivity_matrix(inputs.model, inputs.splits, table, config, inputs.seed)
    idx = solve_ilp(omega, table, inputs.budget.latency_ms, inputs.budget.energy_mj, config.time_limit_s)
    if idx is None:
        raise BudgetError(f"ILP: no plan meets the budget {inputs.budget}; the fastest plan the LUT allows takes "
                          f"{table.min_latency_ms():.4g} ms")
    lat, en = table.predict_indices(idx)
    trace = {"method": "ilp", "omega": omega.tolist(), **traces,
             "objective": float(omega[np.arange(len(idx)), idx].sum())}
    trace.update(ilp_front_points(inputs, config, omega))
    wall = time.perf_counter() - t0
    plan = table.plan_from_indices(idx, model=type(inputs.model).__name__, target=table.target, notes="ilp")
    return SearchResult(plan, lat, en, trace, None, False,
                        ["HAWQ-V3-style ILP on Hutchinson sensitivities (round-to-nearest errors)"], wall)
