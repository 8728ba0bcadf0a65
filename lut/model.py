"""From LUT store rows to the LatencyTable the searches consume: the latency model.

    plan latency = sum_l (layer_ms[l, p_l] - overhead_ms)
                 + sum_(i->j) T_e[p_i, p_j]
                 + overhead_ms

- ``layer_ms``: the isolated single-layer session, measured *in context* (integer codes in and out for
  quantized layers, so no Q/DQ of its own), minus the per-session call overhead that every isolated
  measurement carries once and a whole model pays once.
- ``T_e``: from transition rows C(a, b), the time of a two-layer chain at precisions (a, b). Where the
  edge's two layers chain as they stand, C is those two real layers joined by the edge's activation,
  residual add or max pool (targets/ort/layers.py: ``chain_model``) and T = C - R_src(a) - R_dst(b) + overhead (:func:`pair_matrix`); elsewhere C is a
  chain of stand-ins on the edge's tensor shape and S(p) the stand-in alone (a layer row;
  ``hwmpq.profilers.probes.profiling_specs`` adds the stand-ins to what is profiled;
  :func:`transition_matrix`). T holds what handing the tensor across costs beyond what the isolated
  layer rows include: DQ/ReLU/Q glue, layout changes between integer (NHWC) and float (NCHWc) kernels, lost fusions, cache effects.
- ``overhead_ms``: the overhead row (one empty session run).
- in context (lut/context.py, from the kernel rows profilers/context.py measures): each ``layer_ms[l, p]`` plus what the
  layer's kernel took more inside the model (its uniform plan at p and mixed plans) than alone.

Edges: pass :func:`edges_through_merges` (edges also across residual adds, where the exporter dequantizes
and requantizes too) for the best fidelity; ``hwmpq.graph.analyse`` edges stop at merges.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np

from hwmpq.profilers.jobs import timed_as_pair
from hwmpq.profilers.probes import SPEED_PROBES
from hwmpq.records import FP32, Edge, LayerSpec, MeasureConfig, Precision
from hwmpq.targets.base import with_precisions

from .table import LatencyTable


class MissingEntriesError(LookupError):
    """The store lacks measurements the table needs; ``missing`` lists (layer fqn, precision label)."""

    def __init__(self, missing: list[tuple[str, str]], extra: str = "") -> None:
        self.missing = missing
        shown = ", ".join(f"{f}@{p}" for f, p in missing[:12]) + (" ..." if len(missing) > 12 else "")
        super().__init__(f"the LUT has no measurement for {len(missing)} (layer, precision) pairs: {shown}. "
                         f"Run `hwmpq profile` for this model and target with the same MeasureConfig{extra}.")


class ForeignTableError(ValueError):
    """The store was measured on another device/target, or under emulation."""


def check_origin(store, target, *, allow_foreign: bool = False, allow_emulated: bool = False) -> None:
    """Refuse a store from another target or device fingerprint, or an emulated one, unless asked."""
    meta = store.meta
    problems = []
    if meta.get("target") not in (None, target.id):
        problems.append(f"it was measured for target {meta.get('target')!r}, not {target.id!r}")
    fp = target.device().fingerprint
    if meta.get("device") not in (None, fp):
        problems.append(f"its device fingerprint {meta.get('device')!r} is not this device's {fp!r}")
    if problems and not allow_foreign:
        raise ForeignTableError("refusing the LUT: " + "; ".join(problems) + ". Profile this device "
                                "(`hwmpq profile`) or pass allow_foreign=True to use it knowingly.")
    if str(meta.get("emulated", "")).lower() in ("1", "true") and not allow_emulated:
        raise ForeignTableError("refusing the LUT: it was measured under emulation (timings are not "
                                "latencies); pass allow_emulated=True for functional use only")


def _ok_latency(m, config: MeasureConfig) -> float | None:
    return m.quoted_ms(config.statistic) if m is not None else None


def _candidates(specs: Sequence[LayerSpec], target) -> tuple[Precision, ...]:
    return tuple(sorted({p for s in specs for p in target.precisions.for_layer(s)}))


def _layers(store, specs, cands, config, target, overhead_ms, allow_emulated):
    lat = np.full((len(specs), len(cands)), np.inf)
    en = np.zeros_like(lat)
    missing = []
    for i, s in enumerate(specs):
        for j, p in enumerate(cands):
            if p not in target.precisions.for_layer(s):
                continue
            m = store.get("layer", s.signature, p, config)
            if m is None:
                missing.append((s.fqn, p.label))
                continue
            if m.emulated and not allow_emulated:
                raise ForeignTableError(f"layer {s.fqn}@{p.label} was measured under emulation")
            ms = _ok_latency(m, config)
            if ms is not None:
                lat[i, j] = max(ms - overhead_ms, 0.0)
                en[i, j] = m.energy_mj or 0.0
    return lat, en, missing


def _chain_ms(store, edge: Edge, src: Precision, dst: Precision, config) -> float | None:
    return _ok_latency(store.get("transition", edge.signature, dst, config, src_precision=src), config)


def speed_rows(store, config) -> dict[str, float]:
    """{probe name: its quoted LUT latency} of the speed probes (``hwmpq.profilers.probes``) the store
    holds (a LUT profiled before a probe existed lacks its row)."""
    out = {}
    for probe in SPEED_PROBES:
        row = store.get("layer", probe.signature, FP32, config)
        if row is not None and row.ok and row.quoted_ms(config.statistic):
            out[probe.fqn] = row.quoted_ms(config.statistic)
    return out


def pair_matrix(store, src: LayerSpec, dst: LayerSpec, edge: Edge, cands, allowed_src, allowed_dst, config,
                overhead_ms: float) -> tuple[np.ndarray, int, bool]:
    """[P, P] matrix T_e of an edge timed with its own two layers, how many entries were missing, and
    whether any chain row was found (an older LUT has only stand-in chains: :func:`transition_matrix`).

    ``T[a, b] = C(a, b) - R_src(a) - R_dst(b) + overhead``, C the chain of the two real layers joined by
    ``edge``'s activation, residual add and max pool, and R their layer rows (without it), so that the rows plus T reproduce the
    chain. The diagonal keeps its sign (a chain of two float convs shares one NCHWc layout change:
    negative; DQ/activation/Q glue between integer layers: positive), bounded below by
    ``overhead - min(R_src(a), R_dst(a))``; a boundary is clamped at >= 0, as in
    :func:`transition_matrix`."""
    t = np.zeros((len(cands), len(cands)))
    sig = edge.pair_signature(src, dst)
    missing, found = 0, False
    for a in allowed_src:
        for b in allowed_dst:
            c = _ok_latency(store.get("transition", sig, b, config, src_precision=a), config)
            r_src = _ok_latency(store.get("layer", src.signature, a, config), config)
            r_dst = _ok_latency(store.get("layer", dst.signature, b, config), config)
            found |= c is not None
            if c is None or r_src is None or r_dst is None:
                missing += 1
                continue
            cost = c - r_src - r_dst + overhead_ms
            t[cands.index(a), cands.index(b)] = (max(cost, overhead_ms - min(r_src, r_dst)) if a == b
                                                 else max(cost, 0.0))
    return t, missing, found


def transition_matrix(store, edge: Edge, cands, allowed_src, allowed_dst, config, overhead_ms: float,
                      stand_in: LayerSpec | None) -> tuple[np.ndarray, int]:
    """[P, P] matrix T_e (zeros where unmeasured) and how many entries were missing.

    With stand-in rows S: ``T[a, b] = C(a, b) - S(a) - S(b) + overhead``, so that the isolated rows of
    the two layers plus T reproduce the chain. On a homogeneous edge this is the glue an isolated row
    does not include (int16 DQ/Q: positive) or pays and the chain saves (float NCHWc reorders, which
    a chain of float convs does once: negative), bounded
    below by ``overhead - S(a)`` (an edge cannot save more than a whole stand-in). A boundary is
    clamped at >= 0: a search optimises against the table, and one chain row timed in a slow spell
    once made a -0.95 ms entry, as large as a whole mobilenetv2_050, and an ILP plan predicted at
    0.26 ms against 0.97 ms for fp32. Without stand-in rows the diagonal is 0 and a boundary costs
    ``C(a, b) - (C(a, a) + C(b, b)) / 2``."""
    t = np.zeros((len(cands), len(cands)))
    missing = 0
    ps = set(allowed_src) | set(allowed_dst)
    fp = _chain_ms(store, edge, FP32, FP32, config)
    chain = {p: _chain_ms(store, edge, p, p, config) for p in ps}
    chain = {p: (c if c is not None else (fp if p.a_bits == 32 else None)) for p, c in chain.items()}
    solo = {p: _ok_latency(store.get("layer", stand_in.signature, p, config), config) for p in ps} if stand_in else {}
    has_solo = {p: chain[p] is not None and solo.get(p) is not None for p in ps}
    glue = {p: (max(chain[p] - 2 * solo[p] + overhead_ms, overhead_ms - solo[p]) if has_solo[p] else 0.0)
            for p in ps}
    for a in allowed_src:
        for b in allowed_dst:
            if a == b:
                t[cands.index(a), cands.index(a)] = glue[a]
                continue
            c = _chain_ms(store, edge, a, b, config)
            if c is None or chain[a] is None or chain[b] is None:
                missing += 1
                continue
            cost = (c - solo[a] - solo[b] + overhead_ms if has_solo[a] and has_solo[b]
                    else c - (chain[a] + chain[b]) / 2)
            t[cands.index(a), cands.index(b)] = max(cost, 0.0)
    return t, missing


def sharing_weights(edges: Sequence[Edge]) -> dict[tuple[str, str], float]:
    """Per edge, the share of its transition cost it carries: half is the producer's side (paid once
    however many layers read the tensor), half the consumer's (paid once however many producers feed it
    through a merge): ``(1 / fan_out(src) + 1 / fan_in(dst)) / 2``; 1 on a plain chain."""
    fan_out, fan_in = Counter(e.src for e in edges), Counter(e.dst for e in edges)
    return {(e.src, e.dst): 0.5 / fan_out[e.src] + 0.5 / fan_in[e.dst] for e in edges}


def build_table(store, specs: Sequence[LayerSpec], edges: Sequence[Edge], config: MeasureConfig, target, *,
                allow_foreign: bool = False, allow_emulated: bool = False, context: bool = True) -> LatencyTable:
    """The LatencyTable of ``specs`` on ``target`` from ``store`` rows measured under ``config``; with
    ``context`` (the default), each layer row plus what its kernel costs more inside the whole model than
    alone (lut/context.py), where the store holds those kernel rows.

    The candidates are the precisions the store's profiles covered (``store.precisions``: ``hwmpq profile
    --precisions``, default the target's native kernels) that have layer rows under ``config`` (a LUT
    profiled at every precision under an older protocol and at the native ones under this one offers the
    native ones), or all the target offers for a store that does not say. Raises :class:`MissingEntriesError` naming the (layer, precision) pairs without a row, and
    :class:`ForeignTableError` for a store from another device/target or an emulated one."""
    check_origin(store, target, allow_foreign=allow_foreign, allow_emulated=allow_emulated)
    if store.precisions is not None:  # and of those, the ones profiled under this protocol at all
        timed = {m.precision for m in store.measurements("layer") if m.config.key == config.key}
        target = with_precisions(target, target.precisions.restricted(set(store.precisions) & timed))
    oh = store.get("overhead", "overhead", FP32, config)
    overhead_ms = _ok_latency(oh, config)
    specs = list(specs)
    cands = _candidates(specs, target)
    lat, en, missing = _layers(store, specs, cands, config, target, overhead_ms or 0.0, allow_emulated)
    if context:
        from .context import apply_deltas, kernel_deltas

        lat = apply_deltas(lat, specs, cands, kernel_deltas(store, specs, edges, config))
    if overhead_ms is None and target.capabilities.overhead:
        missing.append(("<session overhead>", "fp32"))
    if missing:
        raise MissingEntriesError(missing)
    index = {s.fqn: i for i, s in enumerate(specs)}
    by_fqn = {s.fqn: s for s in specs}
    edges = [e for e in edges if e.src in index and e.dst in index]
    share = sharing_weights(edges)
    transitions, n_missing, n_total = [], 0, 0
    for e in edges:
        i, j = index[e.src], index[e.dst]
        allowed_i, allowed_j = target.precisions.for_layer(specs[i]), target.precisions.for_layer(specs[j])
        found = False
        if timed_as_pair(e, by_fqn, target):
            t, miss, found = pair_matrix(store, specs[i], specs[j], e, cands, allowed_i, allowed_j, config,
                                         overhead_ms or 0.0)
        if not found:
            stand_in = target.transition_stand_in(e.tensor_shape) if target.capabilities.transitions else None
            t, miss = transition_matrix(store, e, cands, allowed_i, allowed_j, config, overhead_ms or 0.0, stand_in)
        n_missing += miss
        n_total += len(allowed_i) * len(allowed_j)
        transitions.append((i, j, t * share[(e.src, e.dst)]))
    if n_missing:
        warnings.warn(f"{n_missing} of {n_total} transition entries are not in the LUT (counted as 0 ms); "
                      "run `hwmpq profile` with transitions to measure them", stacklevel=2)
    meta = store.meta
    return LatencyTable(tuple(s.fqn for s in specs), cands, lat, en, tuple(transitions), float(overhead_ms or 0.0),
                        target=target.id, device=str(meta.get("device", "")),
                        emulated=str(meta.get("emulated", "")).lower() in ("1", "true"))


def edges_through_merges(model, example_input) -> list[Edge]:
    """``analyse`` edges plus edges across merges (residual add, concat): the merged tensor counts as
    produced by the layers feeding the merge directly (not through an earlier merge), because that is
    where the exporter dequantizes the producer and requantizes for the next consumer."""
    from hwmpq.graph import QUANTIZABLE, analyse, input_activations, merge_kind, trace

    specs, base = analyse(model, example_input)
    shape_of = {s.fqn: s.input_shape for s in specs}
    gm = trace(model)
    activation = input_activations(gm)
    modules = dict(gm.named_modules())
    state: dict = {}  # node -> (the layers it counts as produced by, whether directly, the merge passed)
    out = {(e.src, e.dst): e for e in base}
    for node in gm.graph.nodes:
        feeding = [state[a] for a in node.all_input_nodes if a in state and state[a][0]]
        if node.op == "call_module" and isinstance(modules[node.target], QUANTIZABLE):
            producers, direct, merge = state.get(node.args[0], (set(), False, "none"))
            for src in sorted(producers):
                edge = Edge(src, node.target, shape_of[node.target], activation[node.target], merge)
                if direct:
                    out.setdefault((src, node.target), edge)
                else:
                    out[(src, node.target)] = edge
            state[node] = ({node.target}, True, "none")
        elif len(feeding) > 1:
            direct = [s for s, d, _ in feeding if d]
            state[node] = (set().union(*direct) if direct else feeding[0][0], False, merge_kind(node))
        elif feeding:
            state[node] = feeding[0]
        else:
            state[node] = (set(), False, "none")
    return list(out.values())
