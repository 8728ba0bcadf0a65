"""The profiler: unique jobs, failures recorded as data, resume, retry, interrupt, dead device, CLI errors.

Failure modes are injected by small wrappers around a backend (a real ORT target where a real one is
needed; the fake target where only the control flow is under test)."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from hwmpq.graph import analyse
from hwmpq.lut.store import LutStore
from hwmpq.profilers.cli import register
from hwmpq.profilers.jobs import plan_jobs
from hwmpq.profilers.probes import REFERENCE, SPEED_PROBES
from hwmpq.profilers.runner import FIRST_CHUNK, profile
from hwmpq.records import MeasureConfig, Measurement, Precision, RunResult, chains
from hwmpq.targets import get_target
from hwmpq.targets.fake import FakeTarget
from hwmpq.zoo import create_model

FAST = MeasureConfig(warmup=2, repeat=5)
ONE_ROUND = MeasureConfig(warmup=2, repeat=5, rounds=1)  # one run per job: failure counts are per job
W2A2, W4A4 = Precision(2, 2), Precision(4, 4)


@pytest.fixture(scope="module")
def resnet20_graph():
    return analyse(create_model("resnet20"), torch.zeros(1, 3, 32, 32))


@pytest.fixture(scope="module")
def resnet20_merged(resnet20_graph):
    """resnet20's layers with the edges the latency model uses (also across residual adds, and the
    pooled edge into fc, which does not chain as it stands)."""
    from hwmpq.lut.model import edges_through_merges

    return resnet20_graph[0], edges_through_merges(create_model("resnet20"), torch.zeros(1, 3, 32, 32))


@pytest.fixture(scope="module")
def tiny_graph():
    return analyse(create_model("test_tiny", in_chans=1), torch.zeros(1, 1, 8, 8))


def _store(tmp_path, target, name="p.lut") -> LutStore:
    return LutStore.open(tmp_path / name, target=target.id, device=target.device())


def test_plan_jobs_unique_layers_and_transitions(resnet20_merged):
    specs, edges = resnet20_merged
    fake = get_target("fake")
    jobs = plan_jobs(specs, edges, fake)
    sigs = {s.signature for s in specs}
    assert len(sigs) < len(specs)  # resnet20 repeats shapes: they must be measured once
    assert len(jobs) == len(sigs) * len(fake.precisions.conv)  # no transition/overhead methods on fake
    assert sorted(f for j in jobs if j.precision == fake.precisions.conv[0] for f in j.fqns) == sorted(
        s.fqn for s in specs)
    ort = get_target("ort-x86")
    by = {s.fqn: s for s in specs}

    def sig(e):  # the edge's own two layers where they chain, a stand-in chain on its shape otherwise
        return e.pair_signature(by[e.src], by[e.dst]) if chains(by[e.src], by[e.dst], e) else e.signature

    assert 0 < sum(chains(by[e.src], by[e.dst], e) for e in edges) < len(edges)  # both kinds occur
    want = {(sig(e), sp, dp) for e in edges for sp in ort.precisions.for_layer(by[e.src])
            for dp in ort.precisions.for_layer(by[e.dst])}
    ojobs = plan_jobs(specs, edges, ort)
    got = [(j.signature, j.src_precision, j.precision) for j in ojobs if j.kind == "transition"]
    assert len(got) == len(set(got)) and set(got) == want
    assert [j.kind for j in ojobs].count("overhead") == 1
    assert not [j for j in plan_jobs(specs, edges, ort, transitions=False) if j.kind == "transition"]


def stand_ins_only(target):
    """``target`` without pairs: every transition is timed with stand-ins (as on tvm targets)."""
    target.capabilities = dataclasses.replace(target.capabilities, pairs=False)
    return target


def test_each_pair_chain_is_measured_right_after_its_layers(resnet20_merged):
    """A pair's transition cost is its chain minus its two layers' rows: its chain jobs come right after
    the consumer's layer jobs (or another pair's chains into the same consumer), after the producer's."""
    from hwmpq.profilers.probes import profiling_specs

    specs, edges = resnet20_merged
    ort = get_target("ort-x86")
    jobs = plan_jobs(profiling_specs(specs, edges, ort), edges, ort)
    keys = [(j.kind, j.signature, j.src_precision, j.precision) for j in jobs]
    assert len(keys) == len(set(keys))
    pairs = list(dict.fromkeys(j.signature for j in jobs if j.kind == "transition" and j.src_spec is not None))
    assert len(pairs) > 1
    for sig in pairs:
        at = [i for i, j in enumerate(jobs) if j.signature == sig]
        assert at == list(range(at[0], at[-1] + 1)) and len(at) == len(ort.precisions.conv) ** 2
        j = jobs[at[0]]
        src_at = [i for i, x in enumerate(jobs) if x.kind == "layer" and x.signature == j.src_spec.signature]
        dst_at = [i for i, x in enumerate(jobs) if x.kind == "layer" and x.signature == j.spec.signature]
        assert max(src_at) < at[0] and max(dst_at) < at[0]
        first_of_sig = next(s.fqn for s in specs if s.signature == j.spec.signature)
        if j.fqns[0].split("->")[1] == first_of_sig:  # (a repeated consumer's rows came with its first use)
            assert all(jobs[i].kind == "transition" for i in range(max(dst_at) + 1, at[0]))


