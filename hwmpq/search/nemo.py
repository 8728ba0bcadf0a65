"""NEMO: multi-objective evolutionary search over bit plans, with the population split into species.

Objectives (all minimised): accuracy-proxy error (quantized evaluation, see evaluate_pool), LUT latency,
LUT energy, weight bytes. Each species evolves genomes of its own encoding (nemo_encodings: ``direct``
and ``graph``); individuals are ranked by non-dominated sorting and crowding (NSGA-II) inside their
species; after each generation every species is resized by its share of the global Pareto front
(``resize_species``), never below ``min_species_size``. The result is the front of every plan ever
evaluated; the plan returned is the most accurate one within the budget (``pareto.pick``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hwmpq.lut.table import LatencyTable

from .base import BudgetError, SearchInputs, SearchResult, register_strategy
from .evaluate_pool import Evaluator, Job, ProxyConfig, make_context
from .nemo_encodings import make_encoding
from .pareto import (
    FrontPoint,
    NoPlanWithinBudget,
    crowding_distance,
    hypervolume,
    non_dominated_sort,
    pareto_front,
    pick,
    plot_fronts,
    save_front,
)


@dataclass(frozen=True)
class NEMOConfig:
    """``population`` is the total over species; ``workers`` processes score candidates (0 = in this
    process); ``ray_address`` (``local``, ``auto``, ``ray://...``) sends them to Ray instead.
    ``out_dir``: where front.json/.csv/.png are written (None: not written)."""

    population: int = 24
    generations: int = 8
    species: tuple[str, ...] = ("direct", "graph")
    min_species_size: int = 4
    mutation_rate: float = 0.15
    crossover_prob: float = 0.7
    workers: int = 2
    ray_address: str | None = None
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    out_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.species or len(set(self.species)) != len(self.species):
            raise ValueError(f"NEMOConfig.species must name distinct encodings, got {self.species}")
        if self.min_species_size < 2 or self.population < self.min_species_size * len(self.species):
            raise ValueError(f"NEMOConfig: population {self.population} must hold min_species_size "
                             f"{self.min_species_size} (>= 2) per species ({len(self.species)})")
        if self.generations < 0 or not 0 <= self.mutation_rate <= 1 or not 0 <= self.crossover_prob <= 1:
            raise ValueError(f"NEMOConfig: generations >= 0 and rates in [0, 1] required, got {self}")


def resize_species(contribution: Mapping[str, float], total: int, min_size: int) -> dict[str, int]:
    """Sizes summing to ``total``: each species gets ``min_size`` plus a share of the rest proportional
    to its contribution to the Pareto front (equal shares if nobody contributes); largest remainder
    rounding, ties to the earlier species."""
    names = list(contribution)
    spare = total - min_size * len(names)
    if spare < 0:
        raise ValueError(f"resize_species: total {total} < {len(names)} species x min_size {min_size}")
    c = np.array([max(0.0, float(contribution[n])) for n in names])
    share = c / c.sum() if c.sum() > 0 else np.full(len(names), 1.0 / len(names))
    raw = share * spare
    base = np.floor(raw).astype(int)
    left = spare - int(base.sum())
    order = sorted(range(len(names)), key=lambda k: (-(raw[k] - base[k]), k))
    for k in order[:left]:
        base[k] += 1
    return {n: int(min_size + b) for n, b in zip(names, base, strict=True)}


def front_contribution(F: np.ndarray, owners: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """Share of the first front owned by each species; a plan held by several species (same objectives
    row index listed once per owner) splits its credit."""
    first = set(non_dominated_sort(F)[0].tolist()) if len(F) else set()
    out = dict.fromkeys(names, 0.0)
    for i in first:
        out[owners[i]] += 1.0
    return out


def select(F: np.ndarray, k: int) -> np.ndarray:
    """NSGA-II environmental selection: indices of the ``k`` best rows (rank, then crowding)."""
    chosen: list[int] = []
    for front in non_dominated_sort(F):
        if len(chosen) + len(front) <= k:
            chosen.extend(front.tolist())
        else:
            d = crowding_distance(F[front])
            chosen.extend(front[np.argsort(-d, kind="stable")[: k - len(chosen)]].tolist())
            break
    return np.array(chosen, dtype=int)


def _tournament(F: np.ndarray, rng: np.random.Generator) -> int:
    rank = np.zeros(len(F), dtype=int)
    crowd = np.zeros(len(F))
    for r, front in enumerate(non_dominated_sort(F)):
        rank[front] = r
        crowd[front] = crowding_distance(F[front])
    a, b = rng.integers(len(F), size=2)
    return int(a if (rank[a], -crowd[a]) <= (rank[b], -crowd[b]) else b)


@dataclass
class NemoRun:
    """What the evolution produced: every evaluated job with its objectives, and per-generation history."""

    scores: dict[Job, float]  # job -> accuracy
    objectives: dict[Job, np.ndarray]  # job -> [error, latency_ms, energy_mj, size_bytes]
    history: list[dict]

    def front_jobs(self) -> list[Job]:
        jobs = list(self.objectives)
        F = np.array([self.objectives[j] for j in jobs])
        return [jobs[i] for i in non_dominated_sort(F)[0]]


def evolve(table: LatencyTable, params: Sequence[int], edges: Sequence[tuple[int, int]],
           score: Callable[[list[Job]], list[float]], config: NEMOConfig, seed: int = 0,
           log: Callable[[str], None] = print) -> NemoRun:
    """The evolution itself, on numbers: ``score(jobs) -> accuracies`` is the only expensive call."""
    rng = np.random.default_rng(seed)
    enc = {s: make_encoding(s, table.allowed, edges) for s in config.species}
    w_bits = np.array([c.w_bits for c in table.candidates], dtype=float)
    params = np.asarray(params, dtype=float)
    run = NemoRun({}, {}, [])

    def evaluate(jobs: list[Job]) -> None:
        todo = list(dict.fromkeys(j for j in jobs if j not in run.scores))
        for j, acc in zip(todo, score(todo) if todo else [], strict=True):
            lat, en = table.predict_indices(j)
            run.scores[j] = float(acc)
            run.objectives[j] = np.array([1.0 - acc, lat, en, float((params * w_bits[list(j)]).sum() / 8)])

    sizes = resize_species(dict.fromkeys(config.species, 0.0), config.population, config.min_species_size)
    pop = {s: _initial(enc[s], sizes[s], table, rng) for s in config.species}
    evaluate([enc[s].decode(g) for s in pop for g in pop[s]])
    for gen in range(config.generations + 1):
        F_all, owners = _union(pop, enc, run)
        contrib = front_contribution(F_all, owners, config.species)
        run.history.append(_history_entry(gen, sizes, contrib, run, table))
        log(f"nemo gen {gen}: sizes {sizes} front share {contrib} evaluated {len(run.scores)}")
        if gen == config.generations:
            break
        sizes = resize_species(contrib, config.population, config.min_species_size)
        kids = {s: [_offspring(enc[s], pop[s], run, rng, config) for _ in range(sizes[s])] for s in pop}
        evaluate([enc[s].decode(g) for s in kids for g in kids[s]])
        for s in pop:
            merged = _unique(pop[s] + kids[s], enc[s])
            F = np.array([run.objectives[enc[s].decode(g)] for g in merged])
            pop[s] = [merged[i] for i in select(F, min(sizes[s], len(merged)))]
    return run


def _initial(enc, n: int, table: LatencyTable, rng: np.random.Generator) -> list:
    """Uniform plans first (they anchor the ends of the front), then random genomes."""
    seeds = [enc.from_job([p] * len(table.fqns)) for p in range(len(table.candidates))]
    seeds.append(enc.from_job(table.extreme_indices(fastest=True)))
    out = _unique(seeds, enc)[:n]
    while len(out) < n:
        out.append(enc.random(rng))
    return out


def _unique(genomes: list, enc) -> list:
    seen, out = set(), []
    for g in genomes:
        key = enc.decode(g)
        if key not in seen:
            seen.add(key)
            out.append(g)
    return out


def _union(pop: dict, enc: dict, run: NemoRun) -> tuple[np.ndarray, list[str]]:
    rows, owners = [], []
    for s, genomes in pop.items():
        for job in dict.fromkeys(enc[s].decode(g) for g in genomes):
            rows.append(run.objectives[job])
            owners.append(s)
    return np.array(rows), owners


def _offspring(enc, parents: list, run: NemoRun, rng: np.random.Generator, config: NEMOConfig):
    F = np.array([run.objectives[enc.decode(g)] for g in parents])
    a = parents[_tournament(F, rng)]
    if rng.random() < config.crossover_prob and len(parents) > 1:
        a = enc.crossover(a, parents[_tournament(F, rng)], rng)
    return enc.mutate(a, rng, config.mutation_rate)


def _history_entry(gen: int, sizes: dict, contrib: dict, run: NemoRun, table: LatencyTable) -> dict:
    F = np.array(list(run.objectives.values()))
    ref = (1.0, float(np.nanmax(F[:, 1])) * 1.1)
    return {"generation": gen, "sizes": dict(sizes), "front_share": dict(contrib),
            "evaluations": len(run.scores), "hypervolume_err_lat": hypervolume(F[:, :2], ref)}


def run_points(run: NemoRun, table: LatencyTable, method: str = "nemo", model_name: str = "") -> list[FrontPoint]:
    """The run's Pareto front as FrontPoints (plans named by the table's fqns)."""
    pts = []
    for j in run.front_jobs():
        o = run.objectives[j]
        plan = table.plan_from_indices(j, model=model_name, target=table.target, notes=method)
        pts.append(FrontPoint(plan, run.scores[j], float(o[1]), float(o[2]), float(o[3]), method))
    return pareto_front(pts)


def write_front_outputs(points: Sequence[FrontPoint], out_dir: str | Path, name: str = "front",
                        meta: dict | None = None) -> list[Path]:
    """front.json (plans), front.csv and front.png (accuracy vs LUT latency, energy as colour, size as area)."""
    out = Path(out_dir)
    paths = save_front(points, out / f"{name}.json", meta)
    method = points[0].method if points else "front"
    paths.append(plot_fronts({method: points}, out / f"{name}.png", title=f"{method} front ({len(points)} plans)"))
    return paths


@register_strategy(NEMOConfig)
def nemo(inputs: SearchInputs, config: NEMOConfig) -> SearchResult:
    from hwmpq.graph import analyse

    t0 = time.perf_counter()
    table = inputs.table
    specs, edges = analyse(inputs.model, inputs.example_input)
    by_fqn = {s.fqn: s for s in specs}
    missing = [f for f in table.fqns if f not in by_fqn]
    if missing:
        raise ValueError(f"NEMO: LUT layers {missing} are not quantizable layers of the model; rebuild the LUT "
                         "for this model")
    pos = {f: i for i, f in enumerate(table.fqns)}
    edge_idx = [(pos[e.src], pos[e.dst]) for e in edges if e.src in pos and e.dst in pos]
    ctx = make_context(inputs.model, inputs.splits, table.fqns, table.candidates, config.proxy, inputs.seed)
    with Evaluator(ctx, workers=config.workers, ray_address=config.ray_address) as ev:
        run = evolve(table, [by_fqn[f].params for f in table.fqns], edge_idx, ev.map, config, inputs.seed,
                     inputs.log if inputs.progress else (lambda _m: None))
        backend = ev.backend
    points = run_points(run, table, "nemo", type(inputs.model).__name__)
    try:
        chosen = pick(points, inputs.budget.latency_ms, inputs.budget.energy_mj)
    except NoPlanWithinBudget as e:
        raise BudgetError(f"NEMO: {e}") from None
    wall = time.perf_counter() - t0
    trace = {"method": "nemo", "front": [_point_dict(p) for p in points], "history": run.history,
             "evaluations": len(run.scores), "backend": backend, "wall_s": wall}
    if config.out_dir:
        files = write_front_outputs(points, config.out_dir, "front", {"method": "nemo", "target": table.target})
        trace["files"] = [str(p) for p in files]
    return SearchResult(chosen.plan, chosen.latency_ms, chosen.energy_mj, trace, None, False,
                        [f"picked the most accurate of {len(points)} front plans within the budget "
                         f"(proxy accuracy {chosen.accuracy:.4f})"], wall)


def _point_dict(p: FrontPoint) -> dict:
    return {"plan": {f: q.label for f, q in p.plan.layers}, "accuracy": p.accuracy, "latency_ms": p.latency_ms,
            "energy_mj": p.energy_mj, "size_bytes": p.size_bytes}
