"""The LUT latency model: formulas on hand-written rows (exact numbers), refusal of incomplete or foreign
stores, edges across merges, and a table built from a real ORT profile of a tiny model."""

import dataclasses
import hashlib
import json
import time

import numpy as np
import pytest
import torch

from hwmpq.graph import analyse
from hwmpq.lut.model import (
    ForeignTableError,
    MissingEntriesError,
    build_table,
    edges_through_merges,
    sharing_weights,
)
from hwmpq.lut.store import LutStore
from hwmpq.records import (
    FP32,
    BitPlan,
    Edge,
    LayerSpec,
    MeasureConfig,
    Measurement,
    Precision,
    RecordError,
    chains,
    pair_signature,
    pooled_shape,
)
from hwmpq.targets.base import Capabilities, DeviceInfo, TargetPrecisions
from hwmpq.zoo import create_model

W8 = Precision(8, 8)
CFG = MeasureConfig(warmup=1, repeat=5)


class TwoPrecisionTarget:
    """A target declaring fp32 and w8a8 with a stand-in, for hand-computed tables (rows are written by hand)."""

    id = "hand"
    precisions = TargetPrecisions(conv=(FP32, W8), dwconv=(FP32, W8), linear=(FP32, W8))
    capabilities = Capabilities(transitions=True)
    threads = 1

    def device(self) -> DeviceInfo:
        return DeviceInfo("hand-device")

    def transition_stand_in(self, shape):
        return LayerSpec(f"stand_in{list(shape)}", "dwconv", shape[1], shape[1], groups=shape[1],
                         in_hw=shape[2:], out_hw=shape[2:])


A = LayerSpec("a", "conv", 4, 8, (3, 3), padding=(1, 1), in_hw=(4, 4), out_hw=(4, 4))
B = LayerSpec("b", "conv", 8, 8, (1, 1), in_hw=(4, 4), out_hw=(4, 4), bias=False)
EDGE = Edge("a", "b", (1, 8, 4, 4))


def row(kind, sig, p, ms, src=None):
    return Measurement(sig, p, "hand", "hand-device", ms, config=CFG, kind=kind, src_precision=src,
                       time_unix=time.time())


@pytest.fixture
def hand_store(tmp_path):
    target = TwoPrecisionTarget()
    store = LutStore.open(tmp_path / "hand.lut", target=target.id, device=target.device())
    st = target.transition_stand_in(EDGE.tensor_shape)
    rows = [row("overhead", "overhead", FP32, 0.01),
            row("layer", A.signature, FP32, 1.01), row("layer", A.signature, W8, 0.51),
            row("layer", B.signature, FP32, 0.41), row("layer", B.signature, W8, 0.21),
            row("layer", st.signature, FP32, 0.05), row("layer", st.signature, W8, 0.04)]
    chains = {(FP32, FP32): 0.08, (W8, W8): 0.10, (FP32, W8): 0.15, (W8, FP32): 0.17}
    rows += [row("transition", EDGE.signature, d, ms, src=s) for (s, d), ms in chains.items()]
    for r in rows:
        store.add(r)
    yield store, target
    store.close()


def test_table_from_hand_rows_follows_the_documented_formulas(hand_store):
    store, target = hand_store
    table = build_table(store, [A, B], [EDGE], CFG, target)
    f, q = table.candidates.index(FP32), table.candidates.index(W8)
    np.testing.assert_allclose(table.layer_ms[0, [f, q]], [1.0, 0.5])  # minus the 0.01 ms overhead
    assert table.constant_ms == pytest.approx(0.01)
    (_, _, t), = table.transitions
    glue_f = 0.08 - 2 * 0.05 + 0.01  # negative: the chain saves a layout change the isolated rows pay
    glue_q = 0.10 - 2 * 0.04 + 0.01
    assert glue_f < 0 and t[f, f] == pytest.approx(glue_f) and t[q, q] == pytest.approx(glue_q)
    assert t[f, q] == pytest.approx(0.15 - 0.05 - 0.04 + 0.01)  # C(a, b) - S(a) - S(b) + overhead
    assert t[q, f] == pytest.approx(0.17 - 0.05 - 0.04 + 0.01)
    lat, _ = table.predict(BitPlan.from_dict({"a": W8, "b": FP32}))
    assert lat == pytest.approx(0.5 + 0.4 + t[q, f] + 0.01)