def test_each_shapes_stand_in_is_measured_right_before_its_chains(resnet20_graph):
    """Transition costs are differences of chain and stand-in rows, so each shape's stand-in layer jobs
    come immediately before that shape's transition jobs (one block per shape, every job kept once)."""
    from hwmpq.profilers.probes import profiling_specs

    specs, edges = resnet20_graph
    ort = stand_ins_only(get_target("ort-x86"))
    jobs = plan_jobs(profiling_specs(specs, edges, ort), edges, ort)
    keys = [(j.kind, j.signature, j.src_precision, j.precision) for j in jobs]
    assert len(keys) == len(set(keys))
    assert not [j for j in jobs if j.src_spec is not None]
    shapes = list(dict.fromkeys(j.shape for j in jobs if j.kind == "transition"))
    assert len(shapes) > 1
    for shape in shapes:
        first = next(i for i, j in enumerate(jobs) if j.kind == "transition" and j.shape == shape)
        last = max(i for i, j in enumerate(jobs) if j.kind == "transition" and j.shape == shape)
        assert all(j.shape == shape for j in jobs[first:last + 1])
        stand_in = ort.transition_stand_in(shape).signature
        at = [i for i, j in enumerate(jobs) if j.kind == "layer" and j.signature == stand_in]
        assert len(at) == len(ort.precisions.conv)
        # right before its chains, or before the chains of an earlier shape with the same stand-in
        assert at[-1] < first and all(jobs[i].kind == "transition" for i in range(at[-1] + 1, first))


class FlakyFake(FakeTarget):
    """Build fails for w2a2 everywhere; run fails for w4a4 on depthwise convs; optional dead device or
    Ctrl-C after ``die_after`` successful runs."""

    def __init__(self, die_after: int | None = None, interrupt: bool = False) -> None:
        self.runs, self.die_after, self.interrupt = 0, die_after, interrupt

    def build_layer(self, spec, precision):
        if precision == W2A2:
            from hwmpq.records import BuildResult

            return BuildResult(None, "no 2-bit kernel")
        b = super().build_layer(spec, precision)
        return b if not (spec.kind == "dwconv" and precision == W4A4) else type(b)(b.artifact + "#dw44")

    def run(self, build, config):
        if self.die_after is not None and self.runs >= self.die_after:
            if self.interrupt:
                raise KeyboardInterrupt
            return RunResult(None, "RPC session: connection refused")
        self.runs += 1
        if build.artifact and build.artifact.endswith("#dw44"):
            return RunResult(None, "kernel crashed")
        return super().run(build, config)


