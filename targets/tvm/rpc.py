"""Remote devices over TVM RPC: connect (server or tracker), read a fingerprint, upload a built library,
time it with ``time_evaluator``; timeouts and dead devices become error strings, never hangs.

Every remote call runs in a worker thread joined with a deadline: a device that stops answering costs
``timeout_s`` and the session is dropped (the next call reconnects). Under a tracker the pool holds one
session per free board of the key and rotates measurements over them.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hwmpq.records import MeasureConfig


class RpcAddressError(ValueError):
    """A HOST:PORT that does not parse, or that nothing listens on."""


class RemoteTimeout(RuntimeError):
    pass


def parse_addr(text: str, what: str = "--rpc") -> tuple[str, int]:
    host, sep, port = (text or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcAddressError(f"{what} {text!r} is not HOST:PORT (e.g. 127.0.0.1:9090)")
    return host, int(port)


def check_reachable(host: str, port: int, timeout_s: float, what: str) -> None:
    """Fail fast with a clear message instead of a long TCP hang inside TVM's connect."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise RpcAddressError(f"{what} {host}:{port} is unreachable ({e.__class__.__name__}: {e}); start "
                              f"`python -m tvm.exec.rpc_server --host {host} --port {port}` on the device or "
                              "fix the address") from None


def call_with_timeout(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Run ``fn`` in a daemon thread; raise RemoteTimeout after ``timeout_s`` (the thread is abandoned)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name=f"hwmpq-rpc-{what}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise RemoteTimeout(f"{what} did not answer within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@dataclass(frozen=True)
class RemoteSpec:
    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.rpc and self.tracker:
            raise RpcAddressError("give either --rpc HOST:PORT or --tracker HOST:PORT --key K, not both")
        if self.tracker and not self.key:
            raise RpcAddressError("--tracker needs --key K (the device key the boards registered with)")
        if self.rpc:
            parse_addr(self.rpc, "--rpc")
        if self.tracker:
            parse_addr(self.tracker, "--tracker")

    @property
    def remote(self) -> bool:
        return bool(self.rpc or self.tracker)

    @property
    def label(self) -> str:
        return f"rpc {self.rpc}" if self.rpc else f"tracker {self.tracker} key {self.key}"


class SessionPool:
    """Open sessions (one for --rpc; one per free board of the key under a tracker), used round-robin."""

    def __init__(self, spec: RemoteSpec) -> None:
        self.spec = spec
        self._sessions: list[Any] = []
        self._next = 0
        self._boards = 1

    def _open_one(self):
        from tvm import rpc

        spec = self.spec
        if spec.rpc:
            host, port = parse_addr(spec.rpc, "--rpc")
            check_reachable(host, port, min(10.0, spec.timeout_s), "--rpc")
            return call_with_timeout(lambda: rpc.connect(host, port), spec.timeout_s, f"connect {spec.rpc}")
        host, port = parse_addr(spec.tracker, "--tracker")
        check_reachable(host, port, min(10.0, spec.timeout_s), "--tracker")
        tracker = rpc.connect_tracker(host, port)
        self._boards = max(1, free_boards(tracker, spec.key))
        return call_with_timeout(lambda: tracker.request(spec.key, priority=1), spec.timeout_s,
                                 f"tracker request key {spec.key!r}")

    def get(self):
        """The next session in rotation (opening more while the tracker has free boards)."""
        if len(self._sessions) < self._boards or not self._sessions:
            try:
                self._sessions.append(self._open_one())
            except RemoteTimeout:
                if not self._sessions:
                    raise
        sess = self._sessions[self._next % len(self._sessions)]
        self._next += 1
        return sess

    def drop(self, sess) -> None:
        """Forget a session that failed (a dead board); the next ``get`` reconnects."""
        self._sessions = [s for s in self._sessions if s is not sess]
        self._boards = max(1, self._boards - 1) if self.spec.tracker else 1

    def close(self) -> None:
        self._sessions.clear()

    @property
    def size(self) -> int:
        return len(self._sessions)


def free_boards(tracker, key: str) -> int:
    """How many servers registered ``key`` with the tracker (0 when the summary cannot tell)."""
    try:
        summary = tracker.summary()
    except Exception:  # noqa: BLE001 - an old tracker without summary: one board
        return 1
    queue = summary.get("queue_info", {}).get(key, {})
    return int(queue.get("free", 0)) + int(queue.get("pending", 0) == 0 and 0)


def remote_fingerprint(sess, timeout_s: float) -> dict[str, str]:
    """What the remote's TVM says about its machine: LLVM host triple, host CPU name and LLVM major of
    the remote build. TVM 0.27's RPC has no uname/version call and downloading /proc files through it
    kills the session, so kernel and TVM version of the remote are not read (the local TVM version,
    which built the library, is recorded by the target)."""

    def read() -> dict[str, str]:
        info: dict[str, str] = {}
        for name in ("target.llvm_get_system_triple", "target.llvm_get_system_cpu", "target.llvm_version_major"):
            try:
                info[name.split(".")[-1]] = str(sess.get_function(name)())
            except Exception as e:  # noqa: BLE001 - a runtime-only build lacks the LLVM helpers
                info[name.split(".")[-1]] = f"unavailable ({e.__class__.__name__})"
        return info

    details = call_with_timeout(read, timeout_s, "fingerprint")
    details["emulated_guess"] = str(looks_emulated(details["llvm_get_system_triple"], "",
                                                   details["llvm_get_system_cpu"]))
    return details


def _cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in ("model name", "Model", "CPU part", "Hardware"):
            return v.strip()
    return "unknown"


def looks_emulated(triple: str, cpuinfo: str, cpu: str) -> bool:
    """Under qemu-user an aarch64 process sees the host's x86 /proc/cpuinfo, so LLVM's host-CPU probe on
    the remote answers ``generic`` (a real board answers e.g. ``cortex-a72``). A heuristic: pass
    ``emulated=True/False`` (``--emulated``) to decide it yourself."""
    x86_info = "GenuineIntel" in cpuinfo or "AuthenticAMD" in cpuinfo
    return triple.startswith("aarch64") and (x86_info or cpu == "generic")


_UPLOADS = iter(range(1 << 62))


def _remote_name(lib_path: str) -> str:
    """A fresh remote file name per upload: the remote's dlopen caches by path, so reusing a name would
    run the previously loaded library."""
    digest = hashlib.sha256(os.path.abspath(lib_path).encode()).hexdigest()[:10]
    return f"hwmpq_{os.getpid()}_{next(_UPLOADS)}_{digest}.so"


def time_remote(sess, lib_path: str, inputs: list[np.ndarray], config: MeasureConfig) -> list[float]:
    """Upload ``lib_path``, load it in a Relax VM on the remote CPU, time ``main``; per-repeat ms."""
    from tvm import relax, runtime

    name = _remote_name(lib_path)
    try:
        sess.upload(lib_path, name)
        rlib = sess.load_module(name)
        dev = sess.cpu()
        _set_threads(sess, config.threads)
        vm = relax.VirtualMachine(rlib, dev)
        args = [runtime.tensor(x, device=dev) for x in inputs]
        return _evaluate(vm, dev, args, config)
    finally:
        try:
            sess.remove(name)
        except Exception:  # noqa: BLE001 - the session may already be gone; nothing else to clean
            pass


def outputs_remote(sess, lib_path: str, inputs: list[np.ndarray]) -> np.ndarray:
    """Upload, run ``main`` once on the remote and fetch its output (verification, not timing)."""
    from tvm import relax, runtime

    name = _remote_name(lib_path)
    try:
        sess.upload(lib_path, name)
        dev = sess.cpu()
        vm = relax.VirtualMachine(sess.load_module(name), dev)
        return vm["main"](*[runtime.tensor(x, device=dev) for x in inputs]).numpy()
    finally:
        try:
            sess.remove(name)
        except Exception:  # noqa: BLE001
            pass


def time_local(lib_path: str, inputs: list[np.ndarray], config: MeasureConfig) -> list[float]:
    """The same measurement in this process (``host`` preset without --rpc)."""
    import tvm
    from tvm import relax, runtime

    dev = tvm.cpu()
    tvm.get_global_func("runtime.config_threadpool")(1, config.threads)
    vm = relax.VirtualMachine(runtime.load_module(lib_path), dev)
    return _evaluate(vm, dev, [runtime.tensor(x, device=dev) for x in inputs], config)


def _set_threads(sess, threads: int) -> None:
    try:
        sess.get_function("runtime.config_threadpool")(1, threads)
    except Exception:  # noqa: BLE001 - older runtimes: the remote keeps its default pool
        pass


def _evaluate(vm, dev, args, config: MeasureConfig) -> list[float]:
    if config.warmup:
        vm.time_evaluator("main", dev, number=config.warmup, repeat=1)(*args)
    res = vm.time_evaluator("main", dev, number=config.number, repeat=config.repeat,
                            min_repeat_ms=int(config.min_repeat_ms))(*args)
    return [float(r) * 1e3 for r in res.results]


def versions_json(details: dict[str, str]) -> str:
    return json.dumps(details, sort_keys=True)