def test_transition_costs_are_shared_across_fan_out_and_fan_in(hand_store):
    """A tensor read by two layers is handed over once on the producer's side: each of its two edges
    carries 3/4 of the chain-measured cost (1/2 for the consumer's side + 1/4 of the producer's)."""
    store, target = hand_store
    c = dataclasses.replace(B, fqn="c")
    single = build_table(store, [A, B], [EDGE], CFG, target).transitions[0][2]
    fan = build_table(store, [A, B, c], [EDGE, Edge("a", "c", EDGE.tensor_shape)], CFG, target)
    assert [w for w in sharing_weights([EDGE, Edge("a", "c", EDGE.tensor_shape)]).values()] == [0.75, 0.75]
    for _, _, t in fan.transitions:
        np.testing.assert_allclose(t, 0.75 * single)


def test_a_boundary_never_earns_a_credit(tmp_path):
    """A slow spell on the homogeneous chains must not make a precision switch look free or negative."""
    target = TwoPrecisionTarget()
    st = target.transition_stand_in(EDGE.tensor_shape)
    rows = [row("overhead", "overhead", FP32, 0.01), row("layer", A.signature, FP32, 1.01),
            row("layer", A.signature, W8, 0.51), row("layer", B.signature, FP32, 0.41),
            row("layer", B.signature, W8, 0.21), row("layer", st.signature, FP32, 0.05),
            row("layer", st.signature, W8, 0.04)]
    rows += [row("transition", EDGE.signature, d, ms, src=s)
             for (s, d), ms in {(FP32, FP32): 0.08, (W8, W8): 0.07, (FP32, W8): 0.02, (W8, FP32): 0.03}.items()]
    with LutStore.open(tmp_path / "spell.lut", target=target.id, device=target.device()) as store:
        store.add_many(rows)
        table = build_table(store, [A, B], [EDGE], CFG, target)
    (_, _, t), = table.transitions
    f, q = table.candidates.index(FP32), table.candidates.index(W8)
    assert t[f, q] == 0 and t[q, f] == 0 and t[f, f] < 0


class PairTarget(TwoPrecisionTarget):
    """The hand target that times edges with their own two layers (rows are still written by hand)."""

    capabilities = Capabilities(transitions=True, pairs=True)

    def build_pair(self, *args):
        raise AssertionError("rows are written by hand")

    build_transition = build_pair


def test_an_edge_timed_with_its_own_layers_subtracts_their_rows(hand_store):
    """T[a, b] = C(a, b) - R_A(a) - R_B(b) + overhead for a pair chain of the real layers A and B; a LUT
    without pair rows (profiled before pairs, or a target without them) falls back to its stand-in chains."""
    store, _ = hand_store
    target = PairTarget()
    stand_in_table = build_table(store, [A, B], [EDGE], CFG, target)  # no pair rows yet: stand-in chains
    np.testing.assert_allclose(stand_in_table.transitions[0][2],
                               build_table(store, [A, B], [EDGE], CFG, TwoPrecisionTarget()).transitions[0][2])
    sig = pair_signature(A, B)
    pair = {(FP32, FP32): 1.30, (W8, W8): 0.80, (FP32, W8): 1.40, (W8, FP32): 0.85}
    store.add_many([row("transition", sig, d, ms, src=s) for (s, d), ms in pair.items()])
    table = build_table(store, [A, B], [EDGE], CFG, target)
    f, q = table.candidates.index(FP32), table.candidates.index(W8)
    (_, _, t), = table.transitions
    assert t[f, f] == pytest.approx(1.30 - 1.01 - 0.41 + 0.01)  # negative: shared layout change
    assert t[q, q] == pytest.approx(0.80 - 0.51 - 0.21 + 0.01)
    assert t[f, q] == pytest.approx(1.40 - 1.01 - 0.21 + 0.01)
    assert t[q, f] == pytest.approx(0.0)  # 0.85 - 0.51 - 0.41 + 0.01 < 0: a boundary earns no credit
    for (a, b), c in pair.items():  # rows + T reproduce each chain (but the clamped boundary)
        lat, _ = table.predict(BitPlan.from_dict({"a": a, "b": b}))
        if (a, b) != (W8, FP32):
            assert lat == pytest.approx(c)