def test_failures_are_rows_and_resume_skips_them(tmp_path, tiny_graph):
    specs, edges = tiny_graph
    target = FlakyFake()
    with _store(tmp_path, target) as store:
        rep = profile(specs, edges, target, store, FAST, progress=False)
        assert rep.complete and rep.total == len(specs) * 5 and rep.skipped == 0
        rows = store.measurements()
        failed = [m for m in rows if not m.ok]
        assert {m.precision for m in failed} == {W2A2, W4A4}
        assert len(failed) == len(specs) + 1  # w2a2 everywhere, w4a4 on the one depthwise layer
        assert all(m.latency_ms is None and m.error_msg for m in failed)
        assert any("build failed: no 2-bit kernel" in m.error_msg for m in failed)
        assert any("run failed: kernel crashed" in m.error_msg for m in failed)
        again = profile(specs, edges, target, store, FAST, progress=False)
        assert (again.measured, again.failed, again.skipped) == (0, 0, rep.total)
        retry = profile(specs, edges, FakeTarget(), store, FAST, progress=False, retry_failed=True)
        assert retry.measured == len(failed) and retry.skipped == rep.total - len(failed)
        assert all(m.ok for m in store.measurements())


class SlowSpells(FakeTarget):
    """Every run takes ``factor`` times longer while ``slow(run index)`` says the machine is in a slow spell;
    runs of the ``exempt`` layers (signatures) never do (a spell that leaves a small in-cache conv alone)."""

    def __init__(self, slow, factor: float = 1.5, exempt: tuple[str, ...] = ()) -> None:
        self.runs, self.slow, self.factor, self.exempt = 0, slow, factor, exempt

    def run(self, build, config):
        r = super().run(build, config)
        self.runs += 1
        spared = json.loads(build.artifact)["sig"] in self.exempt if build.artifact else False
        k = self.factor if self.slow(self.runs - 1) and not spared else 1.0
        return RunResult(tuple(v * k for v in r.latencies_ms)) if r.latencies_ms else r


def test_chunks_timed_in_a_slow_spell_are_measured_again(tmp_path, resnet20_graph):
    """The speed probes are timed in every round: a chunk one of them finds more than the tolerance slower
    than the fastest chunk is measured again, and the rows kept are the fast attempt's; a first chunk
    (nothing to compare with yet) that was slow is measured again at the end. A spell the small reference
    conv does not feel (a shared cache or memory) is caught by the memory-bound probe."""
    specs, edges = resnet20_graph
    clean = tmp_path / "clean"
    clean.mkdir()
    with _store(clean, FakeTarget()) as store:
        profile(specs, edges, FakeTarget(), store, FAST, progress=False)
        want = {(m.signature, m.precision): m.p10_ms for m in store.measurements()}  # (the quoted statistic)
    probes = len(SPEED_PROBES)
    first = (FIRST_CHUNK + probes) * FAST.rounds  # the first chunk's runs, the probes' included
    second = (len(want) - FIRST_CHUNK + probes) * FAST.rounds  # the rest is one chunk (fake runs are fast)
    spells = [("first", lambda i: i < 2 * first, ()), ("second", lambda i: first <= i < first + second, ()),
              ("memory", lambda i: first <= i < first + second, (REFERENCE.signature,))]
    for name, slow, exempt in spells:
        target = SlowSpells(slow, exempt=exempt)
        with _store(tmp_path, target, f"{name}.lut") as store:
            rep = profile(specs, edges, target, store, FAST, progress=False)
            got = {(m.signature, m.precision): m.p10_ms for m in store.measurements()}
        assert rep.complete and rep.retried_chunks >= 1 and rep.slowest_chunk == pytest.approx(1.0), name
        assert got.keys() == want.keys() and rep.measured == len(want)
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), err_msg=name)
    target = SlowSpells(lambda i: i % 2 == 0)  # never a clean chunk: after the retries the fastest is kept
    with _store(tmp_path, target, "always.lut") as store:
        rep = profile(specs, edges, target, store, FAST, progress=False, speed_retries=1)
        assert rep.complete and len(store.measurements()) == len(want)
    off = SlowSpells(lambda i: i < 200)
    with _store(tmp_path, off, "off.lut") as store:
        rep = profile(specs, edges, off, store, FAST, progress=False, speed_tolerance=0)
        assert rep.retried_chunks == 0 and off.runs == len(want) * FAST.rounds


