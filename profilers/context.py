"""Kernels in context, measured: each layer's kernel timed inside the model's uniform and mixed plans and alone, so that
the latency model (``hwmpq.lut.context``) adds what the whole model costs a layer beyond its row.

Why: a layer row runs the layer back to back, with its weights, input and code in the core's caches; in
the whole model every other layer runs between two runs of it. Measured with ORT's node profiler on
mobilenetv2 @32 fp32 (`git show eac1d54:bench/ort/bench_cache_state.py`): the projection convs,
which fuse no activation, ran 2-7 us slower in the whole model than alone, and the weight-heavy ones
about 26 us more per MB of weights (features.17.conv.2, 1.2 MB: 0.124 ms against 0.093); summed over the
model the kernels took 0.2-0.7 ms (10-35%) longer than alone. That is the size of mobilenetv2's
under-prediction by rows + transitions (fp32 plans -10..-15%). Timing the rows in the model's cache
state instead (the whole model run untimed before every run of the row) did not work: such a session
run was 1.7-2.5x the kernel's in-model time (a cold session, not only cold weights).

What is measured (:func:`profile_context`; ``hwmpq profile`` does it by default on targets that trace
kernels in whole models: ort-x86): for every candidate precision p, the model's uniform plan at p (fp32
where p is not allowed), and :data:`MIXED_PLANS` mixed plans drawn with fixed seeds (every layer at one of
its candidates, uniformly: the plans a search weighs), are exported and run with the node profiler on
(:func:`context_plans`). The mixed plans are there because a layer's context depends on the whole plan:
on resnet18 @224 (Intel Xeon, 2 MB L2) the fp32 layer4 convs (9.4 MB of weights each) ran 0.19-0.24 ms
slower than alone in the uniform fp32 plan (47 MB of weights streamed per inference) and as fast as
alone in mixed plans with int8 neighbours, so the uniform plans alone over-predicted mixed plans with a
float layer4 by 3-4%. Each layer also runs alone with
the profiler on, as its layer row plus, on a float output, the residual add and activation of its
output edge (what ORT fuses into a float conv in the whole model, and what the pair chains already
price). ``rounds`` rounds (6 of 30 runs by default) alternate the whole model and the layers, so a slow
spell of the machine hits both alike (three repeated measurements on mobilenetv2: the summed w4a8 delta
spread 0.47-0.54 ms with 6 x 30, 0.16-0.54 with 3 x 60). The model's layer-computing kernels are
matched to its layers by input shape and time
(:func:`match_kernels`; ORT does not run them in the model's call order); a plan whose kernels cannot be
matched is skipped, with a warning. Stored: two "kernel" rows per (layer, p, plan), its kernel in
the model and alone (:func:`kernel_signature`; median, p10 and p90 over all runs); the latency model
averages a layer's delta at p over the plans that ran it at p.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence

import numpy as np

from hwmpq.records import FP32, BitPlan, Edge, LayerSpec, MeasureConfig, Precision, RunResult

from .jobs import MeasureJob
from .measure import export_plan
from .runner import result

KIND = "kernel"
WHERE = ("in_model", "alone")


def model_signature(specs: Sequence[LayerSpec], edges: Sequence[Edge]) -> str:
    """The model as the latency model sees it: its layers (names and shapes, in order) and the edges
    between them."""
    names = {s.fqn for s in specs}
    blob = json.dumps([[(s.fqn, s.signature) for s in specs],
                       sorted((e.src, e.dst, list(e.tensor_shape), e.activation, e.merge) for e in edges
                              if e.src in names and e.dst in names)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


MIXED_PLANS = 4  # mixed plans the kernels are timed in, beside the uniform ones


def kernel_signature(model: str, fqn: str, where: str, plan: str = "") -> str:
    """Signature of the kernel row of layer ``fqn`` of the model ``model`` (:func:`model_signature`),
    timed ``where`` ("in_model" or "alone") in the plan named ``plan`` ("": the uniform plan of the row's
    precision; else a :func:`context_plans` name)."""
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, got {where!r}")
    return hashlib.sha256(json.dumps([KIND, model, fqn, where] + ([plan] if plan else [])).encode()).hexdigest()[:16]


def uniform_plans(specs: Sequence[LayerSpec], target) -> dict[Precision, BitPlan]:
    """Per precision some layer allows: every layer at it, fp32 where it is not allowed."""
    cands = sorted({p for s in specs for p in target.precisions.for_layer(s)})
    return {p: BitPlan(tuple((s.fqn, p if p in target.precisions.for_layer(s) else FP32) for s in specs))
            for p in cands}


def mixed_plan_names(n: int = MIXED_PLANS) -> list[str]:
    return [f"mixed{i}" for i in range(n)]


def context_plans(specs: Sequence[LayerSpec], target, mixed: int = MIXED_PLANS) -> list[tuple[str, Precision | None,
                                                                                               BitPlan]]:
    """(name, precision, plan) of the plans the kernels are timed in: the uniform plan of each precision
    (name "", rows stored for the layers at that precision), then ``mixed`` plans drawing every layer's
    precision uniformly from its candidates with the seed of their name (precision None: rows for every
    layer). ``lut validate`` draws its plans from another generator, so they are not these."""
    import random

    out: list[tuple[str, Precision | None, BitPlan]] = [("", p, plan) for p, plan in uniform_plans(specs, target).items()]
    for name in mixed_plan_names(mixed):
        rng = random.Random(f"hwmpq-context-{name}")
        out.append((name, None, BitPlan(tuple((s.fqn, rng.choice(sorted(target.precisions.for_layer(s))))
                                              for s in specs))))
    return out


def output_glue(specs: Sequence[LayerSpec], edges: Sequence[Edge]) -> dict[str, tuple[str, str]]:
    """Per layer, (activation, merge) of its first output edge: what follows it in the model."""
    out: dict[str, tuple[str, str]] = {}
    for e in sorted(edges, key=lambda e: (e.src, e.dst)):
        out.setdefault(e.src, (e.activation, e.merge))
    return {s.fqn: out.get(s.fqn, ("none", "none")) for s in specs}


def _fits(shape: tuple[int, ...], spec: LayerSpec) -> bool:
    """Whether a kernel whose first input has ``shape`` can compute ``spec``: same rank and, for 4-d
    inputs, the layer's input height and width in NCHW(c) or NHWC order (NCHWc pads channels to its
    block, an integer conv runs NHWC, so channels are not compared)."""
    if len(shape) != len(spec.input_shape):
        return False
    return len(shape) != 4 or tuple(spec.in_hw) in {(shape[2], shape[3]), (shape[1], shape[2])}


def match_kernels(specs: Sequence[LayerSpec], shapes: Sequence[tuple[int, ...]], in_model_ms: Sequence[float],
                  alone_ms: dict[str, float]) -> list[str] | None:
    """The layer (fqn) each of a whole model's kernels computes, from the kernels' input shapes (in
    execution order) and median times; None if they cannot be told apart.

    ORT does not run the layers in the order the model's code calls them (resnet20's 1x1 shortcut runs
    between conv1 and conv2 in fp32, before conv1 in int8) and names fused kernels after their last op.
    So each kernel goes to a layer whose input it fits (:func:`_fits`) and whose alone time is closest
    to it (a linear assignment on relative differences), and layers of one signature take theirs in
    execution order."""
    from scipy.optimize import linear_sum_assignment

    if len(shapes) != len(specs):
        return None
    far = 1e6
    cost = np.array([[abs(in_model_ms[k] - alone_ms[s.fqn]) / max(alone_ms[s.fqn], 1e-6) + (0 if _fits(sh, s) else far)
                      for s in specs] for k, sh in enumerate(shapes)])
    if not np.all(np.isfinite(cost)):
        return None
    rows, cols = linear_sum_assignment(cost)
    if cost[rows, cols].max() >= far:
        return None
    signature_of = {int(r): specs[c].signature for r, c in zip(rows, cols, strict=True)}
    out: list[str] = [""] * len(shapes)
    for sig in {s.signature for s in specs}:
        mine = [k for k in range(len(shapes)) if signature_of[k] == sig]  # execution order
        for k, s in zip(mine, [s for s in specs if s.signature == sig], strict=True):
            out[k] = s.fqn
    return out


def profile_context(model, example_input, specs: Sequence[LayerSpec], edges: Sequence[Edge], target, store,
                    config: MeasureConfig, *, rounds: int = 6, runs: int = 30, mixed: int = MIXED_PLANS,
                    console=None) -> int:
    """Time every layer's kernel in the plans of :func:`context_plans` the store lacks and alone (see the
    module doc). Only on targets whose capabilities include ``kernel_trace``. Each plan's rows are
    committed together when its rounds end: an interrupt keeps the plans finished before it.
    Returns how many rows were committed."""
    import tempfile

    if not target.capabilities.kernel_trace:
        return 0
    sig = model_signature(specs, edges)

    def timed(p: Precision | None, plan: BitPlan) -> list[tuple[str, Precision]]:  # the rows a plan gives
        return [(f, q) for f, q in plan.layers if p is None or q == p]

    todo = [(name, p, plan) for name, p, plan in context_plans(specs, target, mixed)
            if any(store.get(KIND, kernel_signature(sig, f, w, name), q, config) is None
                   for f, q in timed(p, plan) for w in WHERE)]
    if not todo:
        return 0
    if console is not None:
        names = [p.label if p is not None else name for name, p, _ in todo]
        console.print(f"timing the layers' kernels in {len(todo)} plan(s) of the whole model ({', '.join(names)}) "
                      "and alone (profilers/context.py)")
    device = target.device()
    glue = output_glue(specs, edges)
    store.note_shapes({(KIND, kernel_signature(sig, s.fqn, w, name)): json.dumps({"kernel_of": s.fqn, "where": w}
                                                                                  | ({"plan": name} if name else {}))
                       for s in specs for w in WHERE for name in [""] + mixed_plan_names(mixed)})
    committed = 0
    with tempfile.TemporaryDirectory(prefix="hwmpq-context-") as tmp:
        for name, p, plan in todo:
            what = f"the uniform {p.label} plan" if p is not None else f"the {name} plan"
            try:
                whole = export_plan(target, model, plan, example_input, f"{tmp}/{name or p.label}").artifact
            except Exception as e:  # noqa: BLE001 (an export bug costs this plan's deltas, not the profile)
                warnings.warn(f"kernels in context: exporting {what} failed ({e}); skipped", stacklevel=2)
                continue
            at = dict(plan.layers)  # layers that do not allow p run fp32: timed too, to tell the kernels apart
            alone = {s.fqn: target.build_layer_with_activation(s, at[s.fqn], *glue[s.fqn]) for s in specs}
            in_model: list[list[float]] = [[] for _ in specs]
            shapes: list[tuple[int, ...]] = []
            by_itself: dict[str, list[float]] = {s.fqn: [] for s in specs}
            try:
                for _ in range(rounds):
                    kernels = target.kernel_samples(whole, runs)
                    shapes = shapes or [shape for _, shape, _ in kernels]
                    if len(kernels) != len(specs) or [shape for _, shape, _ in kernels] != shapes:
                        shapes = []
                        break
                    for k, (_, _, ms) in enumerate(kernels):
                        in_model[k] += ms
                    for s in specs:
                        build = alone[s.fqn]
                        ks = target.kernel_samples(build.artifact, runs) if build.artifact else []
                        if len(ks) == 1:
                            by_itself[s.fqn] += ks[0][2]
            except Exception as e:  # noqa: BLE001 (a backend failure costs this plan's deltas, not the LUT)
                warnings.warn(f"kernels in context: timing {what} failed ({type(e).__name__}: {e}); skipped",
                              stacklevel=2)
                continue
            medians = {f: float(np.median(v)) if v else np.inf for f, v in by_itself.items()}
            fqn_of = match_kernels(specs, shapes, [float(np.median(v)) for v in in_model], medians) if shapes else None
            if fqn_of is None:
                warnings.warn(f"kernels in context: {what}'s layer kernels do not match its "
                              f"{len(specs)} layers (kernel input shapes: {shapes or 'none'}); its deltas are "
                              "skipped", stacklevel=2)
                continue
            samples_in = {f: in_model[k] for k, f in enumerate(fqn_of)}
            for f, q in timed(p, plan):
                for where, samples in (("in_model", samples_in[f]), ("alone", by_itself[f])):
                    run = RunResult(tuple(samples) if samples else None,
                                    None if samples else "no kernel time (the layer alone did not build or ran no "
                                                         "single kernel)")
                    store.add(result(MeasureJob(KIND, kernel_signature(sig, f, where, name), q), target, config,
                                     device, run))
                    committed += 1
    return committed
