"""DNAS, SSPS and the supernet on test_tiny + sklearn digits with hand-made LatencyTables (real training
steps, tiny schedules). The closed loop with a real target is in test_search_loop.py."""

import json

import numpy as np
import pytest
import torch

from hwmpq.data import load_dataset
from hwmpq.graph import analyse
from hwmpq.lut.table import LatencyTable
from hwmpq.modelspec import DataShapeError
from hwmpq.records import FP32, Precision
from hwmpq.search import DNASConfig, SSPSConfig, UniformConfig, run_search
from hwmpq.search.base import Budget, SearchInputs
from hwmpq.search.budget import cheapest_plan
from hwmpq.search.dnas import SearchLossError
from hwmpq.search.ssps import certainty
from hwmpq.search.supernet import MissingLayersError, Supernet
from hwmpq.zoo.registry import create_model

CANDS = (FP32, Precision(8, 8), Precision(4, 4))
TINY = dict(epochs=2, warmup_epochs=1, batch_size=32, limit_batches=2)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def tiny_model(in_chans=1):
    torch.manual_seed(0)
    return create_model("test_tiny", in_chans=in_chans)


def hand_table(model, dw_w4_allowed=False):
    """fp32 = 1 ms, w8a8 = 0.5 ms, w4a4 = 0.3 ms per layer; the depthwise layer cannot run w4a4; a 0.1 ms
    cost on the conv1 -> conv2 edge when precisions differ; 0.2 ms constant. fp32 plan: 5.2 ms."""
    specs, _ = analyse(model, torch.zeros(1, 1, 8, 8))
    lat = np.tile([1.0, 0.5, 0.3], (len(specs), 1))
    fq = [s.fqn for s in specs]
    if not dw_w4_allowed:
        lat[fq.index("dw"), 2] = np.inf
    t = np.full((3, 3), 0.1) - np.eye(3) * 0.1
    return LatencyTable(tuple(fq), CANDS, lat, lat / 10, ((fq.index("conv1"), fq.index("conv2"), t),), 0.2,
                        target="hand")


def inputs(model, splits, table, budget_ms, **kw):
    return SearchInputs(model, splits, table, Budget(latency_ms=budget_ms), torch.zeros(1, 1, 8, 8), seed=0,
                        progress=False, log=lambda *_: None, **kw)


def test_expected_cost_gradient_reaches_alpha_and_masks_forbidden():
    model = tiny_model()
    table = hand_table(model)
    sn = Supernet(model, table)
    e_lat, _ = table.expected(sn.probs())
    assert float(e_lat.detach()) == pytest.approx(table.expected(torch.as_tensor(
        np.where(table.allowed, 1.0, 0.0) / table.allowed.sum(1, keepdims=True), dtype=torch.float32))[0].item())
    e_lat.backward()
    g = sn.alpha.grad
    assert g is not None and torch.isfinite(g).all()
    dw = table.fqns.index("dw")
    assert g[dw, 2] == 0  # forbidden candidate: no gradient
    assert (g[:, 0] > 0).all()  # raising the logit of the slowest (fp32) raises the expected latency
    assert sn.probs()[dw, 2] == 0


def test_plan_model_matches_the_supernet_single_path(digits):
    model = tiny_model()
    table = hand_table(model)
    sn = Supernet(model, table).eval()
    x = digits.train.tensors[0][:16]
    sn.calibrate(x)
    idx = [1, 2, 0, 1, 0]
    plan = table.plan_from_indices(idx)
    onehot = torch.nn.functional.one_hot(torch.tensor(idx), 3).float()
    ref = sn(x, onehot)
    qm = sn.to_plan_model(plan).eval()
    assert torch.equal(qm(x), ref)
    from hwmpq.qmodules import quant_layers

    assert sorted(quant_layers(qm)) == ["conv1", "conv2", "pw"]