def test_dead_device_stops_without_recording_suspects(tmp_path, resnet20_graph):
    specs, edges = resnet20_graph
    target = FlakyFake(die_after=7)
    with _store(tmp_path, target) as store:
        out = io.StringIO()
        rep = profile(specs, edges, target, store, ONE_ROUND, progress=False, max_run_failures=3,
                      speed_tolerance=0, console=Console(file=out, width=200))  # (no probe runs to count)
        assert rep.stop_reason and "3 runs in a row failed" in rep.stop_reason and rep.dropped == 3
        assert "connection refused" in out.getvalue() and "rerun" in out.getvalue()
        kept = store.measurements()
        assert len(kept) == rep.measured + rep.failed and rep.measured == 7
        assert not any("connection refused" in (m.error_msg or "") for m in kept)
        rest = profile(specs, edges, FakeTarget(), store, ONE_ROUND, progress=False)
        assert rest.complete and rest.skipped == len(kept) and rest.measured == rep.total - len(kept)


def test_keyboard_interrupt_keeps_committed_rows(tmp_path, resnet20_graph):
    specs, edges = resnet20_graph
    target = FlakyFake(die_after=10, interrupt=True)
    with _store(tmp_path, target) as store:
        out = io.StringIO()
        rep = profile(specs, edges, target, store, ONE_ROUND, progress=True, console=Console(file=out, width=200))
        assert rep.interrupted and len(store) == rep.measured + rep.failed >= 10
        assert "interrupted" in out.getvalue() and "rerun the same command" in out.getvalue()
        before = {(m.signature, m.precision): m for m in store.measurements()}
        rest = profile(specs, edges, FakeTarget(), store, ONE_ROUND, progress=False)
        assert rest.skipped == len(before) and rest.measured + rest.skipped == rep.total
        after = {(m.signature, m.precision): m for m in store.measurements()}
        assert all(after[k] == v for k, v in before.items())  # nothing re-measured


def test_profile_cli_errors_are_clear(tmp_path):
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps `profile` a named subcommand
        pass

    runner = CliRunner()
    res = runner.invoke(app, ["profile", "--target", "fake", "--model", "nosuchnet", "--lut", str(tmp_path / "a")])
    assert res.exit_code == 2 and "unknown model 'nosuchnet'" in res.output
    (tmp_path / "junk.lut").write_bytes(b"not sqlite at all" * 100)
    res = runner.invoke(app, ["profile", "--target", "fake", "--model", "test_tiny", "--lut",
                              str(tmp_path / "junk.lut")])
    assert res.exit_code == 2 and "junk.lut" in res.output and "not a readable hwmpq LUT" in res.output
    res = runner.invoke(app, ["profile", "--target", "fake", "--model", "test_tiny", "--lut",
                              str(tmp_path / "ok.lut"), "--repeat", "3", "--warmup", "0"])
    assert res.exit_code == 0 and "measured" in res.output, res.output
    with LutStore.read(tmp_path / "ok.lut") as store:
        # 5 layers and the two speed probes (profilers/probes.py), 5 precisions each
        assert len(store) == 7 * 5 and {m.config.repeat for m in store.measurements()} == {3}


def test_emulated_device_and_versions_are_recorded(tmp_path, tiny_graph):
    from hwmpq.targets.base import DeviceInfo

    class Emulated(FakeTarget):
        def device(self):
            return DeviceInfo("qemu-a72", {"kind": "qemu-aarch64"}, emulated=True)

    target = Emulated()
    with _store(tmp_path, target) as store:
        out = io.StringIO()
        profile(*tiny_graph, target, store, FAST, console=Console(file=out, width=200))
        assert "emulated" in out.getvalue()
        rows = store.measurements()
        assert rows and all(m.emulated and m.device == "qemu-a72" for m in rows)
        assert all(m.versions["torch"] == torch.__version__ and m.versions["hwmpq"] for m in rows)
        assert store.frame()["emulated"].all() and store.meta["emulated"] == "1"


