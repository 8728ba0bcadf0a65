"""Layer rows in the model's cache state: each layer of a model also timed right after the model itself ran.

Why: a layer row is timed back to back, so the layer's weights and code stay in the core's caches between
runs; inside the whole model every other layer runs between two runs of it. Measured with ORT's node
profiler on mobilenetv2 @32 (bench/ort/README.md, "Session 7"): the kernels of the model's weight-heavy
layers ran 15-35% slower in the whole model than alone (features.18.0 fp32: 0.177 ms against 0.132), a
numpy pass over 8 MB between runs changed almost nothing (0.132), and running the whole model (untimed)
before every timed run of the layer alone reproduced the in-model time (0.186; project convs, which fuse
no activation, within 0-6%). resnet20's weights (1.1 MB in fp32) are small and stay cached.

What is measured (``hwmpq profile --model-cache``): for every candidate precision p, the model's uniform
plan at p (fp32 where p is not allowed) is exported once; each of the model's layer rows at p gets a twin
row, signature :func:`cache_signature`, timed with that model run untimed before every timed run of the
layer (``BuildResult.context``; the ort-x86 target). The twin follows its plain row in the same chunk of
interleaved rounds, so both see the same speed of the machine.

How it is used (``build_table(..., model_cache=True)``): the twin replaces the layer row; transitions stay
as they are, from the plain rows and chains (``T = C - R_src - R_dst`` is a difference of things timed
alike). The cache state of a mixed plan lies between those of the uniform plans: a row at p is timed in
the cache state of the uniform plan at p, which is an approximation.

Status: an experiment, off by default; ``lut validate`` reports its error beside the default's when the
LUT holds the twins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from hwmpq.profilers.jobs import MeasureJob
from hwmpq.records import FP32, BitPlan, Edge, LayerSpec, Precision


def context_id(model_signature: str, precision: Precision) -> str:
    """The cache state of the model (``lut.context.model_signature``) whose every layer is at ``precision``."""
    return f"{model_signature}:uniform:{precision.label}"


def cache_signature(layer_signature: str, context: str) -> str:
    """Signature of a layer row timed in the cache state ``context``."""
    return hashlib.sha256(json.dumps(["model-cache", layer_signature, context]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelCache:
    """What a profile needs to time the model's layer rows in the model's cache state: the model's
    signature, its uniform plans' exported artifacts by precision, and its layers' names."""

    model: str
    artifacts: dict[Precision, str]
    fqns: frozenset[str]

    def twins(self, job: MeasureJob) -> list[MeasureJob]:
        """The twin of a layer job of one of the model's layers at a precision with a uniform plan."""
        mine = tuple(f for f in job.fqns if f in self.fqns)
        if job.kind != "layer" or job.context or job.precision not in self.artifacts or not mine:
            return []
        ctx = context_id(self.model, job.precision)
        return [dataclasses.replace(job, signature=cache_signature(job.signature, ctx), fqns=mine, context=ctx,
                                    context_artifact=self.artifacts[job.precision])]


def uniform_plans(specs: Sequence[LayerSpec], target) -> dict[Precision, BitPlan]:
    """Per precision some layer allows: every layer at it, fp32 where it is not allowed."""
    cands = sorted({p for s in specs for p in target.precisions.for_layer(s)})
    return {p: BitPlan(tuple((s.fqn, p if p in target.precisions.for_layer(s) else FP32) for s in specs))
            for p in cands}


def prepare(model, example_input, specs: Sequence[LayerSpec], edges: Sequence[Edge], target,
            out_dir: str) -> ModelCache:
    """Export the model's uniform plans into ``out_dir`` (the target must export whole models)."""
    from .context import model_signature
    from .validate import export_plan

    if not getattr(target, "times_whole_models", False):
        raise ValueError(f"target {target.id!r} cannot time layers in a whole model's cache state "
                         "(it does not run whole models cheaply); profile without --model-cache")
    artifacts = {p: export_plan(target, model, plan, example_input, f"{out_dir}/{p.label}").artifact
                 for p, plan in uniform_plans(specs, target).items()}
    return ModelCache(model_signature(specs, edges), artifacts, frozenset(s.fqn for s in specs))


def row_signatures(specs: Sequence[LayerSpec], edges: Sequence[Edge]):
    """A function (layer spec, precision) -> the signature of its row in the model's cache state."""
    from .context import model_signature

    model = model_signature(specs, edges)
    return lambda spec, p: cache_signature(spec.signature, context_id(model, p))


def has_cache_rows(store, specs: Sequence[LayerSpec], edges: Sequence[Edge], config) -> bool:
    """Whether ``store`` holds any of the model's layer rows timed in its cache state."""
    signature = row_signatures(specs, edges)
    return any(store.get("layer", signature(s, FP32), FP32, config) is not None for s in specs)
