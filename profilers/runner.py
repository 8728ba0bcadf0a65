"""Run measurement jobs on a target and commit each chunk of results to the LUT as soon as it is measured.

Resume is a property of the store: a job whose key is already stored (ok, or failed unless
``retry_failed``) is skipped, so rerunning an interrupted profile measures only what is missing.
A speed gate times the speed probes (``profilers/probes.py``) beside every chunk of jobs and measures a
chunk again when the machine ran slow (:meth:`_Loop.step_chunk`).
Build and run failures are rows (``error_msg``), not exceptions. Several run failures in a row
(``max_run_failures``) mean the device is gone (RPC refused, board rebooted): the profile stops, and
those suspect rows are NOT recorded, so the rerun measures them again. A per-job timeout
(``MeasureConfig.timeout_s``) is the target's to enforce: a run that never returns stops the profile.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hwmpq.latency_stats import summarize
from hwmpq.records import FP32, BuildResult, Edge, LayerSpec, MeasureConfig, Measurement, RunResult

from .jobs import MeasureJob, plan_jobs
from .probes import SPEED_PROBES


@dataclass(frozen=True)
class ProfileReport:
    total: int  # unique jobs for this model on this target
    skipped: int  # already in the LUT
    measured: int  # committed in this run with a latency
    failed: int  # committed in this run as build/run failures
    dropped: int  # run failures not recorded (dead device, interrupt): retried next time
    interrupted: bool
    stop_reason: str | None  # why the profile stopped early (None: it finished)
    elapsed_s: float
    lut_rows: int  # rows in the LUT file at the end
    retried_chunks: int = 0  # chunks measured again because a speed probe said the machine ran slow
    slowest_chunk: float = 1.0  # the slowest committed chunk's probe p10 over the fastest chunk's (worst probe)
    phase_s: tuple[tuple[str, float], ...] = ()  # seconds spent per phase: builds, each job kind's runs, probes
    runs_saved: float = 0.0  # share of the protocol's repeats adaptive repeats did not need (stable_pct)

    @property
    def complete(self) -> bool:
        return not self.interrupted and self.stop_reason is None


def tool_versions() -> dict[str, str]:
    """Versions of hwmpq and of the backend libraries this process has imported."""
    from hwmpq import __version__ as hwmpq_version

    out = {"hwmpq": str(hwmpq_version), "python": sys.version.split()[0]}
    for name in ("torch", "onnx", "onnxruntime", "tvm"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "__version__"):
            out[name] = str(mod.__version__)
    return out


def _summarise(run: RunResult) -> tuple[float, float, float, int] | str:
    """(median, p10, p90, n) in ms, or the reason the run gave no usable timing."""
    if run.error_msg:
        return run.error_msg
    try:
        st = summarize(run.latencies_ms or ())
    except ValueError as e:  # no samples, or invalid ones
        return f"run returned {e}"
    return st.median_ms, st.p10_ms, st.p90_ms, st.n


def _energy(target, job: MeasureJob, latency_ms: float) -> tuple[float | None, str]:
    if job.kind != "layer" or not target.capabilities.energy:
        return None, "modeled"
    try:
        mj, source = target.energy(job.spec, job.precision, latency_ms)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:  # an energy model bug must not cost the latency row
        return None, "modeled"
    return (None if mj is None or not math.isfinite(mj) else float(mj)), str(source)


def _fields(job: MeasureJob, target, config: MeasureConfig, device) -> dict:
    return dict(signature=job.signature, precision=job.precision, target=target.id, device=device.fingerprint,
                config=config, kind=job.kind, src_precision=job.src_precision, emulated=bool(device.emulated))


def build_failure(job: MeasureJob, target, config: MeasureConfig, device, build: BuildResult) -> Measurement:
    return Measurement(latency_ms=None, error_msg=f"build failed: {build.error_msg or 'no artifact'}",
                       versions=tool_versions(), time_unix=time.time(), **_fields(job, target, config, device))


def run_once(target, build: BuildResult, config: MeasureConfig) -> RunResult:
    try:
        return target.run(build, config)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:  # a backend bug on one job is data
        return RunResult(None, f"run raised {type(e).__name__}: {e}")


def result(job: MeasureJob, target, config: MeasureConfig, device, run: RunResult) -> Measurement:
    """The row for ``job`` from all its samples (or its run failure)."""
    base = _fields(job, target, config, device)
    stats = _summarise(run)
    if isinstance(stats, str):
        return Measurement(latency_ms=None, error_msg=f"run failed: {stats}", versions=tool_versions(),
                           time_unix=time.time(), **base)
    med, p10, p90, n = stats
    energy_mj, source = _energy(target, job, med)
    return Measurement(latency_ms=med, p10_ms=p10, p90_ms=p90, n=n, energy_mj=energy_mj, energy_source=source,
                       versions=tool_versions(), time_unix=time.time(), **base)


def pending_jobs(jobs: Sequence[MeasureJob], store, config: MeasureConfig, retry_failed: bool) -> list[MeasureJob]:
    """Jobs the store does not hold yet (or holds as failures, with ``retry_failed``)."""
    out = []
    for job in jobs:
        old = store.get(job.kind, job.signature, job.precision, config, job.src_precision)
        if old is None or (retry_failed and not old.ok):
            out.append(job)
    return out


class _Loop:
    """The measuring loop's state, so that an interrupt can say exactly what was kept."""

    def __init__(self, target, store, config: MeasureConfig, max_run_failures: int, max_crashes: int,
                 speed_tolerance: float = 0.0, speed_retries: int = 0) -> None:
        self.target, self.store, self.config = target, store, config
        self.device = target.device()
        self.max_run_failures, self.max_crashes = max_run_failures, max_crashes
        self.current: Measurement | None = None  # key of the job being measured (not yet committed)
        self.measured = self.failed = self.dropped = 0
        self.suspect: list[Measurement] = []  # consecutive run failures, held back until a run succeeds
        self.stop_reason: str | None = None
        self.rounds = min(config.rounds, config.repeat)
        self.speed_tolerance, self.speed_retries = speed_tolerance, speed_retries
        self.probes: list[BuildResult] = []  # the speed probes, timed in every round of every chunk
        self.best_speed: tuple[float, ...] | None = None  # each probe's fastest chunk p10 so far
        self.retried = 0  # chunks measured again because the machine ran slow
        self.kept: list[tuple[list, tuple]] = []  # committed chunks (their live jobs) and their probes' p10
        self.seconds: Counter[str] = Counter()  # wall time per phase (builds, runs per job kind, probes)
        self.runs = self.full_runs = 0  # timed runs taken, and what a fixed count would have taken
        if speed_tolerance > 0 and not self.device.emulated:
            builds = [target.build_layer(p, FP32) for p in SPEED_PROBES]
            self.probes = [b for b in builds if b.artifact is not None and not b.error_msg]

    def slowness(self, speed: tuple[float, ...] | None) -> float:
        """How much slower than the fastest chunks ``speed`` (probe p10s) is: its worst probe's ratio
        (inf without a probe timing, 1.0 before any chunk was kept)."""
        if speed is None:
            return float("inf")
        if self.best_speed is None:
            return 1.0
        return max(s / b for s, b in zip(speed, self.best_speed, strict=True))

    def step_chunk(self, jobs: Sequence[MeasureJob]) -> int:
        """Measure ``jobs`` in ``config.rounds`` interleaved rounds (round r of every job, then round r+1)
        and commit their rows. Returns how many jobs ended (committed or held back as suspect). Only the
        job whose run is under way is marked in flight, so a native crash is blamed on that job alone.

        Speed gate (``speed_tolerance`` > 0): the speed probes are timed in every round too; when a
        probe's p10 over the chunk is more than ``speed_tolerance`` above its fastest chunk's so far, the
        machine was in a slow spell (on this shared VM they last seconds to minutes), and the chunk is
        measured again, up to ``speed_retries`` times; the fastest attempt is committed."""
        live: list[tuple[MeasureJob, Measurement, BuildResult]] = []
        ended = 0
        for job in jobs:
            key = Measurement(latency_ms=None, **_fields(job, self.target, self.config, self.device))
            died = self.store.job_started(key)
            if died >= self.max_crashes > 0:
                self.store.add(dataclasses.replace(
                    key, time_unix=time.time(), versions=tool_versions(),
                    error_msg=f"the profiler process died {died} times while measuring this "
                              "job (a crash in the backend?); not tried again (--retry-failed tries it)"))
                self.failed += 1
                ended += 1
                continue
            t0 = time.perf_counter()
            build = job.build(self.target)
            self.seconds["builds"] += time.perf_counter() - t0
            self.store.job_abandoned(key, died)
            if build.error_msg or build.artifact is None:
                self.store.add(build_failure(job, self.target, self.config, self.device, build))
                self.failed += 1
                ended += 1
                continue
            live.append((job, key, build))
        return ended + self._measure(live)

    def _measure(self, live, kept_speed: tuple | None = None) -> int:
        """Time ``live`` (job, in-flight key, build) in attempts gated by the speed probes and commit the
        fastest attempt's rows (only if it beat ``kept_speed``, the speed the rows already stored were
        measured at). Returns how many jobs ended."""
        best: tuple[tuple | None, dict] | None = None
        ended = 0
        for attempt in range(1 + (self.speed_retries if self.probes else 0)):
            samples, speed, failed, dead = self._rounds(live)
            ended += failed
            if dead:  # the jobs that finished every round before the device died are kept, ungated
                return ended + self._commit(samples, kept_speed)
            live = [x for x in live if x[0] in samples]
            if best is None or self.slowness(speed) < self.slowness(best[0]):
                best = (speed, samples)
            if speed is None or self.slowness(speed) <= 1 + self.speed_tolerance:  # (no verdict without probes)
                break
            self.retried += attempt < self.speed_retries
        speed, samples = best if best is not None else (None, {})
        if kept_speed is not None and not self.slowness(speed) < self.slowness(kept_speed):
            return ended
        if speed is not None:
            self.best_speed = speed if self.best_speed is None else tuple(map(min, self.best_speed, speed))
            self.kept.append((live, speed))
        alive = {x[0] for x in live}
        return ended + self._commit({j: lat for j, lat in samples.items() if j in alive}, kept_speed)

    def _finished(self, samples: dict, done: set, order: list, current: MeasureJob, r: int) -> dict:
        """The jobs that had finished (stable already, or through every round before ``current`` stopped
        round ``r``) when an interrupt or a dead device stopped the chunk: they are kept, without the speed
        gate's verdict."""
        last = order[:order.index(current)] if r >= self.rounds - 1 else []
        return {j: samples[j] for j in order if j in samples and (j in done or j in last)}

    def _commit(self, samples: dict, kept_speed: tuple | None) -> int:
        for job, lat in samples.items():
            m = result(job, self.target, self.config, self.device, RunResult(tuple(lat)))
            self.store.add(m)
            self.measured += m.ok if kept_speed is None else 0  # (a re-measured row was counted once)
            self.failed += not m.ok
        return len(samples)

    def final_pass(self) -> None:
        """Measure again the chunks kept at a probe speed more than ``speed_tolerance`` slower than the
        fastest chunks of the whole profile (an early chunk had nothing faster to be compared with)."""
        if not self.probes or self.best_speed is None:
            return
        kept, self.kept = self.kept, []
        for live, speed in kept:
            if self.slowness(speed) > 1 + self.speed_tolerance and not self.stop_reason:
                self.retried += 1
                before = len(self.kept)
                self._measure(live, kept_speed=speed)
                if len(self.kept) == before:  # not faster this time: the old rows stay
                    self.kept.append((live, speed))
            else:
                self.kept.append((live, speed))

    @property
    def slowest_kept(self) -> float:
        """The slowest committed chunk's worst probe p10 over that probe's fastest (1.0 with no probe)."""
        if not self.kept or self.best_speed is None:
            return 1.0
        return max(self.slowness(speed) for _, speed in self.kept)

    def _rounds(self, live) -> tuple[dict, tuple | None, int, bool]:
        """One attempt at ``live``: {job: samples} of the jobs whose every run succeeded, each probe's p10
        over the attempt (None without probe timings), how many jobs failed a run, and whether run failures
        in a row stopped the profile (then only the jobs that had finished their last round are returned)."""
        one_round = self.config.per_round()
        samples: dict[MeasureJob, list[float]] = {job: [] for job, _, _ in live}
        done: set[MeasureJob] = set()  # stable already (adaptive repeats): no more rounds
        probe_ms: list[list[float]] = [[] for _ in self.probes]
        failed = 0
        self.full_runs += len(live) * self.rounds * one_round.repeat
        for r in range(self.rounds):
            if samples and done >= samples.keys():
                break
            t0 = time.perf_counter()
            for probe, times in zip(self.probes, probe_ms, strict=True):
                times += run_once(self.target, probe, one_round).latencies_ms or ()
            self.seconds["speed probes"] += time.perf_counter() - t0
            order = [x[0] for x in live]
            for job, key, build in live:
                if job not in samples or job in done:
                    continue
                died = self.store.job_started(key)
                self.current = key
                t0 = time.perf_counter()
                try:
                    run = run_once(self.target, build, one_round)
                except KeyboardInterrupt:  # keep the jobs that had finished their last round
                    self._commit(self._finished(samples, done, order, job, r), None)
                    raise
                finally:
                    self.seconds[f"{job.kind} runs"] += time.perf_counter() - t0
                self.store.job_abandoned(key, died)
                self.current = None
                if run.error_msg or not run.latencies_ms:
                    del samples[job]
                    failed += 1
                    if self._run_failed(result(job, self.target, self.config, self.device, run)):
                        return self._finished(samples, done, order, job, r), None, failed, True
                    continue
                self.flush()  # only a successful run shows the device is alive (a build failure says nothing)
                samples[job].extend(run.latencies_ms)
                self.runs += len(run.latencies_ms)
                if self.config.is_stable(samples[job]):
                    done.add(job)
        speed = tuple(float(np.percentile(t, 10)) for t in probe_ms) if probe_ms and all(probe_ms) else None
        return samples, speed, failed, False

    def _run_failed(self, m: Measurement) -> bool:
        """Hold a run failure back (the device may be dead); True when that many in a row stop the profile."""
        if self.max_run_failures <= 0:
            self.store.add(m)
            self.failed += 1
            return False
        self.suspect.append(m)
        if len(self.suspect) < self.max_run_failures:
            return False
        self.stop_reason = (
            f"the device looks dead: {len(self.suspect)} runs in a row failed (last: {m.error_msg}); "
            "those jobs were not recorded. Check the device or connection and rerun the same command")
        self.dropped += len(self.suspect)
        self.suspect.clear()
        return True

    def flush(self) -> None:
        """Commit held-back run failures: a later success shows the device was alive, so they are data."""
        for s in self.suspect:
            self.store.add(s)
            self.failed += 1
        self.suspect.clear()


