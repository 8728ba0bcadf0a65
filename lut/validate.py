"""LUT fidelity: export random plans, measure each end to end, compare with the LUT's prediction.

The prediction comes from :func:`hwmpq.lut.model.build_table` over the store's rows only; nothing is
fitted to the validation plans. Quantizer scales of the random plans come from one calibration batch
(the example input repeated with noise): latency does not depend on their values.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hwmpq.profilers.measure import export_plan, measure_at_speed
from hwmpq.records import BitPlan, MeasureConfig, atomic_write_text


@dataclass(frozen=True)
class PlanResult:
    plan: dict[str, str]  # fqn -> precision label
    predicted_ms: float
    measured_ms: float | None
    p10_ms: float | None = None
    p90_ms: float | None = None
    error_pct: float | None = None  # (predicted - measured) / measured * 100
    error_msg: str | None = None
    speed_error_pct: float | None = None  # the same, the prediction scaled by the report's speed factor
    predicted_plain_ms: float | None = None  # rows + transitions alone, without the kernels in context


@dataclass(frozen=True)
class ValidationReport:
    target: str
    model: str
    config: dict
    plans: tuple[PlanResult, ...]
    mape_pct: float | None
    worst_pct: float | None  # largest |error|
    notes: tuple[str, ...] = field(default_factory=tuple)
    # the machine's speed now against at profile time: each speed probe (profilers/probes.py) timed
    # beside the plans over its LUT row (>1: slower now), and the slowest; None if the LUT has no probe row
    speed_factor: float | None = None
    speed_mape_pct: float | None = None  # MAPE and worst error of the predictions scaled by speed_factor
    speed_worst_pct: float | None = None
    speed_factors: dict[str, float] = field(default_factory=dict)
    speed_attempts: int = 1  # times the plans were timed until the machine was at speed (or gave up)
    # the kernels in context (lut/context.py): how many (layer, precision) deltas the prediction holds, and
    # the MAPE and worst error without them (None when the LUT has no kernel rows)
    context_deltas: int = 0
    plain_mape_pct: float | None = None
    plain_worst_pct: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def random_plans(table, n: int, seed: int) -> list[BitPlan]:
    """``n`` plans drawing each layer's precision uniformly from what the target allows for it."""
    rng = random.Random(seed)
    allowed = table.allowed
    plans = []
    for _ in range(n):
        idx = [rng.choice([int(p) for p in range(len(table.candidates)) if allowed[i, p]])
               for i in range(len(table.fqns))]
        plans.append(table.plan_from_indices(idx, notes=f"random plan, seed {seed}"))
    return plans


