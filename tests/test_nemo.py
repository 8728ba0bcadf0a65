"""NEMO: species resizing, selection and encodings on hand-made cases; evolution against an exhaustive
front; one real run (digits, trained test_tiny, quantized-evaluation proxy) through run_search."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from hwmpq.lut.table import LatencyTable
from hwmpq.records import FP32, Precision
from hwmpq.search.nemo import NEMOConfig, evolve, front_contribution, resize_species, run_points, select
from hwmpq.search.nemo_encodings import DirectEncoding, GraphEncoding
from hwmpq.search.pareto import hypervolume, non_dominated_sort

CANDS = (FP32, Precision(8, 8), Precision(4, 8), Precision(2, 2))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscription makes autograd 100x slower
    yield
    torch.set_num_threads(n)


def test_resize_species_hand_cases():
    assert resize_species({"a": 3, "b": 1}, total=20, min_size=4) == {"a": 13, "b": 7}
    assert resize_species({"a": 0, "b": 0}, total=20, min_size=4) == {"a": 10, "b": 10}
    assert resize_species({"a": 5, "b": 0}, total=20, min_size=4) == {"a": 16, "b": 4}  # floor protects b
    # 3 species, spare 10 split 1:1:1 -> 3.33 each; the remainder unit goes to the earliest
    assert resize_species({"a": 1, "b": 1, "c": 1}, total=16, min_size=2) == {"a": 6, "b": 5, "c": 5}
    assert sum(resize_species({"a": 0.3, "b": 0.2, "c": 0.5}, 23, 3).values()) == 23
    with pytest.raises(ValueError, match="min_size"):
        resize_species({"a": 1, "b": 1}, total=5, min_size=3)


def test_front_contribution_counts_first_front_owners():
    F = np.array([[1, 5], [2, 3], [3, 3], [3, 1], [4, 4]], dtype=float)
    owners = ["a", "a", "b", "b", "b"]
    # front: rows 0, 1, 3 -> a owns 2, b owns 1
    assert front_contribution(F, owners, ["a", "b", "c"]) == {"a": 2.0, "b": 1.0, "c": 0.0}


def test_select_prefers_rank_then_spread():
    F = np.array([[0, 4], [1, 3], [2, 2], [3, 1], [4, 0], [5, 5], [2.1, 2.1]], dtype=float)
    chosen = set(select(F, 5).tolist())
    assert chosen == {0, 1, 2, 3, 4}
    # keep 3 of the 5-point front: both ends (infinite crowding) and one middle point
    three = set(select(F[:5], 3).tolist())
    assert {0, 4} <= three and len(three) == 3


def test_direct_encoding_respects_mask_and_mutates():
    allowed = np.array([[True, True, False], [False, True, True], [True, False, False]])
    enc = DirectEncoding(allowed)
    rng = np.random.default_rng(0)
    for _ in range(50):
        g = enc.mutate(enc.crossover(enc.random(rng), enc.random(rng), rng), rng, 0.5)
        assert all(allowed[layer, c] for layer, c in enumerate(enc.decode(g)))
    assert enc.from_job([2, 0, 1]) == (0, 1, 0)  # disallowed choices fall back to the first allowed
    g = enc.random(rng)
    assert enc.mutate(g, rng, 0.0) != g or len(np.flatnonzero(allowed[0])) == 1  # rate 0 still changes one gene


def test_graph_encoding_paints_graph_neighbourhoods():
    allowed = np.ones((6, 3), dtype=bool)
    allowed[5, 2] = False
    # chain 0-1-2-3-4-5 (execution order) plus a skip edge 0->3
    enc = GraphEncoding(allowed, edges=[(0, 3)])
    assert enc.decode((0, ())) == (0,) * 6
    assert enc.decode((0, ((2, 1, 1),))) == (0, 1, 1, 1, 0, 0)
    assert enc.decode((0, ((0, 1, 2),))) == (2, 2, 0, 2, 0, 0)  # radius 1 of node 0 reaches 1 and 3
    assert enc.decode((1, ((4, 1, 2),))) == (1, 1, 1, 2, 2, 0)  # layer 5 cannot run 2: repaired to 0
    job = (0, 2, 2, 1, 0, 1)
    assert enc.decode(enc.from_job(job)) == job
    rng = np.random.default_rng(1)
    g = enc.random(rng)
    for _ in range(200):
        g = enc.mutate(enc.crossover(g, enc.random(rng), rng), rng, 0.2)
        assert len(g[1]) <= enc.max_genes
        assert all(allowed[layer, c] for layer, c in enumerate(enc.decode(g)))


def _synthetic(L=5, seed=0):
    rng = np.random.default_rng(seed)
    macs = rng.uniform(1, 5, L)
    lat = np.stack([macs * s for s in (1.0, 0.4, 0.3, 0.2)], 1)
    T = 0.1 * (1 - np.eye(4))
    table = LatencyTable(tuple(f"l{i}" for i in range(L)), CANDS, lat, lat * 0.5,
                         ((0, 1, T), (2, 3, T)), 0.5)
    sens = rng.uniform(0.01, 0.05, L)
    penalty = np.array([0.0, 0.1, 0.3, 2.0])

    def score(jobs):
        return [1 - float((sens * penalty[list(j)]).sum()) for j in jobs]

    return table, score


def test_evolve_finds_most_of_the_exhaustive_front():
    table, score = _synthetic()
    L = len(table.fqns)
    jobs = list(itertools.product(range(4), repeat=L))
    F = np.array([[1 - a, table.predict_indices(j)[0]] for j, a in zip(jobs, score(jobs), strict=True)])
    ref = (1.0, F[:, 1].max() * 1.1)
    true_hv = hypervolume(F, ref)
    cfg = NEMOConfig(population=16, generations=12, min_species_size=4, workers=0)
    run = evolve(table, [100] * L, [(0, 1), (2, 3)], score, cfg, seed=0, log=lambda _m: None)
    got = np.array([run.objectives[j][:2] for j in run.objectives])
    assert len(run.scores) < len(jobs)  # it did not just enumerate everything
    assert hypervolume(got, ref) >= 0.99 * true_hv  # seeds 0-3 measured 0.995-0.996
    # most plans it reports as its front are truly non-dominated in (error, latency, energy, size);
    # the rest are only non-dominated among what it evaluated (seeds 0-3: 78-94% true)
    full = np.array([[1 - a, *table.predict_indices(j), 100 * sum(CANDS[i].w_bits for i in j) / 8]
                     for j, a in zip(jobs, score(jobs), strict=True)])
    true_front = {jobs[i] for i in non_dominated_sort(full)[0]}
    reported = set(run.front_jobs())
    assert len(reported & true_front) >= 0.75 * len(reported)
    sizes = [h["sizes"] for h in run.history]
    assert all(sum(s.values()) == 16 and min(s.values()) >= 4 for s in sizes)
    pts = run_points(run, table)
    assert [p.latency_ms for p in pts] == sorted(p.latency_ms for p in pts)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="min_species_size"):
        NEMOConfig(population=6, species=("direct", "graph"), min_species_size=4)
    with pytest.raises(ValueError, match="distinct"):
        NEMOConfig(species=("direct", "direct"))


# ---------------------------------------------------------------- a real run


@functools.lru_cache(maxsize=1)
def trained_tiny():
    """test_tiny trained 6 epochs on digits (shared by test_ilp/test_ray_eval; callers must not modify it)."""
    from hwmpq.data import load_dataset
    from hwmpq.train import fit
    from hwmpq.zoo import create_model

    splits = load_dataset("digits")
    torch.manual_seed(0)
    model = create_model("test_tiny", in_chans=1)
    fit(model, splits, epochs=6, lr=0.1, batch_size=64, progress=False, log=lambda *_a: None)
    return model.eval(), splits


def fake_table(model, x):
    """Per-layer fake-target latencies (MACs and bits, targets/fake.py), transitions where precision changes."""
    from hwmpq.graph import analyse
    from hwmpq.targets.fake import FakeTarget, fake_latency_ms

    specs, edges = analyse(model, x)
    cands = FakeTarget.precisions.conv
    lat = np.array([[fake_latency_ms(s.macs, c.w_bits, c.a_bits, s.signature) for c in cands] for s in specs])
    pos = {s.fqn: i for i, s in enumerate(specs)}
    P = len(cands)
    trans = tuple((pos[e.src], pos[e.dst], 0.002 * (1 - np.eye(P))) for e in edges)
    return LatencyTable(tuple(s.fqn for s in specs), cands, lat, lat * 0.3, trans, 0.01, target="fake")


@pytest.mark.slow
def test_nemo_strategy_on_digits(tmp_path):
    from hwmpq.search.base import Budget, SearchInputs, run_search
    from hwmpq.search.evaluate_pool import ProxyConfig

    model, splits = trained_tiny()
    x = torch.zeros(1, 1, 8, 8)
    table = fake_table(model, x)
    fp32_ms = table.predict_indices([0] * len(table.fqns))[0]
    budget = 0.5 * (fp32_ms + table.min_latency_ms())
    cfg = NEMOConfig(population=8, generations=2, workers=0, proxy=ProxyConfig(eval_samples=300),
                     out_dir=str(tmp_path / "nemo"))
    res = run_search(SearchInputs(model, splits, table, Budget(latency_ms=budget), x, progress=False), cfg)
    assert res.predicted_ms <= budget
    assert table.predict(res.plan)[0] == pytest.approx(res.predicted_ms)
    front = res.trace["front"]
    accs = {tuple(p["plan"].values()): p["accuracy"] for p in front}
    # the fp32 plan (seeded into the population) is the float model's accuracy on the same 300 samples
    from hwmpq.search.evaluate_pool import accuracy

    vx, vy = splits.val.tensors
    fp = accuracy(model, vx[:300], vy[:300])
    assert fp > 0.8
    assert accs.get(("fp32",) * len(table.fqns), fp) == pytest.approx(fp)
    assert max(accs.values()) >= fp - 0.05 and min(accs.values()) < fp - 0.2  # w2a2-heavy plans hurt
    for name in ("front.json", "front.csv", "front.png"):
        assert (tmp_path / "nemo" / name).is_file()
    assert res.trace["evaluations"] >= 8
