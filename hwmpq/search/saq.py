"""SAQ's mixed-precision search (Liu et al., "Sharpness-aware Quantization for Deep Neural Networks"):
``hwmpq search --method saq`` / ``run_search(inputs, SAQConfig(...))``.

1. **One-shot supernet** (hwmpq.search.supernet, weights shared across candidates, one LSQ quantizer set per
   candidate): ``warmup_steps`` weight steps, each on a uniformly random plan, with SAM (quantizers in the
   loop) when ``sam``.
2. **Configuration generator**: a factorised categorical policy over each layer's allowed candidates,
   trained with REINFORCE (moving-average baseline). A sampled plan's cost is
   ``loss + lam * ((cost - target) / target)^2`` (reward = minus that), where loss is the supernet's
   cross-entropy at that plan on a validation batch and cost is the plan's **LUT latency** (or LUT energy
   with ``energy=True``) including transitions, never bit-ops. The squared term is normalised by the target
   so ``lam`` does not depend on the units. Each search step also takes one weight step on a generator plan.
3. **Selection**: ``final_samples`` plans are drawn from the generator (plus its mode); those within the
   budget are kept, and the one with the lowest sharpness ``L(w + eps) - L(w)`` (SAQ's perturbation of the
   quantized weights, radius ``rho``, on fixed validation batches) is returned. If no sampled plan fits,
   the mode is repaired (hwmpq.search.budget.repair, weight-error sensitivity) and the result says so.

Simplified: the paper's generator is a learned network; here it is independent per-layer logits (no
conditioning between layers). The supernet's weights are returned for the fine-tune (``result.model``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hwmpq.lut.table import LatencyTable
from hwmpq.sam import SAMStep, sharpness

from .base import Budget, SearchInputs, SearchResult, register_strategy
from .budget import check_feasible, repair, within


@dataclass(frozen=True)
class SAQConfig:
    warmup_steps: int = 60  # supernet weight steps on uniformly random plans
    search_steps: int = 120  # each: one weight step (generator plan) + one generator update
    weight_lr: float = 0.01
    generator_lr: float = 0.1
    plans_per_step: int = 4  # REINFORCE samples per generator update
    lam: float = 10.0  # weight of ((cost - target) / target)^2
    sam: bool = True  # SAM weight steps in the supernet
    rho: float = 0.05  # SAM radius, also the radius of the sharpness used for selection
    final_samples: int = 24
    sharpness_batches: int = 2
    batch_size: int = 64
    energy: bool = False  # cost = LUT energy (mJ) instead of LUT latency (ms)
    baseline_momentum: float = 0.9

    _version = 1

    def __post_init__(self) -> None:
        ints = ("warmup_steps", "search_steps", "plans_per_step", "final_samples", "sharpness_batches", "batch_size")
        bad = [n for n in ints if getattr(self, n) < (0 if n.endswith("_steps") else 1)]
        if bad or self.weight_lr <= 0 or self.generator_lr <= 0 or self.lam < 0 or self.rho <= 0 \
                or not 0 <= self.baseline_momentum < 1:
            raise ValueError(f"SAQConfig: invalid settings {bad or ''} in {self}: steps >= 0, counts >= 1, "
                             "learning rates and rho > 0, lam >= 0, 0 <= baseline_momentum < 1")


    @classmethod
    def from_options(cls, options: dict, steps_per_epoch: int = 50) -> SAQConfig:
        """From the epoch-based options of ``hwmpq search`` (epochs, warmup_epochs, limit_batches, batch_size,
        plus any SAQConfig field by name); other keys (a_lr, w_lr, cost_loss, checkpoint, ...) are ignored
        because they mean something else here. An epoch is ``limit_batches`` (else ``steps_per_epoch``) steps."""
        per_epoch = options.get("limit_batches") or steps_per_epoch
        epochs, warm = options.get("epochs", 4), options.get("warmup_epochs", 1)
        fields = {"warmup_steps": warm * per_epoch, "search_steps": max(0, epochs - warm) * per_epoch}
        if options.get("batch_size"):
            fields["batch_size"] = options["batch_size"]
        known = set(cls.__dataclass_fields__)
        fields.update({k: v for k, v in options.items() if k in known and k != "lam" and v is not None})
        return cls(**fields)




class PlanGenerator(nn.Module):
    """Per-layer categorical distributions over the candidates a layer can run (logits [L, P], masked)."""

    def __init__(self, allowed: np.ndarray) -> None:
        super().__init__()
        allowed = np.asarray(allowed, dtype=bool)
        if not allowed.any(axis=1).all():
            raise ValueError("PlanGenerator: some layer has no allowed candidate")
        self.logits = nn.Parameter(torch.zeros(allowed.shape))
        self.register_buffer("mask", torch.as_tensor(allowed))

    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits.masked_fill(~self.mask, -torch.inf), dim=1)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` plans as candidate indices [n, L] and their log-probabilities [n] (differentiable)."""
        p = self.probs()
        idx = torch.stack([torch.multinomial(p, 1, generator=generator).squeeze(1) for _ in range(n)])
        logp = torch.log(p.gather(1, idx.T).T.clamp_min(1e-30)).sum(dim=1)
        return idx, logp

    def mode(self) -> list[int]:
        return [int(i) for i in self.probs().argmax(dim=1)]

    def entropy(self) -> float:
        p = self.probs().detach()
        return float(-(p * torch.log(p.clamp_min(1e-30))).sum())


