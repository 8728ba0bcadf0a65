"""DNAS (Wu et al. 2018, FBNet-style) over the single-path supernet, and the training loop SSPS shares.

Each step: a weight step on a train batch (Gumbel-softmax mixing at temperature tau), then, after the
warm-up epochs, an architecture step on a val batch with loss ``CE + cost``. tau decays exponentially
from ``tau0`` to ``tau_min`` over the run. Cost losses:
  * ``hinge`` (default): ``CE + lam * relu(E[lat]/B - 1)`` (and the same for energy when budgeted);
  * ``mult`` (FBNet): ``CE * beta * log(E[lat in us])^gamma``; it does not know the budget, so the plan
    usually needs the repair step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import distributed
from .base import Budget, SearchInputs, SearchResult, register_strategy
from .budget import check_feasible, repair, within
from .progress import progress_bar
from .supernet import Supernet


class SearchLossError(RuntimeError):
    """The search loss became NaN or infinite; the last good supernet checkpoint is kept."""


@dataclass(frozen=True)
class SupernetSchedule:
    epochs: int = 4
    warmup_epochs: int = 1  # weight-only epochs before architecture steps start
    batch_size: int = 64
    limit_batches: int | None = None  # train batches per epoch (None: the whole split)
    w_lr: float = 5e-4  # Adam, weights and quantizer scales
    a_lr: float = 0.05  # Adam, architecture logits
    tau0: float = 5.0
    tau_min: float = 0.5
    cost_loss: str = "hinge"  # hinge | mult
    lam: float = 2.0
    beta: float = 0.2
    gamma: float = 0.6
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"search needs epochs >= 1 and 0 <= warmup_epochs < epochs: {self}")
        if self.cost_loss not in ("hinge", "mult"):
            raise ValueError(f"cost_loss must be 'hinge' or 'mult', got {self.cost_loss!r}")
        if not (self.tau0 > 0 and self.tau_min > 0 and self.w_lr > 0 and self.a_lr > 0 and self.batch_size > 0):
            raise ValueError(f"tau0, tau_min, w_lr, a_lr, batch_size must be positive: {self}")


@dataclass(frozen=True)
class DNASConfig(SupernetSchedule):
    pass


def cost_loss(ce: torch.Tensor, e_lat: torch.Tensor, e_mj: torch.Tensor, budget: Budget,
              cfg: SupernetSchedule) -> torch.Tensor:
    if cfg.cost_loss == "mult":
        cost_us = (e_lat * 1e3) if budget.latency_ms is not None else (e_mj * 1e3)
        return ce * cfg.beta * torch.log(cost_us.clamp_min(math.e)) ** cfg.gamma
    loss = ce
    if budget.latency_ms is not None:
        loss = loss + cfg.lam * F.relu(e_lat / budget.latency_ms - 1)
    if budget.energy_mj is not None:
        loss = loss + cfg.lam * F.relu(e_mj / budget.energy_mj - 1)
    return loss


def _save_checkpoint(supernet: Supernet, path: str | None, epoch: int) -> None:
    if path is None:
        return
    from hwmpq.atomic import atomic_torch_save

    atomic_torch_save({"format": "hwmpq-supernet", "epoch": epoch, "state": supernet.state_dict()}, path)


def _check_finite(loss: torch.Tensor, where: str, cfg: SupernetSchedule) -> None:
    if not torch.isfinite(loss):
        keep = (f"the last good supernet state is in {cfg.checkpoint}" if cfg.checkpoint
                else "no checkpoint was requested (--checkpoint)")
        raise SearchLossError(f"search loss became {float(loss)} at {where}; stopped ({keep}). Lower the "
                              "learning rates or check the data for NaN/inf")


StepHook = Callable[[int, Supernet], None]


def train_supernet(inputs: SearchInputs, cfg: SupernetSchedule, supernet: Supernet, *, method: str,
                   on_arch_step: StepHook | None = None) -> dict:
    """Alternate weight and architecture steps; returns the trace (per-epoch probabilities and losses)."""
    torch.manual_seed(inputs.seed)
    gen = torch.Generator().manual_seed(inputs.seed + 1)
    supernet.calibrate(inputs.splits.train.tensors[0][: cfg.batch_size])
    model = distributed.wrap(supernet)
    w_opt = torch.optim.Adam(supernet.weight_parameters(), lr=cfg.w_lr)
    a_opt = torch.optim.Adam([supernet.alpha], lr=cfg.a_lr)
    train_loader, val_iter, n_batches = distributed.loaders(inputs.splits, cfg.batch_size, cfg.limit_batches,
                                                                 inputs.seed)
    total = cfg.epochs * n_batches
    table, budget = inputs.table, inputs.budget
    trace = {"method": method, "config": cfg.__dict__, "epochs": [], "candidates": [c.label for c in table.candidates],
             "fqns": list(table.fqns), "budget_ms": budget.latency_ms, "budget_mj": budget.energy_mj}
    step = 0
    _save_checkpoint(supernet, cfg.checkpoint, 0)
    with progress_bar(inputs.progress and distributed.is_main()) as bar:
        task = bar.add_task(method, total=total, info="")
        for epoch in range(1, cfg.epochs + 1):
            ce_sum = n = 0
            for x, y in train_loader(epoch):
                tau = cfg.tau0 * (cfg.tau_min / cfg.tau0) ** (step / max(1, total - 1))
                w_opt.zero_grad(set_to_none=True)
                ce = F.cross_entropy(model(x, supernet.mixing(tau, True, gen)), y)
                _check_finite(ce, f"epoch {epoch} step {step} (weights)", cfg)
                ce.backward()
                w_opt.step()
                ce_sum, n = ce_sum + float(ce.detach()), n + 1
                if epoch > cfg.warmup_epochs:
                    xv, yv = next(val_iter)
                    a_opt.zero_grad(set_to_none=True)
                    ce_v = F.cross_entropy(model(xv, supernet.mixing(tau, True, gen)), yv)
                    e_lat, e_mj = table.expected(supernet.probs())
                    loss = cost_loss(ce_v, e_lat, e_mj, budget, cfg)
                    _check_finite(loss, f"epoch {epoch} step {step} (architecture)", cfg)
                    loss.backward()
                    a_opt.step()
                    if on_arch_step is not None:
                        on_arch_step(step, supernet)
                step += 1
                _describe(bar, task, supernet, ce_sum / n, budget)
                if n >= n_batches:
                    break
            _save_checkpoint(supernet, cfg.checkpoint, epoch)
            trace["epochs"].append(_epoch_record(supernet, epoch, tau, ce_sum / max(1, n)))
    return trace


def _describe(bar, task, supernet: Supernet, ce: float, budget: Budget) -> None:
    with torch.no_grad():
        e_lat, e_mj = supernet.table.expected(supernet.probs())
    cost = (f"E(lat) {float(e_lat):.3f} / budget {budget.latency_ms:.3f} ms" if budget.latency_ms is not None
            else f"E(energy) {float(e_mj):.3g} / budget {budget.energy_mj:.3g} mJ")
    fixed = int((supernet.fixed >= 0).sum())
    bar.update(task, advance=1, info=f"CE {ce:.3f}  {cost}  fixed {fixed}/{len(supernet.fqns)}")


def _epoch_record(supernet: Supernet, epoch: int, tau: float, ce: float) -> dict:
    with torch.no_grad():
        p = supernet.probs()
        e_lat, e_mj = supernet.table.expected(p)
    return {"epoch": epoch, "tau": tau, "train_ce": ce, "expected_ms": float(e_lat), "expected_mj": float(e_mj),
            "fixed": int((supernet.fixed >= 0).sum()), "probs": [[round(float(v), 5) for v in row] for row in p]}


def finish(inputs: SearchInputs, supernet: Supernet, idx: list[int], trace: dict, t0: float) -> SearchResult:
    """Check the plan against the budget (repair if over, and say so) and build the result."""
    table, notes, repaired = inputs.table, [], False
    if not within(table, idx, inputs.budget):
        before = table.predict_indices(idx)
        idx, steps = repair(table, idx, inputs.budget, supernet.sensitivity())
        repaired = True
        notes.append(f"argmax plan was over budget ({before[0]:.4g} ms, {before[1]:.4g} mJ); repair lowered "
                     f"{len(steps)} layer(s): " + ", ".join(f"{s.layer} {s.from_label}->{s.to_label}" for s in steps))
        trace["repair"] = [s.__dict__ for s in steps]
        for n in notes:
            inputs.log(n)
    plan = table.plan_from_indices(idx, target=table.target)
    lat, mj = table.predict_indices(idx)
    trace["plan"] = [table.candidates[i].label for i in idx]
    return SearchResult(plan=plan, predicted_ms=lat, predicted_mj=mj, trace=trace,
                        model=supernet.to_plan_model(plan), repaired=repaired, notes=notes,
                        wall_s=time.perf_counter() - t0)


@register_strategy(DNASConfig)
def dnas(inputs: SearchInputs, cfg: DNASConfig) -> SearchResult:
    t0 = time.perf_counter()
    check_feasible(inputs.table, inputs.budget)
    supernet = Supernet(inputs.model, inputs.table)
    trace = train_supernet(inputs, cfg, supernet, method="dnas")
    return finish(inputs, supernet, supernet.argmax_indices(), trace, t0)
