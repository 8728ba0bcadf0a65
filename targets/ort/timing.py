"""Timing one ONNX model in ONNX Runtime under a MeasureConfig.

Protocol: one session (``intra_op_num_threads = config.threads``, sequential execution, all graph
optimizations), inputs created once from the session's own input types, ``warmup`` untimed runs, then
``repeat`` samples; each sample times ``number`` back-to-back runs (raised so that one sample lasts at
least ``min_repeat_ms``) and records the mean per run. A failure or a timeout is returned as
``RunResult.error_msg``, never raised.

Clock: ``wall`` is ``time.perf_counter``. ``thread_cpu`` is the calling thread's CPU time
(``time.thread_time``): with ``intra_op_num_threads=1`` ORT computes inline in the calling thread and
never blocks (0 voluntary context switches measured), so on an idle core thread CPU time equals
latency, while on a shared, overloaded machine it leaves out the time the thread waited for a core.
Measured here at load ~12 on 2 cores: an int16 ResNet-20 took 6-10 ms wall but 2.3 ms CPU, stable to 3%.
``auto`` (the target's default) picks ``thread_cpu`` for 1 thread and ``wall`` otherwise.
"""

from __future__ import annotations

import time

import numpy as np

from hwmpq.latency_stats import LatencyStats as Stats  # noqa: F401 (this module's summary of its samples)
from hwmpq.latency_stats import summarize  # noqa: F401
from hwmpq.records import MeasureConfig, RunResult

_NP = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
       "tensor(int16)": np.int16, "tensor(uint16)": np.uint16, "tensor(int32)": np.int32,
       "tensor(int64)": np.int64}


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def fast_int8_is_exact(flags: str | None = None) -> bool:
    """True when ORT's default ("fast") u8 x s8 kernels cannot saturate on this CPU: with AVX512-VNNI,
    AVX-VNNI or AMX they accumulate u8 x s8 products straight into int32 (vpdpbusd); with AVX2 alone they
    sum pairs of products into int16 (vpmaddubsw), which saturates. Measured on an AVX512-VNNI EPYC: the
    fast path equals the exact one on a layer built to saturate int16 pair sums (tests/test_ort_target.py)
    and runs a 64->64 3x3 conv at 16x16 in 0.053 ms against 0.130 ms (0.168 ms in fp32)."""
    if flags is None:
        from hwmpq.device import local_cpu_details

        flags = local_cpu_details()["flags"]
    have = set(flags.replace(",", " ").split())
    return any(f in have for f in VNNI_FLAGS)


def session_options(threads: int, optimized_path: str | None = None, exact_u8s8: bool | None = None):
    """``exact_u8s8``: ``session.x64quantprecision=1``, ORT's exact u8 x s8 path, needed on AVX2 CPUs without
    VNNI (the fast path, vpmaddubsw, saturates int16 pair sums: measured 92% top-1 agreement with torch on a
    first layer with signed input, 100% exact; the exact path cost ~1.2-1.7x on int8 convs there). With VNNI
    the fast path is exact and the exact one 2.4x slower; ``None`` decides by this CPU
    (:func:`fast_int8_is_exact`)."""
    import onnxruntime as ort

    if exact_u8s8 is None:
        exact_u8s8 = not fast_int8_is_exact()

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdqisint8allowed", "1")
    so.add_session_config_entry("session.x64quantprecision", "1" if exact_u8s8 else "0")
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


