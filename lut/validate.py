"""LUT fidelity: export random plans, measure each end to end, compare with the LUT's prediction.

The prediction comes from :func:`hwmpq.lut.model.build_table` over the store's rows only; nothing is
fitted to the validation plans. Quantizer scales of the random plans come from one calibration batch
(the example input repeated with noise): latency does not depend on their values.
"""

from __future__ import annotations

import copy
import json
import random
import tempfile
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hwmpq.records import FP32, BitPlan, MeasureConfig, atomic_write_text


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
    # the machine's speed now against at profile time: each speed probe (lut.model.SPEED_PROBES) timed
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


def _calibrated(model: nn.Module, plan: BitPlan, example_input: torch.Tensor, placement: str) -> nn.Module:
    from hwmpq.qmodules import calibrate, quantize

    q = quantize(copy.deepcopy(model).eval(), plan, placement=placement)
    g = torch.Generator().manual_seed(0)
    batch = example_input.repeat(4, *([1] * (example_input.dim() - 1)))
    batch = batch + 0.1 * torch.randn(batch.shape, generator=g)
    calibrate(q, [batch])
    return q.eval()


def export_plan(target, model: nn.Module, plan: BitPlan, example_input: torch.Tensor, out_dir: str):
    """Export one plan; the exporter's "not an integer kernel" warnings are expected here (int16, int4)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return target.export(_calibrated(model, plan, example_input, target.placement), plan, example_input, out_dir)


def measure_interleaved(target, exports: list, config: MeasureConfig) -> list[tuple]:
    """(quoted statistic, p10, p90, error) per export (an ExportResult, or a BuildResult of a single layer
    that ``target.run`` times), timed round-robin in ``config.rounds`` slices of the repeats
    (:meth:`MeasureConfig.per_round`, as the profiler does) so that a change of machine load hits every
    plan alike."""
    from hwmpq.targets.ort.timing import summarize

    out = []
    for quoted, lat, err in measure_samples(target, exports, config):
        if err:
            out.append((None, None, None, err))
        else:
            st = summarize(lat)
            out.append((quoted, st.p10_ms, st.p90_ms, None))
    return out


def measure_samples(target, exports: list, config: MeasureConfig) -> list[tuple]:
    """(quoted statistic, all samples, error) per export, timed as :func:`measure_interleaved` does."""
    from hwmpq.records import BuildResult

    per_round = config.per_round()
    samples: list[list[float]] = [[] for _ in exports]
    errors: list[str | None] = [None for _ in exports]
    for _ in range(min(config.rounds, config.repeat)):
        for k, export in enumerate(exports):
            if errors[k]:
                continue
            run = (target.run(export, per_round) if isinstance(export, BuildResult)
                   else target.measure_artifact(export, per_round))
            if run.error_msg or not run.latencies_ms:
                errors[k] = run.error_msg or "no latencies"
            else:
                samples[k].extend(run.latencies_ms)
    return [(None, None, err) if err else (config.quote(lat), lat, None)
            for lat, err in zip(samples, errors, strict=True)]


@dataclass(frozen=True)
class SpeedCheck:
    """How fast the machine ran while something was timed, against when the LUT was profiled."""

    factors: dict[str, float]  # speed probe name -> its time now over its LUT row (>1: slower now)
    attempts: int  # how many times everything was timed before the machine was at speed (or gave up)

    @property
    def factor(self) -> float:
        """The slowest probe's factor: the gate's verdict."""
        return max(self.factors.values())


def measure_at_speed(target, exports: list, config: MeasureConfig, probe_rows: dict[str, float], *,
                     tolerance: float = 0.10, retries: int = 2,
                     measure=measure_interleaved) -> tuple[list[tuple], SpeedCheck | None]:
    """``measure(target, exports, config)`` (default :func:`measure_interleaved`: one tuple per export,
    the quoted latency first) with the speed probes (``lut.model.SPEED_PROBES``) timed beside them; when
    a probe ran more than ``tolerance`` slower than its LUT row in ``probe_rows`` (``lut.model.speed_rows``:
    a slow spell of a shared machine, as the profiler's speed gate also catches), all is timed again, up
    to ``retries`` times. Returns the attempt whose slowest probe was fastest, and its :class:`SpeedCheck`
    (None when the LUT has no probe row)."""
    from .model import SPEED_PROBES

    probes = [p for p in SPEED_PROBES if probe_rows.get(p.fqn)]
    builds = [target.build_layer(p, FP32) for p in probes]
    if not probes or any(b.error_msg or b.artifact is None for b in builds):
        return measure(target, exports, config), None
    best: tuple[list, SpeedCheck] | None = None
    for attempt in range(1, 2 + retries):
        timed = measure(target, [*exports, *builds], config)
        now = [t[0] for t in timed[len(exports):]]
        factors = {p.fqn: (ms / probe_rows[p.fqn] if ms else float("inf")) for p, ms in zip(probes, now, strict=True)}
        check = SpeedCheck(factors, attempt)
        if best is None or check.factor < best[1].factor:
            best = (timed[:len(exports)], check)
        if check.factor <= 1 + tolerance:
            break
    timed, check = best
    return timed, (SpeedCheck(check.factors, attempt) if check.factor != float("inf") else None)


def validate(store, model: nn.Module, example_input: torch.Tensor, n_plans: int, config: MeasureConfig,
             seed: int = 0, json_out: str | None = None, *, target=None, model_name: str = "",
             allow_foreign: bool = False, measure_config: MeasureConfig | None = None,
             speed_tolerance: float = 0.10, speed_retries: int = 2) -> ValidationReport:
    """Predicted vs measured latency of ``n_plans`` random plans; MAPE and worst error. ``config`` is the
    LUT's protocol and statistic; whole models are timed under ``measure_config`` (default: the same),
    again if the machine ran slow (:func:`measure_at_speed`)."""
    from hwmpq.targets import get_target

    from hwmpq.graph import analyse

    from .context import kernel_deltas
    from .model import build_table, edges_through_merges, speed_rows

    if n_plans < 1:
        raise ValueError(f"n_plans must be >= 1, got {n_plans}")
    target = target or get_target(store.meta["target"], threads=config.threads)
    if not hasattr(target, "export") or not hasattr(target, "measure_artifact"):
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
