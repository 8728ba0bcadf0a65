"""Layers in context: each uniform plan of the model timed end to end at profile time, and the
per-precision factor by which its layers run slower (or faster) inside the whole model than their rows say.

Why: isolated rows and two-layer chains do not see everything a whole model does. Measured on mobilenetv2
@32 fp32 with ORT's node profiler (bench/ort/README.md, "Session 6"): late, weight-heavy convs run 5-20%
slower in the whole model than alone or in a pair, and a long run cannot stay in this VM's fast state
(bench_duty_cycle.py), so rows + transitions under-predicted its float plans by 10-16% while its int8 plan
was within 1%.

What is measured: for every candidate precision p, the model with every layer at p (fp32 where p is not
allowed) is exported and timed at profile time, beside the speed probes (a "model" row per p, keyed by
:func:`model_signature`). The latency model then solves, in order, one factor per precision:

    alpha_fp32 = (M(fp32) - pred(fp32)) / S_fp32(fp32)
    alpha_p    = (M(p) - pred(p) - alpha_fp32 * S_fp32(p)) / S_p(p)

``M`` the measured uniform plan, ``pred`` the prediction of rows + transitions, ``S_q(p)`` the summed rows
of the layers at q in the uniform plan of p; a precision that holds less than a quarter of its own uniform
plan's row time (w4a32: only the classifier) gets no factor (alpha 0). Each layer row at p is scaled by
(1 + alpha_p). The uniform plans are never among ``lut validate``'s random plans (those draw every layer's
precision at random); validate reports the error with and without the factors.

Status: an experiment, off by default (``hwmpq profile --context`` times the rows; ``build_table(...,
context=True)`` uses them). In one A/B on the same LUTs and plans (bench/ort/README.md, "Session 6") the
factors cut mobilenetv2's MAPE from 12.4% to 5.7% and from 18.4% to 11.5%, but raised resnet20's from 3.1%
to 9.4% and from 2.4% to 14.5%: one uniform whole-model timing per precision carries this VM's +-5-10%
drift, and a uniform plan's residual mixes the layers' in-context slowdown with its own same-precision
transitions (resnet20's uniform w16a16 was 32% over its rows and transitions, its w16a16 layers in mixed
plans were not).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import warnings
from collections.abc import Sequence

import numpy as np

from hwmpq.records import FP32, Edge, LayerSpec, MeasureConfig, Precision, RunResult

KIND = "model"
MIN_SHARE = 0.25  # a precision below this share of its own uniform plan's row time gets no factor
ALPHA_RANGE = (-0.75, 1.0)  # beyond this the uniform plans disagree with the rows too much to trust


def model_signature(specs: Sequence[LayerSpec], edges: Sequence[Edge]) -> str:
    """The model as the latency model sees it: its layers (names and shapes, in order) and the edges
    between them."""
    names = {s.fqn for s in specs}
    blob = json.dumps([[(s.fqn, s.signature) for s in specs],
                       sorted((e.src, e.dst, list(e.tensor_shape), e.activation, e.merge) for e in edges
                              if e.src in names and e.dst in names)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def uniform_indices(table) -> dict[int, list[int]]:
    """Per candidate index p: the uniform plan's candidate indices (p where allowed, fp32 elsewhere);
    only candidates some layer allows."""
    f = table.candidates.index(FP32)
    out = {}
    for p in range(len(table.candidates)):
        idx = [p if table.allowed[i, p] else f for i in range(len(table.fqns))]
        if p == f or any(i == p for i in idx):
            out[p] = idx
    return out


def context_factors(table, measured: dict[Precision, float]) -> dict[Precision, float]:
    """{precision: alpha} from the uniform plans' measured latencies (see the module doc); {} without an
    fp32 measurement."""
    f = table.candidates.index(FP32)
    if measured.get(FP32) is None:
        return {}
    plans = uniform_indices(table)
    rows = np.arange(len(table.fqns))

    def parts(idx: list[int], p: int) -> tuple[float, float, float]:
        at = np.asarray(idx) == p
        lat = table.layer_ms[rows, idx]
        return table.predict_indices(idx)[0], float(lat[at].sum()), float(lat[~at].sum())

    pred, s_f, _ = parts(plans[f], f)
    alphas = {FP32: (measured[FP32] - pred) / s_f if s_f > 0 else 0.0}
    for p, idx in plans.items():
        cand = table.candidates[p]
        if p == f or measured.get(cand) is None:
            continue
        pred, s_p, s_rest = parts(idx, p)
        if s_p < MIN_SHARE * (s_p + s_rest):
            alphas[cand] = 0.0
            continue
        alphas[cand] = (measured[cand] - pred - alphas[FP32] * s_rest) / s_p
    out = {}
    for cand, a in alphas.items():
        clipped = float(np.clip(a, *ALPHA_RANGE))
        if clipped != a:
            warnings.warn(f"in-context factor of {cand.label} {1 + a:.2f}x is outside "
                          f"{1 + ALPHA_RANGE[0]:.1f}..{1 + ALPHA_RANGE[1]:.1f}x: clipped (a noisy profile?)",
                          stacklevel=2)
        out[cand] = clipped
    return out


def measured_uniform(store, signature: str, candidates, config: MeasureConfig) -> dict[Precision, float]:
    out = {}
    for p in candidates:
        m = store.get(KIND, signature, p, config)
        if m is not None and m.ok and m.quoted_ms(config.statistic):
            out[p] = m.quoted_ms(config.statistic)
    return out


def apply_context(table, factors: dict[Precision, float]):
    """``table`` with each layer row at p scaled by (1 + alpha_p)."""
    lat = table.layer_ms.copy()
    for p, a in factors.items():
        lat[:, table.candidates.index(p)] *= 1 + a
    return dataclasses.replace(table, layer_ms=lat)


def profile_context(model, example_input, specs: Sequence[LayerSpec], edges: Sequence[Edge], target, store,
                    config: MeasureConfig, *, speed_tolerance: float = 0.10, speed_retries: int = 2,
                    console=None) -> int:
    """Time the uniform plans the store lacks (one "model" row per candidate precision) beside the speed
    probes, again if the machine ran slow (``lut.validate.measure_at_speed``). Only on targets that
    time whole models cheaply (``target.times_whole_models``). Returns how many rows were committed; an
    export that fails is recorded as a failed row; the rows are committed together after the timing, so an
    interrupt keeps the layer rows and none of these."""
    from hwmpq.profilers.jobs import MeasureJob
    from hwmpq.profilers.runner import result

    from .model import build_table, speed_rows
    from .validate import export_plan, measure_at_speed, measure_samples

    if not getattr(target, "times_whole_models", False):
        return 0
    table = build_table(store, specs, edges, config, target)
    sig = model_signature(specs, edges)
    todo = {table.candidates[p]: table.plan_from_indices(idx, notes="uniform plan (context row)")
            for p, idx in uniform_indices(table).items()
            if store.get(KIND, sig, table.candidates[p], config) is None}
    if not todo:
        return 0
    if console is not None:
        console.print(f"timing {len(todo)} uniform plan(s) of the whole model in context: "
                      f"{', '.join(p.label for p in todo)}")
    device = target.device()
    store.note_shapes({(KIND, sig): json.dumps({"uniform_plans_of": [s.fqn for s in specs][:3] + ["..."],
                                                "layers": len(specs)})})
    committed = 0
    with tempfile.TemporaryDirectory(prefix="hwmpq-context-") as tmp:
        exports, failed = {}, {}
        for p, plan in todo.items():
            try:
                exports[p] = export_plan(target, model, plan, example_input, f"{tmp}/{p.label}")
            except Exception as e:  # noqa: BLE001 (an export bug is a failed row, not a lost profile)
                failed[p] = f"export failed: {type(e).__name__}: {e}"
        timed, _ = measure_at_speed(target, list(exports.values()), config, speed_rows(store, config),
                                    tolerance=speed_tolerance, retries=speed_retries, measure=measure_samples)
        runs = {p: RunResult(tuple(samples) if samples else None, err)
                for p, (_, samples, err) in zip(exports, timed, strict=True)}
        runs.update({p: RunResult(None, msg) for p, msg in failed.items()})
        for p, run in runs.items():
            store.add(result(MeasureJob(KIND, sig, p), target, config, device, run))
            committed += 1
    return committed


def plain_and_context(table, store, specs, edges, config: MeasureConfig):
    """(factors, table with them) for ``table`` built without context; ({}, table) without model rows."""
    factors = context_factors(table, measured_uniform(store, model_signature(specs, edges), table.candidates,
                                                      config))
    return factors, (apply_context(table, factors) if factors else table)

