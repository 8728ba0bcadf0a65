"""Measurement jobs: what a profile of one model on one target has to time, each unique thing once.

Three kinds (DESIGN.md, "The LUT"): a ``layer`` job per unique (layer signature, precision the target
runs for that layer); ``transition`` jobs, the cost of handing a tensor from one layer to the next; one
``overhead`` job, the per-model constant (only if the target has ``build_overhead``).

A transition is timed as a two-layer chain at every (producer precision, consumer precision) pair. Where
the target has ``build_pair`` and the edge's two layers chain as they stand, the chain is those two layers
joined by the edge's own activation, after a residual add if the edge passes one (one job per unique
(layer pair, activation, merge, precision pair), signature :func:`hwmpq.records.pair_signature`): the
boundary costs what it costs between *these* layers (a large expanded tensor into a depthwise conv is not
a small one between two 3x3 convs; a ReLU6 fused into a float conv costs it far more than a ReLU; a float
add between integer layers costs a pass over the tensor and keeps ORT from folding the ReLU into the Q). Otherwise (pooling or a reshape between, or a target
with only ``build_transition``) it is a chain of the target's stand-in layers on the edge's tensor shape
joined by a ReLU, one job per unique (tensor shape, precision pair).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from hwmpq.records import FP32, BuildResult, Edge, LayerSpec, Precision, chains

OVERHEAD_SIGNATURE = "overhead"


@dataclass(frozen=True)
class MeasureJob:
    """One thing to time. ``precision`` is the layer's (for a transition: the consumer's), ``src_precision``
    the producer's (transitions only); ``spec`` is set for layer jobs, ``shape`` for transitions, and for
    a transition timed with its own layers ``src_spec`` and ``spec`` are the producer and consumer."""

    kind: str  # layer | transition | overhead
    signature: str
    precision: Precision
    src_precision: Precision | None = None
    spec: LayerSpec | None = None
    shape: tuple[int, ...] | None = None
    src_spec: LayerSpec | None = None
    activation: str = "relu"  # the edge's (pair chains only)
    merge: str = "none"  # the edge's merge (pair chains only): "add" chains through a residual add
    pool: tuple[int, ...] = ()  # the edge's max pool (pair chains only): ``Edge.pool``
    fqns: tuple[str, ...] = ()  # the model's layers (or edges "src->dst") this job stands for

    @property
    def label(self) -> str:
        if self.kind == "layer":
            s = self.spec
            what = f"{s.kind} {s.in_channels}->{s.out_channels} k{s.kernel[0]} s{s.stride[0]} {s.in_hw[0]}x{s.in_hw[1]}"
            return f"layer {what} @ {self.precision.label} ({self.fqns[0]})"
        if self.kind == "transition":
            what = ("x".join(map(str, self.shape or ())) if self.src_spec is None
                    else f"{self.src_spec.fqn}-{'add-' if self.merge == 'add' else ''}{self.activation}-"
                         f"{'maxpool-' if self.pool else ''}>"
                         f"{self.spec.fqn}")
            return f"transition {what} {self.src_precision.label}->{self.precision.label}"
        return "per-model overhead"

    @property
    def description(self) -> str:
        """What the signature stands for, as stored in the LUT's shapes table."""
        if self.kind == "layer":
            return json.dumps(self.spec.shape_fields, sort_keys=True)
        if self.kind == "transition" and self.src_spec is not None:
            return json.dumps({"pair": [self.src_spec.shape_fields, self.spec.shape_fields],
                               "activation": self.activation}
                              | ({"merge": self.merge} if self.merge != "none" else {})
                              | ({"maxpool": list(self.pool)} if self.pool else {}), sort_keys=True)
        if self.kind == "transition":
            return json.dumps({"tensor_shape": list(self.shape or ())})
        return json.dumps({"overhead": True})

    def build(self, target) -> BuildResult:
        """Ask ``target`` to build this job (a target error surfaces as BuildResult.error_msg)."""
        try:
            if self.kind == "layer":
                return target.build_layer(self.spec, self.precision)
            if self.kind == "transition" and self.src_spec is not None:
                return target.build_pair(self.src_spec, self.src_precision, self.spec, self.precision,
                                         self.activation, self.merge, self.pool)
            if self.kind == "transition":
                return target.build_transition(self.shape, self.src_precision, self.precision)
            return target.build_overhead()
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # a backend bug on one job is data, not the end of a long profile
            return BuildResult(None, f"build raised {type(e).__name__}: {e}")