def validate(store, model: nn.Module, example_input: torch.Tensor, n_plans: int, config: MeasureConfig,
             seed: int = 0, json_out: str | None = None, *, target=None, model_name: str = "",
             allow_foreign: bool = False, measure_config: MeasureConfig | None = None,
             speed_tolerance: float = 0.10, speed_retries: int = 2) -> ValidationReport:
    """Predicted vs measured latency of ``n_plans`` random plans; MAPE and worst error. ``config`` is the
    LUT's protocol and statistic; whole models are timed under ``measure_config`` (default: the same),
    again if the machine ran slow (``hwmpq.profilers.measure.measure_at_speed``)."""
    from hwmpq.graph import analyse
    from hwmpq.targets import get_target

    from .context import kernel_deltas
    from .model import build_table, edges_through_merges, speed_rows

    if n_plans < 1:
        raise ValueError(f"n_plans must be >= 1, got {n_plans}")
    target = target or get_target(store.meta["target"], threads=config.threads)
    if not target.capabilities.exports_and_measures:
        raise ValueError(f"target {target.id!r} cannot export and measure whole models")
    model = model.eval()
    specs, _ = analyse(model, example_input)
    edges = edges_through_merges(model, example_input)
    table = build_table(store, specs, edges, config, target, allow_foreign=allow_foreign)
    deltas = kernel_deltas(store, specs, edges, config)
    plain = build_table(store, specs, edges, config, target, allow_foreign=allow_foreign, context=False) if deltas else None
    results = []
    plans = random_plans(table, n_plans, seed)
    probe_rows = speed_rows(store, config)
    with tempfile.TemporaryDirectory(prefix="hwmpq-validate-") as tmp:
        exports = [export_plan(target, model, plan, example_input, f"{tmp}/plan{k}") for k, plan in enumerate(plans)]
        timed, check = measure_at_speed(target, exports, measure_config or config, probe_rows,
                                        tolerance=speed_tolerance, retries=speed_retries)
    speed = check.factor if check else None
    for plan, (quoted, p10, p90, err) in zip(plans, timed, strict=True):
        predicted, _ = table.predict(plan)
        pct = None if quoted is None else (predicted - quoted) / quoted * 100
        spct = None if quoted is None or speed is None else (predicted * speed - quoted) / quoted * 100
        results.append(PlanResult({f: p.label for f, p in plan.layers}, predicted, quoted, p10, p90, pct, err, spct,
                                  plain.predict(plan)[0] if plain is not None else None))
    errs = [abs(r.error_pct) for r in results if r.error_pct is not None]
    plain_errs = [abs(r.predicted_plain_ms - r.measured_ms) / r.measured_ms * 100
                  for r in results if r.measured_ms is not None and r.predicted_plain_ms is not None]
    serrs = [abs(r.speed_error_pct) for r in results if r.speed_error_pct is not None]
    report = ValidationReport(
        target.id, model_name or type(model).__name__, asdict(config), tuple(results),
        sum(errs) / len(errs) if errs else None, max(errs) if errs else None,
        (f"{len(edges)} edges (through merges), {len(specs)} layers, candidates "
         f"{[c.label for c in table.candidates]}",)
        + (() if probe_rows else ("no speed probe row in this LUT (profiled before they existed)",)),
        speed, sum(serrs) / len(serrs) if serrs else None, max(serrs) if serrs else None,
        check.factors if check else {}, check.attempts if check else 1,
        len(deltas), sum(plain_errs) / len(plain_errs) if plain_errs else None, max(plain_errs) if plain_errs else None)
    if json_out:
        atomic_write_text(json_out, json.dumps(report.as_dict(), indent=1) + "\n")
    return report


def format_report(report: ValidationReport) -> str:
    lines = [f"{'plan':>4}  {'predicted ms':>12}  {'measured ms':>11}  {'error %':>8}  {'at speed %':>10}"]
    for i, r in enumerate(report.plans):
        meas = f"{r.measured_ms:.3f}" if r.measured_ms is not None else "failed"
        err = f"{r.error_pct:+.1f}" if r.error_pct is not None else (r.error_msg or "")
        serr = f"{r.speed_error_pct:+.1f}" if r.speed_error_pct is not None else "-"
        lines.append(f"{i:>4}  {r.predicted_ms:>12.3f}  {meas:>11}  {err:>8}  {serr:>10}")
    if report.mape_pct is not None:
        lines.append(f"MAPE {report.mape_pct:.1f}%  worst {report.worst_pct:.1f}%  ({len(report.plans)} plans, "
                     f"{report.target}, {report.config.get('threads')} thread(s))")
    if report.plain_mape_pct is not None:
        lines.append(f"the prediction holds {report.context_deltas} kernels in context (lut/context.py); without "
                     f"them: MAPE {report.plain_mape_pct:.1f}%  worst {report.plain_worst_pct:.1f}%")
    if report.speed_factor is not None:
        probes = ", ".join(f"{k} {v:.3f}x" for k, v in report.speed_factors.items())
        lines.append(f"speed probes against their LUT rows ({probes}; >1: slower now; timed "
                     f"{report.speed_attempts} time(s)); predictions scaled by the slowest: "
                     f"MAPE {report.speed_mape_pct:.1f}%  worst {report.speed_worst_pct:.1f}%")
    return "\n".join(lines)