def cost_target(budget: Budget, energy: bool) -> float:
    """The cost the generator aims at: the latency budget (or the energy budget with ``energy``)."""
    target = budget.energy_mj if energy else budget.latency_ms
    if target is None:
        which = "an energy budget (--budget-mj)" if energy else "a latency budget"
        raise ValueError(f"SAQ with energy={energy} needs {which}")
    return float(target)


def plan_cost(table: LatencyTable, idx, energy: bool) -> float:
    return table.predict_indices(idx)[1 if energy else 0]


def generator_update(gen: PlanGenerator, opt: torch.optim.Optimizer, table: LatencyTable, budget: Budget,
                     loss_of: Callable[[list[int]], float], config: SAQConfig, baseline: list[float | None],
                     rng: torch.Generator) -> dict[str, float]:
    """One REINFORCE update on ``plans_per_step`` sampled plans; ``baseline`` is a one-element moving average
    (None at first), updated in place. Returns the step's mean loss, cost, penalty and reward."""
    target = cost_target(budget, config.energy)
    idx, logp = gen.sample(config.plans_per_step, rng)
    losses, costs = [], []
    for row in idx.tolist():
        losses.append(float(loss_of(row)))
        costs.append(plan_cost(table, row, config.energy))
    finite = [lo for lo in losses if np.isfinite(lo)]
    if not finite:
        return {"loss": float("nan"), "cost": float(np.mean(costs)), "penalty": float("nan"),
                "reward": float("nan"), "entropy": gen.entropy(), "skipped": 1.0}
    # a plan whose loss is not finite gets the worst finite loss of the step + 10 (keeps the logits finite)
    losses = [lo if np.isfinite(lo) else max(finite) + 10.0 for lo in losses]
    penalty = [config.lam * ((c - target) / target) ** 2 for c in costs]
    rewards = torch.tensor([-(lo + pe) for lo, pe in zip(losses, penalty, strict=True)])
    mean_r = float(rewards.mean())
    if baseline[0] is None:
        baseline[0] = mean_r
    adv = rewards - baseline[0]
    opt.zero_grad()
    (-(adv * logp).mean()).backward()
    opt.step()
    baseline[0] = config.baseline_momentum * baseline[0] + (1 - config.baseline_momentum) * mean_r
    return {"loss": float(np.mean(losses)), "cost": float(np.mean(costs)), "penalty": float(np.mean(penalty)),
            "reward": mean_r, "entropy": gen.entropy()}


def sample_within_budget(gen: PlanGenerator, table: LatencyTable, budget: Budget, n: int,
                         rng: torch.Generator) -> list[list[int]]:
    """Distinct plans among ``n`` generator samples and its mode that fit ``budget`` by the LUT."""
    with torch.no_grad():
        rows = gen.sample(n, rng)[0].tolist() + [gen.mode()]
    out: list[list[int]] = []
    for row in rows:
        if row not in out and within(table, row, budget):
            out.append([int(i) for i in row])
    return out


class _PlanView(nn.Module):
    """The supernet running one plan (one-hot mixing): an ordinary model for SAMStep, sharpness, eval."""

    def __init__(self, supernet: nn.Module, n_candidates: int) -> None:
        super().__init__()
        self.supernet, self.n = supernet, n_candidates
        self.mix: torch.Tensor | None = None

    def set_plan(self, idx) -> _PlanView:
        self.mix = F.one_hot(torch.as_tensor(list(idx)), self.n).float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.supernet(x, mix=self.mix)


def _batches(splits, split: str, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        yield from splits.loader(split, batch_size=batch_size, shuffle=True, seed=seed * 7919 + epoch)
        epoch += 1


def _random_plan(table: LatencyTable, rng: torch.Generator) -> list[int]:
    allowed = torch.as_tensor(table.allowed, dtype=torch.float)
    return torch.multinomial(allowed / allowed.sum(1, keepdim=True), 1, generator=rng).squeeze(1).tolist()


def _clip(model: nn.Module, step: int, max_norm: float = 5.0) -> None:
    """Grad transform: clip the supernet weights' gradient norm (random low-precision plans early in the
    one-shot training can produce very large LSQ gradients)."""
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)


def _weight_step(view: _PlanView, idx, batch, opt: torch.optim.Optimizer, step_fn) -> float:
    from hwmpq.train import default_step

    view.set_plan(idx)
    view.train()
    x, y = batch
    return float((step_fn or default_step)(view, x, y, opt, F.cross_entropy, [_clip]))