def profile(specs: Sequence[LayerSpec], edges: Sequence[Edge], target, store, config: MeasureConfig, *,
            progress: bool = True, transitions: bool = True, retry_failed: bool = False,
            max_run_failures: int = 5, max_crashes: int = 2, speed_tolerance: float = 0.10,
            speed_retries: int = 2, console=None) -> ProfileReport:
    """Measure every unique job of the model that ``store`` lacks, committing each as it completes.

    Ctrl-C stops cleanly (committed rows stay; run the same command again to resume). A job inside which
    the process died ``max_crashes`` times (a native crash in a backend) is recorded as failed instead of
    crashing every rerun. ``speed_tolerance``/``speed_retries``: the speed gate of :meth:`_Loop.step_chunk`
    (0 turns it off; it is off on emulated devices). ``console``: a rich Console for progress and
    messages (default: stderr)."""
    from rich.console import Console

    console = console or Console(stderr=True, soft_wrap=True)
    t0 = time.perf_counter()
    jobs = plan_jobs(specs, edges, target, transitions=transitions)
    store.note_shapes({(j.kind, j.signature): j.description for j in jobs})
    todo = pending_jobs(jobs, store, config, retry_failed)
    if progress:
        console.print(f"[bold]{target.id}[/]: {len(jobs)} unique jobs, {len(jobs) - len(todo)} already in "
                      f"{store.path}, {len(todo)} to measure")
    loop = _Loop(target, store, config, max_run_failures, max_crashes, speed_tolerance, speed_retries)
    if progress and loop.device.emulated:
        console.print("[yellow]the device is emulated: rows are marked emulated; their timings are not latencies[/]")
    interrupted = False
    try:
        _run_all(loop, todo, progress, console)
        loop.final_pass()
        loop.flush()
    except KeyboardInterrupt:
        interrupted = True
        if loop.current is not None:  # an interrupt is not a crash: do not count the attempt
            store.job_abandoned(loop.current)
        loop.dropped += len(loop.suspect)
        loop.suspect.clear()
    report = ProfileReport(total=len(jobs), skipped=len(jobs) - len(todo), measured=loop.measured,
                           failed=loop.failed, dropped=loop.dropped, interrupted=interrupted,
                           stop_reason=loop.stop_reason, elapsed_s=time.perf_counter() - t0, lut_rows=len(store),
                           retried_chunks=loop.retried, slowest_chunk=loop.slowest_kept,
                           phase_s=tuple(sorted(loop.seconds.items(), key=lambda kv: -kv[1])),
                           runs_saved=1 - loop.runs / loop.full_runs if loop.full_runs else 0.0)
    if progress or interrupted or loop.stop_reason:
        console.print(describe(report, store.path))
    return report