@pytest.mark.slow
def test_ssps_fixes_every_layer_once_within_budget_and_reproducible(digits):
    model = tiny_model()
    table = hand_table(model)
    budget = 3.0  # fp32 5.2 ms; all w8a8 2.8 ms
    r1 = run_search(inputs(model, digits, table, budget), SSPSConfig(**TINY, fix_every=1))
    order = r1.trace["fixing_order"]
    assert sorted(o["layer"] for o in order) == sorted(table.fqns)  # each exactly once
    assert len(order) == len(table.fqns)
    assert r1.predicted_ms <= budget + 1e-9 and not r1.repaired
    assert table.predict(r1.plan)[0] == pytest.approx(r1.predicted_ms)
    r2 = run_search(inputs(model, digits, table, budget), SSPSConfig(**TINY, fix_every=1))
    assert r2.plan == r1.plan
    assert json.dumps(r2.trace["epochs"]) == json.dumps(r1.trace["epochs"])
    assert r1.model is not None and not any(p.requires_grad is False for p in r1.model.parameters())


@pytest.mark.slow
def test_dnas_plan_within_budget_with_repair_and_trace(digits):
    model = tiny_model()
    table = hand_table(model)
    budget = 2.0  # below all-w8a8: needs w4a4 somewhere
    r = run_search(inputs(model, digits, table, budget), DNASConfig(**TINY, cost_loss="mult"))
    assert r.predicted_ms <= budget + 1e-9
    assert len(r.trace["epochs"]) == 2 and len(r.trace["epochs"][0]["probs"]) == len(table.fqns)
    if r.repaired:
        assert r.trace["repair"] and "repair lowered" in r.notes[0]


def test_infeasible_budget_refused_before_training(digits):
    model = tiny_model()
    table = hand_table(model)
    lowest = table.predict_indices(cheapest_plan(table))[0]
    with pytest.raises(ValueError, match=f"takes {lowest:.4g} ms"):
        run_search(inputs(model, digits, table, lowest * 0.9), SSPSConfig(**TINY))


def test_wrong_channel_count_is_a_clear_error(digits):
    model = tiny_model(in_chans=3)
    table = hand_table(tiny_model())
    with pytest.raises(DataShapeError, match="1 channel.*expects 3"):
        run_search(inputs(model, digits, table, 3.0), DNASConfig(**TINY))


def test_lut_missing_layers_are_named():
    model = tiny_model()
    full = hand_table(model)
    keep = [i for i, f in enumerate(full.fqns) if f not in ("dw", "fc")]
    part = LatencyTable(tuple(full.fqns[i] for i in keep), CANDS, full.layer_ms[keep], full.energy_mj[keep])
    with pytest.raises(MissingLayersError, match=r"\['dw', 'fc'\].*--profile-missing"):
        Supernet(model, part)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(digits, tmp_path):
    from dataclasses import replace

    model = tiny_model()
    table = hand_table(model)
    x, y = digits.train.tensors
    bad_x = x.clone()
    bad_x[:] = float("nan")
    bad = replace(digits, train=torch.utils.data.TensorDataset(bad_x, y))
    ckpt = tmp_path / "sn.pt"
    with pytest.raises(SearchLossError, match="last good supernet state"):
        run_search(inputs(model, bad, table, 3.0), SSPSConfig(**TINY, checkpoint=str(ckpt)))
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 0 and torch.isfinite(state["state"]["alpha"]).all()


def test_uniform_baseline_keeps_unrunnable_layers_float(digits):
    model = tiny_model()
    table = hand_table(model)
    r = run_search(inputs(model, digits, table, 1.0), UniformConfig(Precision(4, 4)))
    assert r.plan["dw"] == FP32 and r.plan["conv1"] == Precision(4, 4)
    assert any("kept fp32" in n for n in r.notes) and any("over budget" in n for n in r.notes)


def test_certainty_rules():
    p = np.array([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]])
    allowed = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1]], bool)
    assert certainty(p, allowed, "maxprob").argmax() == 1
    c = certainty(p, allowed, "entropy")
    assert c.argmax() == 1 and c[0] == pytest.approx(-1.0) and c[2] == pytest.approx(-1.0)
