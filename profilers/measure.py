"""Whole models timed: a plan exported and end-to-end latencies measured round-robin, and the speed gate
that times the speed probes beside them and measures again while the machine runs slower than when the
LUT was profiled (``lut validate``, the search's live check, the kernels-in-context profile)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hwmpq.records import FP32, BitPlan, BuildResult, MeasureConfig

from .probes import SPEED_PROBES

if TYPE_CHECKING:  # torch is imported where a model is quantized, not with this module
    import torch
    from torch import nn


def _calibrated(model: nn.Module, plan: BitPlan, example_input: torch.Tensor, placement: str) -> nn.Module:
    import torch

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
    the quoted latency first) with the speed probes (:data:`SPEED_PROBES`) timed beside them; when
    a probe ran more than ``tolerance`` slower than its LUT row in ``probe_rows`` (``lut.model.speed_rows``:
    a slow spell of a shared machine, as the profiler's speed gate also catches), all is timed again, up
    to ``retries`` times. Returns the attempt whose slowest probe was fastest, and its :class:`SpeedCheck`
    (None when the LUT has no probe row)."""
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
