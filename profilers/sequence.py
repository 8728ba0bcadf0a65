"""The profile sequence over an open LUT store: what ``hwmpq profile``, the Python API's ``profile`` and
the search's ``--profile-missing`` run. The precisions chosen (``ProfileOptions.precisions``; by default the
target's native kernels) restrict the target for every job, transitions and kernels in context included,
and are recorded in the store, whose table then offers only them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from hwmpq.records import Edge, LayerSpec, MeasureConfig
from hwmpq.targets.base import Target, with_precisions

from .context import profile_context
from .probes import profiling_specs
from .runner import ProfileReport
from .runner import profile as run_jobs


class ProfileStopped(RuntimeError):
    """The profile stopped before its end (the device stopped answering); the committed rows are kept and
    the same call resumes with the rest."""


@dataclass(frozen=True)
class ProfileOptions:
    """How a profile runs beside what it measures (the MeasureConfig): the ``hwmpq profile`` flags."""

    transitions: bool = True  # also measure precision transitions (the table prices layer boundaries)
    retry_failed: bool = False  # measure again jobs the LUT holds as failures
    max_run_failures: int = 5  # stop after this many run failures in a row (a dead device); 0: never
    speed_tolerance: float = 0.10  # measure a chunk again when the speed probe ran this much slower; 0: off
    speed_retries: int = 2  # at most this many extra attempts per slow chunk
    force: bool = False  # use a LUT of another device, target or schema knowingly
    progress: bool = True  # progress bar and messages on stderr
    table: bool = True  # build the LatencyTable at the end (``hwmpq profile`` does not need it)
    # which precisions to measure: "native" (the target's real kernels, leaving out those it only emulates
    # as float between Q/DQ), "all", or labels ("fp32,w8a8"); the LUT records them and its table offers them
    precisions: str | tuple[str, ...] = "native"


def measure_missing(model, example_input, specs: Sequence[LayerSpec], edges: Sequence[Edge], target: Target,
                    store, config: MeasureConfig, *,
                    context: bool = True, options: ProfileOptions | None = None,
                    console=None) -> tuple[ProfileReport, int]:
    """The profile sequence over an open store: the jobs it lacks (layers; the transition stand-ins, which
    ``build_table`` needs like layers: without them the table cannot price the layout changes a chain shares,
    and an fp32 mobilenetv2_050 was over-predicted by 18%, uniform int8 under by 21%; transitions; the
    overhead), then the kernels in context, at the precisions ``options.precisions`` selects (recorded in
    the store). Returns the runner's report and how many context rows were committed. An interrupt is re-raised once the finished
    rows are committed; a stopped profile raises :class:`ProfileStopped` (the runner has said why)."""
    options = options or ProfileOptions()
    if console is None:
        from rich.console import Console

        console = Console(stderr=True, soft_wrap=True)
    chosen = target.precisions.select(options.precisions)
    if options.progress:
        console.print(describe_precisions(target, chosen))
    target = with_precisions(target, chosen)
    report = run_jobs(profiling_specs(specs, edges, target), edges, target, store, config,
                      progress=options.progress, transitions=options.transitions,
                      retry_failed=options.retry_failed, max_run_failures=options.max_run_failures,
                      speed_tolerance=options.speed_tolerance, speed_retries=options.speed_retries,
                      console=console)
    if report.interrupted:
        raise KeyboardInterrupt
    if report.stop_reason:
        raise ProfileStopped(report.stop_reason)
    store.note_precisions(chosen.all)
    if not context:
        return report, 0
    t0 = time.perf_counter()
    try:
        rows = profile_context(model, example_input, specs, edges, target, store, config,
                               console=console if options.progress else None)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/] while timing the kernels in context: the layer rows and the "
                      "precisions finished are kept; rerun the same command for the rest")
        raise
    return replace(report, phase_s=report.phase_s + (("kernels in context", time.perf_counter() - t0),)), rows


def describe_precisions(target: Target, chosen) -> str:
    """What a profile measures, and what it leaves out and why (the emulated precisions by default)."""
    left = [p for p in target.precisions.all if p not in chosen.all]
    text = f"profiling {', '.join(p.label for p in chosen.all)}"
    if not left:
        return text
    emulated = [p.label for p in left if p in target.precisions.emulated]
    other = [p.label for p in left if p not in target.precisions.emulated]
    why = []
    if emulated:
        why.append(f"{', '.join(emulated)} ({target.id} runs them as float compute between Q/DQ, no faster "
                   "than fp32)")
    if other:
        why.append(", ".join(other))
    return f"{text}; not {'; '.join(why)}: --precisions all (or a list) measures them"