# ORT's WeightBiasQuantization quantizes the float weights of a Conv/Gemm that sits between a DQ and a Q
# (per-tensor int8, its own scale): exactly where a plan's fp32 layer sits between integer neighbours. It
# is off in every session hwmpq makes, so an fp32 layer stays float (the manifest records it).
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def make_session(model_path_or_bytes, threads: int, optimized_path: str | None = None,
                 exact_u8s8: bool | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(model_path_or_bytes, session_options(threads, optimized_path, exact_u8s8),
                                providers=["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS))


def random_feeds(session, seed: int = 0) -> dict[str, np.ndarray]:
    """One input per session input, of its declared type and shape (symbolic dims become 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        dtype = _NP.get(inp.type)
        if dtype is None:
            raise ValueError(f"input {inp.name!r} has unsupported type {inp.type}")
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            feeds[inp.name] = rng.integers(max(info.min, -100), min(info.max, 200), shape).astype(dtype)
    return feeds


CLOCKS = ("wall", "thread_cpu", "auto")


def resolve_clock(clock: str, threads: int) -> str:
    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r} is not one of {CLOCKS}")
    if clock == "auto":
        return "thread_cpu" if threads == 1 else "wall"
    if clock == "thread_cpu" and threads != 1:
        raise ValueError("clock='thread_cpu' measures latency only with threads=1; use 'wall'")
    return clock


def time_session(session, feeds: dict[str, np.ndarray], config: MeasureConfig, clock: str = "wall") -> RunResult:
    """Warm up, then ``config.repeat`` samples of ``number`` runs (ms per run); timeouts are results."""
    now = time.thread_time if resolve_clock(clock, config.threads) == "thread_cpu" else time.perf_counter
    deadline = time.perf_counter() + config.timeout_s
    try:
        for _ in range(config.warmup):
            session.run(None, feeds)
            if time.perf_counter() > deadline:
                return RunResult(None, f"timeout: warm-up exceeded {config.timeout_s} s")
        number = config.number
        if config.min_repeat_ms > 0:
            t0 = time.perf_counter()
            session.run(None, feeds)
            one_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
            number = max(number, int(np.ceil(config.min_repeat_ms / one_ms)))
        samples = []
        for _ in range(config.repeat):
            t0 = now()
            for _ in range(number):
                session.run(None, feeds)
            samples.append((now() - t0) * 1e3 / number)
            if time.perf_counter() > deadline:
                return RunResult(tuple(samples), f"timeout after {len(samples)} of {config.repeat} samples "
                                                 f"({config.timeout_s} s)")
    except Exception as e:  # ORT raises its own types (Fail, InvalidArgument, RuntimeException)
        return RunResult(None, f"{type(e).__name__}: {e}")
    return RunResult(tuple(samples))


def time_model(model_path_or_bytes, config: MeasureConfig, feeds: dict[str, np.ndarray] | None = None,
               clock: str = "wall", exact_u8s8: bool | None = None) -> RunResult:
    """Create a session for the model and time it; session-creation errors are results."""
    try:
        session = make_session(model_path_or_bytes, config.threads, exact_u8s8=exact_u8s8)
        feeds = feeds if feeds is not None else random_feeds(session)
    except Exception as e:
        return RunResult(None, f"session creation failed: {type(e).__name__}: {e}")
    return time_session(session, feeds, config, clock)


# ORT's op names of the kernels that compute a layer (NCHWc float convs report "Conv")
KERNEL_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "QLinearConv", "QGemm", "QLinearMatMul",
              "MatMulNBits", "MatMulInteger", "ConvInteger")


def kernel_samples(model_path: str, threads: int, runs: int, workdir: str, exact_u8s8: bool | None = None,
                   ) -> list[tuple[str, tuple[int, ...], list[float]]]:
    """(op name, shape of its first input, kernel ms of every run) per layer-computing node
    (:data:`KERNEL_OPS`) of the model, in execution order, from ORT's own profiler
    (``SessionOptions.enable_profiling``; microsecond resolution). The input shape is as ORT holds it
    (NHWC for an integer conv after its layout transform). The trace file is written under ``workdir``
    and removed."""
    import os

    import onnxruntime as ort

    so = session_options(threads, exact_u8s8=exact_u8s8)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(workdir, "kernels")
    session = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(DISABLED_OPTIMIZERS))
    feeds = random_feeds(session)
    for _ in range(runs):
        session.run(None, feeds)
    trace = session.end_profiling()
    try:
        return read_kernel_trace(trace)
    finally:
        os.remove(trace)


def read_kernel_trace(path: str) -> list[tuple[str, tuple[int, ...], list[float]]]:
    """(op name, shape of its first input, kernel ms of every run) per layer-computing node of an ORT
    profiling trace (:func:`kernel_samples`), in execution order."""
    import json

    with open(path) as f:
        events = json.load(f)
    per: dict[str, tuple[str, tuple[int, ...], list[float]]] = {}
    for ev in events:
        args = ev.get("args", {})
        op = args.get("op_name")
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and op in KERNEL_OPS:
            inputs = args.get("input_type_shape") or [{}]
            shape = tuple(int(d) for d in next(iter(inputs[0].values()), ()))
            per.setdefault(ev["name"], (op, shape, []))[2].append(ev["dur"] / 1000)
    return list(per.values())