def timed_as_pair(edge: Edge, by_fqn: dict[str, LayerSpec], target) -> bool:
    """Whether ``edge``'s transition is timed with its own two layers (else with stand-ins)."""
    return target.capabilities.pairs and chains(by_fqn[edge.src], by_fqn[edge.dst], edge)


def plan_jobs(specs: Sequence[LayerSpec], edges: Sequence[Edge], target, *,
              transitions: bool = True) -> list[MeasureJob]:
    """Unique jobs in a stable order: overhead; then, walking the layers in execution order, each layer's
    jobs followed by the pair-chain jobs of the edges into it; then per remaining edge tensor shape its
    stand-in's layer jobs followed by its stand-in chain jobs.

    A transition cost is a chain time minus the two layer rows in it (lut/model.py): a small difference
    of large numbers. So a chain is measured right after the rows it is compared with, in the same or the
    next chunk of interleaved rounds, and a drift of the machine's speed over a long profile does not
    enter the difference."""
    jobs: list[MeasureJob] = []
    if target.capabilities.overhead:
        jobs.append(MeasureJob("overhead", OVERHEAD_SIGNATURE, FP32))
    layer_jobs: dict[str, list[MeasureJob]] = {}
    by_fqn = {s.fqn: s for s in specs}
    for spec in specs:
        mine = layer_jobs.setdefault(spec.signature, [])
        for p in target.precisions.for_layer(spec):
            at = next((i for i, j in enumerate(mine) if j.precision == p), None)
            if at is None:
                mine.append(MeasureJob("layer", spec.signature, p, spec=spec, fqns=(spec.fqn,)))
            else:
                old = mine[at]
                mine[at] = MeasureJob("layer", old.signature, p, spec=old.spec, fqns=old.fqns + (spec.fqn,))
    if not (transitions and target.capabilities.transitions):
        return jobs + [j for mine in layer_jobs.values() for j in mine]
    for e in edges:
        if e.src not in by_fqn or e.dst not in by_fqn:
            raise ValueError(f"edge {e.src}->{e.dst} names a layer that is not in the layer list")
    paired = [e for e in edges if timed_as_pair(e, by_fqn, target)]
    loose = [e for e in edges if not timed_as_pair(e, by_fqn, target)]
    pairs = _transition_jobs(paired, by_fqn, target, as_pair=True)
    trans = _transition_jobs(loose, by_fqn, target, as_pair=False)
    shapes = list(dict.fromkeys(j.shape for j in trans))
    stand_in = {shape: target.transition_stand_in(shape).signature for shape in shapes}
    placed: set[str] = set(stand_in.values())
    placed_pairs: set[str] = set()
    for spec in specs:
        if spec.signature not in placed:
            placed.add(spec.signature)
            jobs += layer_jobs[spec.signature]
        for e in paired:
            sig = e.pair_signature(by_fqn[e.src], by_fqn[e.dst])
            if e.dst == spec.fqn and sig not in placed_pairs:
                placed_pairs.add(sig)
                jobs += [j for j in pairs if j.signature == sig]
    placed_shapes: set = set()
    for shape in shapes:
        if shape in stand_in and stand_in[shape] not in placed_shapes:
            placed_shapes.add(stand_in[shape])
            jobs += layer_jobs.get(stand_in[shape], [])
        jobs += [j for j in trans if j.shape == shape]
    return jobs


def _transition_jobs(edges: Sequence[Edge], by_fqn: dict[str, LayerSpec], target, *,
                     as_pair: bool) -> list[MeasureJob]:
    out: dict[tuple, MeasureJob] = {}
    for e in edges:
        src, dst = by_fqn[e.src], by_fqn[e.dst]
        sig = e.pair_signature(src, dst) if as_pair else e.signature
        for sp in target.precisions.for_layer(src):
            for dp in target.precisions.for_layer(dst):
                key = (sig, sp, dp)
                name = f"{e.src}->{e.dst}"
                if key in out:
                    old = out[key]
                    out[key] = replace(old, fqns=old.fqns + (name,))
                elif as_pair:
                    out[key] = MeasureJob("transition", sig, dp, sp, spec=dst, shape=e.tensor_shape, src_spec=src,
                                          activation=e.activation, merge=e.merge, pool=e.pool, fqns=(name,))
                else:
                    out[key] = MeasureJob("transition", sig, dp, sp, shape=e.tensor_shape, fqns=(name,))
    return list(out.values())