def test_missing_rows_name_the_layers_and_foreign_stores_are_refused(hand_store, tmp_path):
    store, target = hand_store
    c = LayerSpec("c", "linear", 8, 3)
    with pytest.raises(MissingEntriesError, match=r"c@fp32.*hwmpq profile") as err:
        build_table(store, [A, B, c], [EDGE], CFG, target)
    assert ("c", "w8a8") in err.value.missing

    class Other(TwoPrecisionTarget):
        id = "other"

    with pytest.raises(ForeignTableError, match="target 'hand'"):
        build_table(store, [A, B], [EDGE], CFG, Other())
    build_table(store, [A, B], [EDGE], CFG, Other(), allow_foreign=True)
    with pytest.warns(UserWarning, match="transition entries are not in the LUT"):
        build_table(store, [A, B], [Edge("a", "b", (1, 8, 2, 2))], CFG, target)


@pytest.mark.slow
def test_edges_cross_residual_adds():
    model = create_model("resnet20")
    x = torch.zeros(1, 3, 32, 32)
    _, base = analyse(model, x)
    edges = edges_through_merges(model, x)
    pairs = {(e.src, e.dst) for e in edges}
    assert {(e.src, e.dst) for e in base} <= pairs
    # across the first residual add: the block's conv2 (and the stem, through the identity skip) feed the next block
    assert ("layers.0.0.conv2", "layers.0.1.conv1") in pairs and ("stem.0", "layers.0.1.conv1") in pairs
    assert ("layers.0.2.conv2", "layers.1.0.shortcut.0") in pairs
    # not through two merges: block 0.0's conv2 does not feed block 0.2 directly
    assert ("layers.0.0.conv2", "layers.0.2.conv1") not in pairs
    # the activation on an edge is the one after the last merge: resnet's ReLU follows the residual add
    act = {(e.src, e.dst): e.activation for e in edges}
    assert act[("layers.0.0.conv2", "layers.0.1.conv1")] == act[("layers.0.0.conv1", "layers.0.0.conv2")] == "relu"
    # and it says which edges pass a residual add: every edge out of a block's last conv or shortcut
    merged = {(e.src, e.dst) for e in edges if e.merge == "add"}
    assert merged == {(e.src, e.dst) for e in edges if e.src.endswith(("conv2", "shortcut.0"))} | {
        ("stem.0", "layers.0.1.conv1")}
    assert len(merged) == 14 and ("stem.0", "layers.0.0.conv1") not in merged


def test_edges_carry_the_activation_the_exported_graph_holds():
    """MobileNetV2: ReLU6 (a Clip in ONNX) after expand and depthwise convs, nothing after the linear
    bottleneck's projection (nor across its residual add)."""
    model = create_model("mobilenetv2_050")
    act = {(e.src, e.dst): e.activation for e in edges_through_merges(model, torch.zeros(1, 3, 32, 32))}
    assert act[("features.3.conv.0.0", "features.3.conv.1.0")] == "relu6"
    assert act[("features.3.conv.1.0", "features.3.conv.2")] == "relu6"
    assert act[("features.3.conv.2", "features.4.conv.0.0")] == "none"  # across the residual add
    assert act[("features.2.conv.2", "features.4.conv.0.0")] == "none"
    with pytest.raises(ValueError, match="activation 'gelu'"):
        Edge("a", "b", (1, 8), "gelu")
    with pytest.raises(ValueError, match="merge 'mul'"):
        Edge("a", "b", (1, 8), "relu", "mul")


def test_chain_signatures_carry_what_the_chain_holds_and_the_chain_version():
    """A pair chain's signature changes with its merge and max pool, and every transition signature with
    CHAIN_VERSION, so a LUT's chain rows timed on glue the exporter no longer writes are measured again."""
    plain = pair_signature(A, B, "relu6")
    assert plain == pair_signature(A, B, "relu6", "none", ()) == Edge("a", "b", (1, 8), "relu6").pair_signature(A, B)
    assert len({plain, pair_signature(A, B, "relu6", "add"), pair_signature(A, B, "relu6", pool=(3, 3, 2, 2, 1, 1)),
                pair_signature(A, B, "relu")}) == 4
    before = hashlib.sha256(json.dumps(["pair", A.signature, B.signature, "relu6"]).encode()).hexdigest()[:16]
    assert plain != before
    assert Edge("a", "b", (1, 8)).signature != hashlib.sha256(json.dumps([1, 8]).encode()).hexdigest()[:16]