def test_job_that_kills_the_profiler_twice_is_recorded_as_failed(tmp_path, tiny_graph):
    """The crash itself is simulated (a native crash cannot be survived in-process): two earlier
    processes that died inside the same job leave two attempts behind in the LUT's inflight table."""
    specs, edges = tiny_graph
    ran = []

    class Counting(FakeTarget):
        def run(self, build, config):
            ran.append(build.artifact)
            return super().run(build, config)

    target = Counting()
    jobs = plan_jobs(specs, edges, target)
    crasher, once = jobs[3], jobs[5]
    def key(job):
        return Measurement(job.signature, job.precision, target.id, target.device().fingerprint, None,
                           config=FAST, kind=job.kind, src_precision=job.src_precision)

    with _store(tmp_path, target) as store:
        assert [store.job_started(key(crasher)) for _ in range(2)] == [0, 1]
        assert store.job_started(key(once)) == 0  # one death (e.g. a kill) is not enough to give up
        rep = profile(specs, edges, target, store, FAST, progress=False, speed_tolerance=0)  # (no probe runs)
        assert rep.complete and rep.failed == 1 and rep.measured == len(jobs) - 1 and len(ran) == 5 * (len(jobs) - 1)  # 5 rounds
        m = store.get(crasher.kind, crasher.signature, crasher.precision, FAST)
        assert not m.ok and "died 2 times" in m.error_msg
        assert store.get(once.kind, once.signature, once.precision, FAST).ok
        assert store._conn.execute("SELECT COUNT(*) FROM inflight").fetchone()[0] == 0
        again = profile(specs, edges, target, store, FAST, progress=False, retry_failed=True)
        assert again.measured == 1 and store.get(crasher.kind, crasher.signature, crasher.precision, FAST).ok


class LoggingFake(FakeTarget):
    """Logs (artifact, repeat) of every run; Ctrl-C after ``stop_after`` runs."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.log, self.stop_after = [], stop_after

    def run(self, build, config):
        if self.stop_after is not None and len(self.log) >= self.stop_after:
            raise KeyboardInterrupt
        self.log.append((build.artifact, config.repeat))
        return super().run(build, config)


def test_rounds_interleave_jobs_and_commit_whole_rows(tmp_path, resnet20_graph):
    from hwmpq.profilers.runner import FIRST_CHUNK as CHUNK

    specs, edges = resnet20_graph
    config = MeasureConfig(warmup=0, repeat=10, rounds=5)
    target = LoggingFake(stop_after=CHUNK * 2 + 3)  # Ctrl-C inside round 3 of the first chunk
    with _store(tmp_path, target) as store:
        rep = profile(specs, edges, target, store, config, progress=False, speed_tolerance=0)  # (jobs' runs only)
        assert rep.interrupted and len(store) == 0  # no job of the chunk under way had all its samples
        first = [a for a, _ in target.log[:CHUNK]]
        assert len(set(first)) == CHUNK  # round 1 visits every job of the chunk once ...
        assert [a for a, _ in target.log[CHUNK:2 * CHUNK]] == first  # ... then round 2 in the same order
        assert {r for _, r in target.log} == {2}  # each run times one slice of the repeats
        done = LoggingFake()
        rest = profile(specs, edges, done, store, config, progress=False, speed_tolerance=0)
        assert rest.complete and rest.measured == rest.total and len(done.log) == 5 * rest.total
        # the fake runs take no time, so the second chunk grows (4x at most): all the remaining jobs
        later = [a for a, _ in done.log[5 * CHUNK:]]
        n = rest.total - CHUNK
        assert 0 < n <= 4 * CHUNK and len(set(later[:n])) == n and later[n:2 * n] == later[:n]
        assert {m.n for m in store.measurements()} == {10}  # every row holds all its samples