@torch.no_grad()
def _val_loss(view: _PlanView, idx, batch) -> float:
    view.set_plan(idx)
    view.eval()
    return float(F.cross_entropy(view(batch[0]), batch[1]))


def _select(view: _PlanView, supernet, table: LatencyTable, budget: Budget, gen: PlanGenerator,
            config: SAQConfig, batches: list, rng: torch.Generator) -> tuple[list[int], bool, list[str], list]:
    """The lowest-sharpness plan among the generator's samples within budget (or the repaired mode)."""
    plans = sample_within_budget(gen, table, budget, config.final_samples, rng)
    notes: list[str] = []
    repaired = False
    if not plans:
        idx, steps = repair(table, gen.mode(), budget, supernet.sensitivity())
        plans, repaired = [idx], True
        notes.append(f"no sampled plan fitted the budget: the generator's mode was repaired in {len(steps)} "
                     "step(s) (lowering the precision of the layers with the least weight error)")
    scored = []
    for idx in plans:
        s, loss = sharpness(view.set_plan(idx), batches, F.cross_entropy, rho=config.rho)
        lat, en = table.predict_indices(idx)
        scored.append({"plan": [table.candidates[i].label for i in idx], "sharpness": s, "loss": loss,
                       "latency_ms": lat, "energy_mj": en})
    best = int(np.argmin([c["sharpness"] for c in scored]))
    return plans[best], repaired, notes, scored


def _warm_up(view: _PlanView, table: LatencyTable, config: SAQConfig, w_opt, step_fn, train_it, rng,
             inputs: SearchInputs) -> list[float]:
    """One-shot supernet training: weight steps on uniformly random plans."""
    losses = []
    for step in range(config.warmup_steps):
        losses.append(_weight_step(view, _random_plan(table, rng), next(train_it), w_opt, step_fn))
        if inputs.progress and (step + 1) % 20 == 0:
            inputs.log(f"saq warm-up {step + 1}/{config.warmup_steps}: loss {np.mean(losses[-20:]):.3f}")
    return losses


def _search(view: _PlanView, gen: PlanGenerator, config: SAQConfig, w_opt, step_fn, train_it, val_it, rng,
            inputs: SearchInputs) -> list[dict]:
    """Alternate a weight step on a generator plan and a REINFORCE update of the generator."""
    g_opt = torch.optim.Adam(gen.parameters(), lr=config.generator_lr)
    baseline: list[float | None] = [None]
    trace = []
    for step in range(config.search_steps):
        with torch.no_grad():
            idx = gen.sample(1, rng)[0][0].tolist()
        w_loss = _weight_step(view, idx, next(train_it), w_opt, step_fn)
        batch = next(val_it)
        rec = generator_update(gen, g_opt, inputs.table, inputs.budget,
                               lambda p, b=batch: _val_loss(view, p, b), config, baseline, rng)
        trace.append({"step": step, "weight_loss": w_loss, **rec})
        if inputs.progress and (step + 1) % 20 == 0:
            inputs.log(f"saq search {step + 1}/{config.search_steps}: loss {rec['loss']:.3f} cost {rec['cost']:.4g} "
                       f"entropy {rec['entropy']:.2f}")
    return trace


@register_strategy(SAQConfig)
def saq_search(inputs: SearchInputs, config: SAQConfig) -> SearchResult:
    """Run SAQ's search (module docstring); ``inputs.model`` is not modified."""
    from .supernet import Supernet

    t0 = time.perf_counter()
    table, budget = inputs.table, inputs.budget
    cost_target(budget, config.energy)
    check_feasible(table, budget)
    torch.manual_seed(inputs.seed)
    rng = torch.Generator().manual_seed(inputs.seed)
    supernet = Supernet(inputs.model, table)
    view = _PlanView(supernet, len(table.candidates))
    w_opt = torch.optim.SGD(supernet.weight_parameters(), lr=config.weight_lr, momentum=0.9)
    step_fn = SAMStep(rho=config.rho) if config.sam else None
    gen = PlanGenerator(table.allowed)
    train_it = _batches(inputs.splits, "train", config.batch_size, inputs.seed)
    val_it = _batches(inputs.splits, "val", config.batch_size, inputs.seed + 1)
    trace: dict = {"warmup_loss": _warm_up(view, table, config, w_opt, step_fn, train_it, rng, inputs)}
    trace["search"] = _search(view, gen, config, w_opt, step_fn, train_it, val_it, rng, inputs)
    sel_batches = [next(val_it) for _ in range(config.sharpness_batches)]
    idx, repaired, notes, scored = _select(view, supernet, table, budget, gen, config, sel_batches, rng)
    trace["candidates"] = scored
    trace["generator_probs"] = gen.probs().detach().tolist()
    plan = table.plan_from_indices(idx, notes="saq")
    lat, en = table.predict_indices(idx)
    return SearchResult(plan, lat, en, trace, model=supernet.to_plan_model(plan), repaired=repaired, notes=notes,
                        wall_s=time.perf_counter() - t0)
