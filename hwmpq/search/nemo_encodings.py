"""NEMO's genome encodings. Each species uses one; every genome decodes to a job (candidate index per
layer) that is always allowed by the LUT mask.

* ``direct``: one gene per layer (the candidate index); per-layer reset mutation, uniform crossover.
* ``graph``: an indirect, variable-length encoding over the layer graph, evolved NEAT-style. A genome
  is a default candidate plus an ordered list of *region genes* ``(node, radius, candidate)``; decoding
  starts every layer at the default and paints, gene by gene, all layers within ``radius`` hops of
  ``node`` in the layer graph (data edges plus execution-order neighbours). Structural mutations add,
  remove or perturb genes (move a gene to a graph neighbour, grow/shrink its region, change its
  candidate) and change the default; crossover aligns genes by their node (NEAT's innovation key).
  Neighbouring layers thus tend to share a precision, which the LUT's transition costs reward.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

Genome = tuple  # direct: tuple[int, ...]; graph: (default, ((node, radius, cand), ...))


def _repair(job: Sequence[int], allowed: np.ndarray) -> tuple[int, ...]:
    """Replace disallowed choices by the layer's first allowed candidate."""
    out = []
    for layer, c in enumerate(job):
        out.append(int(c) if allowed[layer, int(c)] else int(np.flatnonzero(allowed[layer])[0]))
    return tuple(out)


class DirectEncoding:
    name = "direct"

    def __init__(self, allowed: np.ndarray) -> None:
        self.allowed = np.asarray(allowed, dtype=bool)
        if not self.allowed.any(axis=1).all():
            raise ValueError("DirectEncoding: some layer has no allowed candidate in the LUT")
        self.L, self.P = self.allowed.shape

    def _rand_choice(self, layer: int, rng: np.random.Generator) -> int:
        return int(rng.choice(np.flatnonzero(self.allowed[layer])))

    def random(self, rng: np.random.Generator) -> Genome:
        return tuple(self._rand_choice(layer, rng) for layer in range(self.L))

    def from_job(self, job: Sequence[int]) -> Genome:
        return _repair(job, self.allowed)

    def decode(self, genome: Genome) -> tuple[int, ...]:
        return tuple(int(c) for c in genome)

    def mutate(self, genome: Genome, rng: np.random.Generator, rate: float) -> Genome:
        g = list(genome)
        hits = rng.random(self.L) < rate
        if not hits.any():
            hits[rng.integers(self.L)] = True
        for layer in np.flatnonzero(hits):
            g[layer] = self._rand_choice(int(layer), rng)
        return tuple(g)

    def crossover(self, a: Genome, b: Genome, rng: np.random.Generator) -> Genome:
        take = rng.random(self.L) < 0.5
        return tuple(int(x if t else y) for x, y, t in zip(a, b, take, strict=True))


class GraphEncoding:
    name = "graph"

    def __init__(self, allowed: np.ndarray, edges: Sequence[tuple[int, int]], max_genes: int | None = None,
                 max_radius: int = 3) -> None:
        self.allowed = np.asarray(allowed, dtype=bool)
        self.L, self.P = self.allowed.shape
        self.max_genes = max_genes or self.L
        self.max_radius = max_radius
        nbrs: list[set[int]] = [set() for _ in range(self.L)]
        for i, j in list(edges) + [(k, k + 1) for k in range(self.L - 1)]:
            if i != j:
                nbrs[i].add(j)
                nbrs[j].add(i)
        self.neighbours = [sorted(n) for n in nbrs]
        self._balls = [[self._ball(n, r) for r in range(max_radius + 1)] for n in range(self.L)]

    def _ball(self, node: int, radius: int) -> tuple[int, ...]:
        seen, queue = {node: 0}, deque([node])
        while queue:
            u = queue.popleft()
            if seen[u] < radius:
                for v in self.neighbours[u]:
                    if v not in seen:
                        seen[v] = seen[u] + 1
                        queue.append(v)
        return tuple(sorted(seen))

    def _gene(self, rng: np.random.Generator, node: int | None = None) -> tuple[int, int, int]:
        node = int(rng.integers(self.L)) if node is None else node
        cand = int(rng.choice(np.flatnonzero(self.allowed[node])))
        return (node, int(rng.integers(self.max_radius + 1)), cand)

    def random(self, rng: np.random.Generator) -> Genome:
        default = int(rng.integers(self.P))
        n = int(rng.integers(0, min(4, self.max_genes) + 1))
        return (default, tuple(self._gene(rng) for _ in range(n)))

    def from_job(self, job: Sequence[int]) -> Genome:
        job = _repair(job, self.allowed)
        default = int(np.bincount(job, minlength=self.P).argmax())
        return (default, tuple((layer, 0, c) for layer, c in enumerate(job) if c != default))

    def decode(self, genome: Genome) -> tuple[int, ...]:
        default, genes = genome
        job = [int(default)] * self.L
        for node, radius, cand in genes:
            for layer in self._balls[node][radius]:
                job[layer] = cand
        return _repair(job, self.allowed)

    def mutate(self, genome: Genome, rng: np.random.Generator, rate: float) -> Genome:
        default, genes = genome
        genes = list(genes)
        op = rng.choice(["add", "remove", "perturb", "default"], p=[0.35, 0.2, 0.35, 0.1])
        if op == "add" or not genes:
            if len(genes) < self.max_genes:
                genes.append(self._gene(rng))
            elif genes:
                genes[int(rng.integers(len(genes)))] = self._gene(rng)
        elif op == "remove":
            genes.pop(int(rng.integers(len(genes))))
        elif op == "perturb":
            k = int(rng.integers(len(genes)))
            node, radius, cand = genes[k]
            what = rng.integers(3)
            if what == 0 and self.neighbours[node]:
                node = int(rng.choice(self.neighbours[node]))
            elif what == 1:
                radius = int(np.clip(radius + rng.choice([-1, 1]), 0, self.max_radius))
            else:
                cand = self._gene(rng, node)[2]
            genes[k] = (node, radius, cand)
        else:
            default = int(rng.integers(self.P))
        return (int(default), tuple(genes))

    def crossover(self, a: Genome, b: Genome, rng: np.random.Generator) -> Genome:
        """NEAT-style: genes keyed by node; matching genes from either parent, the rest with p=0.5."""
        ga = {g[0]: g for g in a[1]}
        gb = {g[0]: g for g in b[1]}
        child = []
        for node in sorted(set(ga) | set(gb)):
            if node in ga and node in gb:
                child.append(ga[node] if rng.random() < 0.5 else gb[node])
            elif rng.random() < 0.5:
                child.append(ga.get(node) or gb[node])
        default = a[0] if rng.random() < 0.5 else b[0]
        return (int(default), tuple(child[: self.max_genes]))


def make_encoding(name: str, allowed: np.ndarray, edges: Sequence[tuple[int, int]]):
    if name == "direct":
        return DirectEncoding(allowed)
    if name == "graph":
        return GraphEncoding(allowed, edges)
    raise ValueError(f"unknown NEMO species encoding {name!r}; known: direct, graph")
