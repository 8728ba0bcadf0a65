"""Measurement jobs: what a profile of one model on one target has to time, each unique thing once.

Three kinds (DESIGN.md, "The LUT"): a ``layer`` job per unique (layer signature, precision the target
runs for that layer); a ``transition`` job per unique (edge tensor shape, producer precision, consumer
precision), the cost of handing a tensor across a precision boundary (only if the target has
``build_transition``); one ``overhead`` job, the per-model constant (only if it has ``build_overhead``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from hwmpq.records import FP32, BuildResult, Edge, LayerSpec, Precision

OVERHEAD_SIGNATURE = "overhead"


@dataclass(frozen=True)
class MeasureJob:
    """One thing to time. ``precision`` is the layer's (for a transition: the consumer's), ``src_precision``
    the producer's (transitions only); ``spec`` is set for layer jobs, ``shape`` for transitions."""

    kind: str  # layer | transition | overhead
    signature: str
    precision: Precision
    src_precision: Precision | None = None
    spec: LayerSpec | None = None
    shape: tuple[int, ...] | None = None
    fqns: tuple[str, ...] = ()  # the model's layers (or edges "src->dst") this job stands for

    @property
    def label(self) -> str:
        if self.kind == "layer":
            s = self.spec
            what = f"{s.kind} {s.in_channels}->{s.out_channels} k{s.kernel[0]} s{s.stride[0]} {s.in_hw[0]}x{s.in_hw[1]}"
            return f"layer {what} @ {self.precision.label} ({self.fqns[0]})"
        if self.kind == "transition":
            dims = "x".join(map(str, self.shape or ()))
            return f"transition {dims} {self.src_precision.label}->{self.precision.label}"
        return "per-model overhead"

    @property
    def description(self) -> str:
        """What the signature stands for, as stored in the LUT's shapes table."""
        if self.kind == "layer":
            return json.dumps(self.spec.shape_fields, sort_keys=True)
        if self.kind == "transition":
            return json.dumps({"tensor_shape": list(self.shape or ())})
        return json.dumps({"overhead": True})

    def build(self, target) -> BuildResult:
        """Ask ``target`` to build this job (a target error surfaces as BuildResult.error_msg)."""
        try:
            if self.kind == "layer":
                return target.build_layer(self.spec, self.precision)
            if self.kind == "transition":
                return target.build_transition(self.shape, self.src_precision, self.precision)
            return target.build_overhead()
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # a backend bug on one job is data, not the end of a long profile
            return BuildResult(None, f"build raised {type(e).__name__}: {e}")


def plan_jobs(specs: Sequence[LayerSpec], edges: Sequence[Edge], target, *,
              transitions: bool = True) -> list[MeasureJob]:
    """Unique jobs in a stable order: overhead, layers in execution order, then per edge tensor shape its
    transition stand-in's layer jobs followed by its transition jobs."""
    jobs: list[MeasureJob] = []
    if hasattr(target, "build_overhead"):
        jobs.append(MeasureJob("overhead", OVERHEAD_SIGNATURE, FP32))
    layer_jobs: dict[tuple, MeasureJob] = {}
    by_fqn = {s.fqn: s for s in specs}
    for spec in specs:
        for p in target.precisions.for_layer(spec):
            key = (spec.signature, p)
            if key in layer_jobs:
                old = layer_jobs[key]
                layer_jobs[key] = MeasureJob("layer", old.signature, p, spec=old.spec, fqns=old.fqns + (spec.fqn,))
            else:
                layer_jobs[key] = MeasureJob("layer", spec.signature, p, spec=spec, fqns=(spec.fqn,))
    if not (transitions and hasattr(target, "build_transition")):
        return jobs + list(layer_jobs.values())
    trans = _transition_jobs(edges, by_fqn, target)
    if not hasattr(target, "transition_stand_in"):
        return jobs + list(layer_jobs.values()) + trans
    # A transition cost is C(a, b) - S(a) - S(b) + overhead (lut/model.py): a small difference of chain and
    # stand-in times. Each shape's stand-in rows are therefore measured right before that shape's chains, in
    # the same or the next chunk of interleaved rounds, so that a drift of the machine's speed over a long
    # profile does not enter the difference.
    shapes = list(dict.fromkeys(j.shape for j in trans))
    stand_in = {shape: target.transition_stand_in(shape).signature for shape in shapes}
    moved = set(stand_in.values())
    jobs += [j for j in layer_jobs.values() if j.signature not in moved]
    placed = set()
    for shape in shapes:
        if stand_in[shape] not in placed:
            placed.add(stand_in[shape])
            jobs += [j for j in layer_jobs.values() if j.signature == stand_in[shape]]
        jobs += [j for j in trans if j.shape == shape]
    return jobs


def _transition_jobs(edges: Sequence[Edge], by_fqn: dict[str, LayerSpec], target) -> list[MeasureJob]:
    out: dict[tuple, MeasureJob] = {}
    for e in edges:
        if e.src not in by_fqn or e.dst not in by_fqn:
            raise ValueError(f"edge {e.src}->{e.dst} names a layer that is not in the layer list")
        for sp in target.precisions.for_layer(by_fqn[e.src]):
            for dp in target.precisions.for_layer(by_fqn[e.dst]):
                key = (e.signature, sp, dp)
                name = f"{e.src}->{e.dst}"
                if key in out:
                    old = out[key]
                    out[key] = MeasureJob("transition", old.signature, dp, sp, shape=old.shape,
                                          fqns=old.fqns + (name,))
                else:
                    out[key] = MeasureJob("transition", e.signature, dp, sp, shape=e.tensor_shape, fqns=(name,))
    return list(out.values())