def test_edge_pools_are_validated_and_chain_only_when_the_pooled_shape_matches():
    stem = LayerSpec("stem", "conv", 3, 8, kernel=(3, 3), stride=(2, 2), padding=(1, 1), in_hw=(32, 32),
                     out_hw=(16, 16), macs=1, params=1)
    nxt = LayerSpec("next", "conv", 8, 8, kernel=(3, 3), padding=(1, 1), in_hw=(8, 8), out_hw=(8, 8), macs=1, params=1)
    pool = (3, 3, 2, 2, 1, 1)
    assert pooled_shape((1, 8, 16, 16), pool) == (1, 8, 8, 8)
    assert chains(stem, nxt, Edge("stem", "next", (1, 8, 8, 8), pool=pool))
    assert not chains(stem, nxt, Edge("stem", "next", (1, 8, 8, 8)))  # a pool the edge does not describe
    assert not chains(stem, nxt, Edge("stem", "next", (1, 8, 8, 8), merge="add", pool=pool))
    with pytest.raises(RecordError, match="pool"):
        Edge("stem", "next", (1, 8, 8, 8), pool=(3, 3, 2))


@pytest.mark.slow
def test_table_from_a_real_ort_profile(tiny_ort):
    t = tiny_ort
    with pytest.raises(MissingEntriesError):
        build_table(t.store, t.specs, t.edges, CFG, t.target)
    t.profile(CFG)
    table = build_table(t.store, t.specs, t.edges, CFG, t.target)
    assert table.layer_ms.shape == (5, len(table.candidates))
    assert np.isfinite(table.layer_ms[4]).all()  # the linear layer allows every candidate
    assert np.isinf(table.layer_ms[0, table.candidates.index(Precision(4, 32))])  # conv: no w4a32
    lat, energy = table.predict(BitPlan.uniform([s.fqn for s in t.specs], W8))
    assert lat > table.constant_ms > 0 and energy > 0


def test_the_table_quotes_the_configured_statistic(tmp_path):
    target = TwoPrecisionTarget()
    rows = [Measurement("overhead", FP32, "hand", "hand-device", 0.02, p10_ms=0.01, config=CFG, kind="overhead"),
            Measurement(B.signature, FP32, "hand", "hand-device", 0.45, p10_ms=0.41, config=CFG),
            Measurement(B.signature, W8, "hand", "hand-device", 0.30, p10_ms=0.21, config=CFG)]
    with LutStore.open(tmp_path / "q.lut", target=target.id, device=target.device()) as store:
        store.add_many(rows)
        med = build_table(store, [B], [], dataclasses.replace(CFG, statistic="median"), target)
        p10 = build_table(store, [B], [], dataclasses.replace(CFG, statistic="p10"), target)
    f, q = p10.candidates.index(FP32), p10.candidates.index(W8)
    np.testing.assert_allclose(med.layer_ms[0, [f, q]], [0.43, 0.28])
    np.testing.assert_allclose(p10.layer_ms[0, [f, q]], [0.40, 0.20])
    assert (med.constant_ms, p10.constant_ms) == (pytest.approx(0.02), pytest.approx(0.01))


def test_the_session_overhead_is_required_only_from_targets_that_can_measure_it(tmp_path):
    target = TwoPrecisionTarget()  # no build_overhead (like the fake target): the constant is 0
    rows = [Measurement(B.signature, p, "hand", "hand-device", 0.3, config=CFG) for p in (FP32, W8)]
    with LutStore.open(tmp_path / "n.lut", target=target.id, device=target.device()) as store:
        store.add_many(rows)
        assert build_table(store, [B], [], CFG, target).constant_ms == 0.0

        class Measures(TwoPrecisionTarget):
            capabilities = Capabilities(transitions=True, overhead=True)

            def build_overhead(self):
                raise AssertionError("not called by build_table")

        with pytest.raises(MissingEntriesError, match="<session overhead>@fp32"):
            build_table(store, [B], [], CFG, Measures())


def test_a_boundary_never_gets_a_negative_cost(hand_store):
    # a chain row timed fast (or its homogeneous neighbours slow) would give C(a,b) - mean(C(a,a), C(b,b)) < 0;
    # a search would exploit that, so the boundary cost is clamped at 0 like the diagonal
    store, target = hand_store
    store.add(row("transition", EDGE.signature, W8, 0.01, src=FP32))
    table = build_table(store, [A, B], [EDGE], CFG, target)
    f, q = table.candidates.index(FP32), table.candidates.index(W8)
    (_, _, t), = table.transitions
    assert t[f, q] == 0.0 and t[q, f] > 0
    assert table.predict(BitPlan.from_dict({"a": FP32, "b": W8}))[0] >= 1.0 + 0.2 + 0.01
