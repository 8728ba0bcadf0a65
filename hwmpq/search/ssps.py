"""SSPS: sequential single-path search.

The same supernet cell and loop as DNAS (Gumbel-softmax mixing, hinge budget loss), plus sequential
fixing. The SSPS paper's exact certainty rule and schedule are not public; this is the rule implemented:

* **Schedule.** Architecture steps start after ``warmup_epochs``. From then on, every ``fix_every``
  architecture steps one layer is fixed (default: spread so the last layer is fixed at the last step,
  ``fix_every = max(1, arch_steps // L)``); layers still free when training ends are fixed then, in the
  same certainty order. Every layer is fixed exactly once.
* **Certainty.** ``maxprob`` (default): the free layer with the highest max_p softmax(alpha_l)_p;
  ``entropy``: the free layer with the lowest entropy of softmax(alpha_l), normalised by log(#allowed).
  Ties go to the earlier layer.
* **Choice, budget-aware.** The layer takes its most probable candidate for which the budget can still
  be met by the cheapest completion of the free layers (by the LUT, transitions included); so the final
  plan is within budget by construction, and the repair step is only a safety net.
* A fixed layer runs its single chosen path (the others are skipped in forward and backward), so the
  supernet gets cheaper as the search proceeds; its logits leave the optimisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import distributed
from .base import SearchInputs, SearchResult, register_strategy
from .budget import cheapest_plan, check_feasible, within
from .dnas import SupernetSchedule, finish, train_supernet
from .supernet import Supernet


@dataclass(frozen=True)
class SSPSConfig(SupernetSchedule):
    fix_every: int | None = None  # architecture steps between fixings (None: spread over the run)
    certainty: str = "maxprob"  # maxprob | entropy

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.certainty not in ("maxprob", "entropy"):
            raise ValueError(f"certainty must be 'maxprob' or 'entropy', got {self.certainty!r}")
        if self.fix_every is not None and self.fix_every < 1:
            raise ValueError(f"fix_every must be >= 1, got {self.fix_every}")


def certainty(probs: np.ndarray, allowed: np.ndarray, rule: str) -> np.ndarray:
    """[L] certainty of each layer's choice (higher = more certain)."""
    if rule == "maxprob":
        return probs.max(axis=1)
    n = allowed.sum(axis=1)
    ent = -(np.where(probs > 0, probs * np.log(np.clip(probs, 1e-30, None)), 0.0)).sum(axis=1)
    return -np.where(n > 1, ent / np.log(np.maximum(n, 2)), 0.0)


def pick(probs: np.ndarray, fixed: dict[int, int], inputs: SearchInputs, rule: str) -> tuple[int, int, float]:
    """(layer, candidate, certainty) to fix next: the most certain free layer, its most probable candidate
    that keeps the budget reachable."""
    table = inputs.table
    cert = certainty(probs, table.allowed, rule)
    free = [layer for layer in range(len(table.fqns)) if layer not in fixed]
    layer = max(free, key=lambda i: (cert[i], -i))
    for p in np.argsort(-probs[layer], kind="stable"):
        if not table.allowed[layer, p]:
            continue
        trial = {**fixed, layer: int(p)}
        if within(table, cheapest_plan(table, trial), inputs.budget):
            return layer, int(p), float(cert[layer])
    return layer, int(cheapest_plan(table, fixed)[layer]), float(cert[layer])


class _Fixer:
    def __init__(self, inputs: SearchInputs, cfg: SSPSConfig, arch_steps: int) -> None:
        self.inputs, self.cfg = inputs, cfg
        n = len(inputs.table.fqns)
        self.every = cfg.fix_every or max(1, arch_steps // n)
        self.order: list[dict] = []
        self.arch_step = 0

    def fix_one(self, supernet: Supernet, step: int | str) -> None:
        fixed = {i: int(v) for i, v in enumerate(supernet.fixed.tolist()) if v >= 0}
        with torch.no_grad():
            probs = supernet.probs().numpy()
        layer, p, cert = pick(probs, fixed, self.inputs, self.cfg.certainty)
        supernet.fixed[layer] = p
        self.order.append({"step": step, "layer": supernet.fqns[layer], "candidate": supernet.candidates[p].label,
                           "certainty": round(cert, 5), "argmax": supernet.candidates[int(probs[layer].argmax())].label})

    def __call__(self, step: int, supernet: Supernet) -> None:
        self.arch_step += 1
        if self.arch_step % self.every == 0 and (supernet.fixed < 0).any():
            self.fix_one(supernet, step)


@register_strategy(SSPSConfig)
def ssps(inputs: SearchInputs, cfg: SSPSConfig) -> SearchResult:
    t0 = time.perf_counter()
    check_feasible(inputs.table, inputs.budget)
    supernet = Supernet(inputs.model, inputs.table)
    n_batches = distributed.loaders(inputs.splits, cfg.batch_size, cfg.limit_batches, inputs.seed)[2]
    fixer = _Fixer(inputs, cfg, (cfg.epochs - cfg.warmup_epochs) * n_batches)
    trace = train_supernet(inputs, cfg, supernet, method="ssps", on_arch_step=fixer)
    while (supernet.fixed < 0).any():
        fixer.fix_one(supernet, "end")
    trace["fix_every"] = fixer.every
    trace["fixing_order"] = fixer.order
    trace["certainty_rule"] = cfg.certainty
    idx = [int(v) for v in supernet.fixed.tolist()]
    return finish(inputs, supernet, idx, trace, t0)

