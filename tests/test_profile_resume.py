"""A profile killed mid-run (SIGKILL, no chance to clean up) loses nothing: the real `hwmpq profile`
CLI on the real ort-x86 target, killed after some rows are committed, then rerun to completion."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--target", "ort-x86", "--model", "test_small", "--warmup", "5", "--repeat", "100", "--no-context",
        "--quiet"]  # the job loop's resume (the kernels in context resume by precision: test_context.py)
KILL_AT_ROWS = 6


def _rows(path: Path) -> dict[tuple, tuple]:
    """key -> (latency_ms, time_unix) read straight from SQLite (a reader sees only committed rows)."""
    if not path.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            cur = conn.execute("SELECT kind, signature, w_bits, a_bits, src_w_bits, src_a_bits, latency_ms, "
                               "time_unix, error_msg FROM measurements")
            return {r[:6]: r[6:] for r in cur}
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the file is being created (atomic rename not done yet)
        return {}


def _inflight(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM inflight").fetchone()[0])
    finally:
        conn.close()


def _profile(lut: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(lut.parent)}  # a killed run cannot clean up
    return subprocess.Popen([sys.executable, "-m", "hwmpq", "profile", *ARGS, "--lut", str(lut)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_mid_profile_loses_nothing(tmp_path):
    lut = tmp_path / "killed.lut"
    proc = _profile(lut)
    deadline = time.monotonic() + 120
    try:
        while len(_rows(lut)) < KILL_AT_ROWS:
            if proc.poll() is not None:
                pytest.fail(f"profile ended before it could be killed: {proc.stdout.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no rows committed within 120 s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    kept = _rows(lut)
    assert len(kept) >= KILL_AT_ROWS
    assert all(v[0] is not None and v[0] > 0 for v in kept.values()), kept  # committed rows are whole
    assert _inflight(lut) <= 1  # at most the job it died in is marked as started and unfinished

    # the rerun goes through the same CLI in this process (one interpreter start less in the test budget)
    import typer
    from typer.testing import CliRunner

    from hwmpq.profilers.cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands: `profile` stays a named subcommand
    done = CliRunner().invoke(app, ["profile", *ARGS[:-1], "--lut", str(lut)])
    assert done.exit_code == 0, done.output
    final = _rows(lut)
    assert _inflight(lut) == 0
    total = len(final)
    assert total > len(kept), "the first run was not killed mid-run; make the profile slower"
    assert f"{len(kept)} already in" in done.output, done.output
    assert f"{total - len(kept)} measured" in done.output, done.output
    assert all(final[k] == v for k, v in kept.items())  # kept rows unchanged (same latency and time)
    first_new = min(v[1] for k, v in final.items() if k not in kept)
    assert first_new > max(v[1] for v in kept.values())  # the rest were measured by the rerun
    assert all(v[0] is not None for v in final.values()), [v for v in final.values() if v[0] is None]

    # the table is complete: every job the profiler plans for this model is in it
    from hwmpq.lut.store import LutStore
    from hwmpq.profilers.cli import load_model_and_graph
    from hwmpq.profilers.jobs import plan_jobs
    from hwmpq.profilers.probes import profiling_specs
    from hwmpq.targets import get_target

    _, _, specs, edges = load_model_and_graph("test_small", None, None)
    from hwmpq.targets.base import with_precisions

    ort = get_target("ort-x86")
    target = with_precisions(ort, ort.precisions.select("native"))  # the default --precisions
    jobs = plan_jobs(profiling_specs(specs, edges, target), edges, target)  # what `hwmpq profile` measures
    with LutStore.read(lut) as store:
        config = store.measurements()[0].config
        assert store.precisions == target.precisions.all  # the LUT says what it covers
        assert all(store.get(j.kind, j.signature, j.precision, config, j.src_precision) for j in jobs)
    assert len(jobs) == total
