"""SAQ's search: the generator's plans respect the LUT budget, REINFORCE follows loss and cost, and the
strategy returns the lowest-sharpness plan within budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hwmpq.lut.table import LatencyTable
from hwmpq.records import FP32, Precision
from hwmpq.search.base import Budget, SearchInputs, run_search
from hwmpq.search.saq import PlanGenerator, SAQConfig, generator_update, sample_within_budget

CANDS = (FP32, Precision(8, 8), Precision(4, 4))


pytestmark = pytest.mark.usefixtures("one_thread")


def _hand_table() -> LatencyTable:
    """4 layers x (fp32, w8a8, w4a4): 3/2/1 ms, layer 3 cannot run w4a4; +0.5 ms on edge 0->1 when the two
    layers differ in precision; energy 10x latency."""
    ms = np.array([[3.0, 2.0, 1.0]] * 3 + [[3.0, 2.0, np.inf]])
    trans = np.full((3, 3), 0.5) - 0.5 * np.eye(3)
    return LatencyTable(("a", "b", "c", "d"), CANDS, ms, ms * 10, transitions=((0, 1, trans),), target="hand")


def _by_hand_ms(idx) -> float:
    ms = [3.0, 2.0, 1.0]
    return sum(ms[i] for i in idx) + (0.5 if idx[0] != idx[1] else 0.0)


def test_sampled_plans_respect_the_budget_with_transitions():
    table, budget = _hand_table(), Budget(latency_ms=6.5)
    gen = PlanGenerator(table.allowed)
    rng = torch.Generator().manual_seed(0)
    raw = gen.sample(200, rng)[0].tolist()
    assert all(r[3] != 2 for r in raw)  # never a precision the layer cannot run
    over = sum(_by_hand_ms(r) > 6.5 for r in raw)
    assert over > 50  # the unconstrained generator does propose over-budget plans...
    plans = sample_within_budget(gen, table, budget, 200, rng)
    assert plans and len(plans) == len({tuple(p) for p in plans})
    assert all(_by_hand_ms(p) <= 6.5 for p in plans)  # ...and none of them survives
    assert any(_by_hand_ms(p) == 6.5 for p in plans)  # the boundary is inclusive
    assert sample_within_budget(gen, table, Budget(latency_ms=4.0), 50, rng) == []  # cheapest is 5 ms


def test_reinforce_follows_the_cost_target_and_the_loss():
    table = _hand_table()
    cfg = SAQConfig(lam=20.0, plans_per_step=8, generator_lr=0.1)
    gen = PlanGenerator(table.allowed)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.generator_lr)
    rng = torch.Generator().manual_seed(1)
    baseline = [None]

    def loss_of(idx):  # layer a hates w4a4; everything else is free
        return 1.0 if idx[0] == 2 else 0.0

    budget = Budget(latency_ms=7.0)
    first = generator_update(gen, opt, table, budget, loss_of, cfg, baseline, rng)
    for _ in range(200):
        last = generator_update(gen, opt, table, budget, loss_of, cfg, baseline, rng)
    probs = gen.probs().detach()
    expected = float(table.expected(probs)[0])
    assert abs(expected - 7.0) < 0.6, expected  # started at ~8.3 ms (uniform)
    assert float(probs[0, 2]) < 0.15  # the loss term steers layer a away from w4a4
    assert last["reward"] > first["reward"]


def test_energy_cost_needs_an_energy_budget():
    table = _hand_table()
    cfg = SAQConfig(energy=True)
    gen = PlanGenerator(table.allowed)
    opt = torch.optim.Adam(gen.parameters())
    with pytest.raises(ValueError, match="energy budget"):
        generator_update(gen, opt, table, Budget(latency_ms=7.0), lambda i: 0.0, cfg, [None], torch.Generator())
    rec = generator_update(gen, opt, table, Budget(energy_mj=70.0), lambda i: 0.0, cfg, [None], torch.Generator())
    assert rec["cost"] > 40  # energy units (10x latency), not ms


@pytest.mark.slow
def test_saq_search_end_to_end_on_digits():
    from hwmpq.data import load_digits
    from hwmpq.graph import layer_graph
    from hwmpq.qmodules import QuantLayer
    from hwmpq.targets.fake import fake_latency_ms
    from hwmpq.train import evaluate
    from hwmpq.zoo import create_model

    torch.manual_seed(0)
    splits = load_digits(seed=0)
    model = create_model("test_tiny", num_classes=10, in_chans=1)
    x0 = splits.train.tensors[0][:1]
    specs = layer_graph(model, x0)
    ms = np.array([[fake_latency_ms(s.macs, p.w_bits, p.a_bits, s.signature) for p in CANDS] for s in specs])
    table = LatencyTable(tuple(s.fqn for s in specs), CANDS, ms, ms * 2, target="fake")
    fp32_ms = table.predict_indices([0] * len(specs))[0]
    fastest_ms = table.predict_indices([2] * len(specs))[0]
    budget = Budget(latency_ms=fastest_ms + 0.4 * (fp32_ms - fastest_ms))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SAQConfig(warmup_steps=10, search_steps=12, final_samples=8, sharpness_batches=1, batch_size=32)
    res = run_search(SearchInputs(model, splits, table, budget, x0, seed=0, progress=False), cfg)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input model untouched
    assert table.predict(res.plan)[0] == pytest.approx(res.predicted_ms) and res.predicted_ms <= budget.latency_ms
    cands = res.trace["candidates"]
    assert cands and all(c["latency_ms"] <= budget.latency_ms + 1e-9 for c in cands)
    chosen = [c for c in cands if c["plan"] == [p.label for _, p in res.plan.layers]]
    assert chosen and chosen[0]["sharpness"] == min(c["sharpness"] for c in cands)
    assert len(res.trace["search"]) == 12 and np.isfinite([s["reward"] for s in res.trace["search"]]).all()
    quantized = {n for n, m in res.model.named_modules() if isinstance(m, QuantLayer)}
    assert quantized == {f for f, p in res.plan.layers if not p.is_float}
    assert 0.0 <= evaluate(res.model, splits.loader("val")) <= 1.0


def test_config_from_the_search_cli_options():
    cfg = SAQConfig.from_options({"epochs": 4, "warmup_epochs": 1, "limit_batches": 20, "batch_size": 32,
                                  "lam": 2.0, "a_lr": 0.05, "rho": 0.1, "checkpoint": None})
    assert (cfg.warmup_steps, cfg.search_steps, cfg.batch_size, cfg.rho) == (20, 60, 32, 0.1)
    assert cfg.lam == SAQConfig().lam  # the CLI's hinge weight means something else
    with pytest.raises(ValueError, match="SAQConfig"):
        SAQConfig(rho=0.0)