ROUND_S = 10.0  # target length of one round over a chunk of jobs: each job's rounds span ~rounds x this
FIRST_CHUNK = 16


def _chunks(todo: list[MeasureJob], rounds: int):
    """Consecutive chunks of ``todo`` sized so that one round over a chunk lasts about ``ROUND_S``: the
    slow spells of a shared machine last seconds, so a job's rounds must be seconds apart to see different
    spells. Starts at FIRST_CHUNK jobs and rescales from each chunk's measured time (at most 4x per step); an
    interrupt loses at most the chunk under way (about rounds x ROUND_S of measuring)."""
    start, size = 0, FIRST_CHUNK
    while start < len(todo):
        chunk = todo[start:start + size]
        start += len(chunk)
        t0 = time.perf_counter()
        yield chunk
        per_round = (time.perf_counter() - t0) / rounds
        size = int(min(4 * size, max(4, len(chunk) * ROUND_S / max(per_round, 1e-3))))


def _run_all(loop: _Loop, todo: list[MeasureJob], progress: bool, console) -> None:
    if not progress:
        for chunk in _chunks(todo, loop.rounds):
            loop.step_chunk(chunk)
            if loop.stop_reason:
                return
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column

    def fixed(width: int) -> Column:
        return Column(no_wrap=True, min_width=width)

    columns = (BarColumn(bar_width=20, table_column=fixed(20)), MofNCompleteColumn(table_column=fixed(9)),
               TimeElapsedColumn(table_column=fixed(7)), TextColumn("ETA", table_column=fixed(3)),
               TimeRemainingColumn(table_column=fixed(7)),  # the job labels take what is left
               TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)))
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=len(todo))
        for chunk in _chunks(todo, loop.rounds):
            bar.update(task, description=f"{chunk[0].label} (+{len(chunk) - 1} more, {loop.rounds} rounds)")
            bar.advance(task, loop.step_chunk(chunk))
            if loop.stop_reason:
                return
        bar.update(task, description="done")


def describe(report: ProfileReport, path) -> str:
    """One paragraph for the user: what happened, what is kept, what to do next."""
    head = (f"{report.measured} measured, {report.failed} failed (recorded), {report.skipped} already in the "
            f"LUT, of {report.total} jobs in {report.elapsed_s:.1f} s; {path} now holds {report.lut_rows} rows")
    if report.interrupted:
        return (f"[yellow]interrupted[/]: {head}. Every committed row is kept; rerun the same command to measure "
                f"the {report.total - report.skipped - report.measured - report.failed} missing jobs")
    if report.stop_reason:
        return f"[red]stopped[/]: {report.stop_reason}. {head}"
    if report.runs_saved >= 0.005:
        head += f"; adaptive repeats stopped stable jobs early ({report.runs_saved:.0%} fewer timed runs)"
    if report.retried_chunks:
        head += (f". The machine ran slow during {report.retried_chunks} chunk(s), measured again; the slowest "
                 f"chunk kept ran at {report.slowest_chunk:.2f}x the fastest's time")
    return head
