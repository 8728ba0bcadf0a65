"""``hwmpq profile``: measure a model's unique layers, transitions and overhead on a target into a LUT."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Annotated

import typer


def _target_options(target, lut, threads, rpc, tracker, key, tune_trials, emulated) -> dict:
    """Keyword options for get_target: only those the user gave (each target has its own defaults).
    TVM keeps its tuning database and built layers beside the LUT, so export can reuse them."""
    opts = {"threads": threads, "rpc": rpc, "tracker": tracker, "key": key, "tune_trials": tune_trials,
            "emulated": emulated}
    if target.startswith("tvm:"):
        from hwmpq.api import target_work_dir

        opts["work_dir"] = target_work_dir(lut)
    return {k: v for k, v in opts.items() if v is not None}


def load_model_and_graph(model: str, input_shape: str | None, weights: str | None):
    """(model, example input, layer specs, edges), the edges across residual adds and concats included
    (the LUT model prices them)."""
    from hwmpq.graph import analyse
    from hwmpq.lut.model import edges_through_merges
    from hwmpq.modelspec import load_model_and_input

    net, x = load_model_and_input(model, input_shape, weights)
    specs, _ = analyse(net, x)
    return net, x, specs, edges_through_merges(net, x)


@contextmanager
def _warnings_to(console):
    """Warnings (a foreign LUT used with --force, a precision the kernels in context skipped) printed as
    one line each on the console."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: console.print(f"[yellow]warning:[/] {message}")
        yield


def profile_command(
    target: Annotated[str, typer.Option(help="ort-x86 | tvm:PRESET | fake")],
    model: Annotated[str, typer.Option(help="zoo name or path/to/file.py:factory")],
    lut: Annotated[str, typer.Option(help="LUT file (SQLite); created if absent, resumed if present")],
    input_shape: Annotated[str | None, typer.Option(help="N,C,H,W (default: the zoo model's)")] = None,
    weights: Annotated[str | None, typer.Option(help="state dict to load (weights only)")] = None,
    threads: Annotated[int | None, typer.Option(help="intra-op threads of the target")] = None,
    rpc: Annotated[str | None, typer.Option(help="HOST:PORT of a TVM RPC server")] = None,
    tracker: Annotated[str | None, typer.Option(help="HOST:PORT of a TVM RPC tracker (with --key)")] = None,
    key: Annotated[str | None, typer.Option(help="device key at the tracker")] = None,
    tune_trials: Annotated[int | None, typer.Option(help="MetaSchedule trials per layer (TVM)")] = None,
    emulated: Annotated[bool | None, typer.Option("--emulated/--not-emulated",
                                                  help="mark the device as emulated (qemu); TVM guesses if unset")] = None,
    warmup: Annotated[int, typer.Option(help="untimed runs before timing")] = 30,
    repeat: Annotated[int, typer.Option(help="timed repeats (median, p10 and p90 are kept; p10 is quoted)")] = 100,
    rounds: Annotated[int, typer.Option(help="split the repeats into this many slices, each a fresh session, "
                                             "timed round-robin over many jobs (robust to slow spells)")] = 5,
    stable_pct: Annotated[float, typer.Option(
        help="adaptive repeats: stop a job after the round in which the 95% confidence interval of its quoted "
             "statistic is within +-this % (repeat and rounds are then maxima); 0: every repeat")] = 1.0,
    precisions: Annotated[str, typer.Option(
        help="precisions to measure: 'native' (the target's real kernels; leaves out those it only emulates as "
             "float between Q/DQ), 'all', or labels like fp32,w8a8; the LUT records them and its table offers "
             "them")] = "native",
    number: Annotated[int, typer.Option(help="runs averaged inside one repeat")] = 1,
    min_repeat_ms: Annotated[float, typer.Option(help="raise number until a repeat lasts this long")] = 0.0,
    timeout_s: Annotated[float, typer.Option(help="per-job run timeout (enforced by the target)")] = 60.0,
    transitions: Annotated[bool, typer.Option(help="also measure precision transitions")] = True,
    context: Annotated[bool, typer.Option(
        help="also time each layer's kernel inside the model's uniform and mixed plans and alone (targets that trace "
             "kernels in whole models: ort-x86), which the latency model adds to the rows (profilers/context.py)")] = True,
    retry_failed: Annotated[bool, typer.Option(help="measure again jobs recorded as failures")] = False,
    max_run_failures: Annotated[int, typer.Option(help="stop after this many run failures in a row (0: never)")] = 5,
    speed_tolerance: Annotated[float, typer.Option(
        help="measure a chunk of jobs again when the speed reference, timed in every round, ran this much "
             "slower than in the fastest chunk (a slow spell of a shared machine); 0: off")] = 0.10,
    speed_retries: Annotated[int, typer.Option(help="at most this many extra attempts per slow chunk")] = 2,
    force: Annotated[bool, typer.Option(help="use a LUT of another device/target/schema knowingly")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Measure each unique (layer signature, precision) once, plus transitions and the per-model constant.

    Interrupt it at any time: every finished measurement is already committed, and the same command
    resumes with only the missing ones."""
    from rich.console import Console

    from hwmpq.api import ProfileOptions, ProfileStopped, profile
    from hwmpq.modelspec import load_model_and_input
    from hwmpq.records import MeasureConfig
    from hwmpq.targets import get_target

    console = Console(stderr=True, soft_wrap=True)
    try:
        net, x = load_model_and_input(model, input_shape, weights)
        tgt = get_target(target, **_target_options(target, lut, threads, rpc, tracker, key, tune_trials, emulated))
        config = MeasureConfig(warmup=warmup, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms, rounds=rounds,
                               stable_pct=stable_pct,
                               threads=threads or tgt.threads, timeout_s=timeout_s)
    except ValueError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    options = ProfileOptions(transitions=transitions, retry_failed=retry_failed, max_run_failures=max_run_failures,
                             speed_tolerance=speed_tolerance, speed_retries=speed_retries, force=force,
                             progress=not quiet, table=False, precisions=precisions)
    try:
        with _warnings_to(console):
            profile(net, x, target=tgt, lut=lut, config=config, context=context, options=options)
    except ValueError as e:  # the LUT file: unreadable, or of another device/target/schema
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # what was kept, and how to resume, is printed already
        raise typer.Exit(130) from None
    except ProfileStopped:  # why, likewise
        raise typer.Exit(1) from None
    finally:
        if tgt.capabilities.cleanup:  # built artifacts of a backend (temp files)
            tgt.cleanup()


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_command)
