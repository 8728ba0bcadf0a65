"""Loopback TVM RPC servers (and a tracker) on 127.0.0.1 in subprocesses, torn down in ``finally``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill the server and the session children it forked (a device that dies)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    kill_tree(proc)


@contextlib.contextmanager
def rpc_server(port: int | None = None, *, tracker: str | None = None, key: str = "hwmpq-test",
               cmd: list[str] | None = None, start_timeout_s: float = 120.0,
               wait: bool = True) -> Iterator[tuple[str, subprocess.Popen]]:
    """A TVM RPC server on 127.0.0.1 (``cmd`` overrides the command, e.g. the qemu aarch64 server).
    ``wait=False`` returns at once (servers registering with a tracker start in parallel)."""
    port = port or free_port()
    if cmd is None:
        cmd = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
               "--port-end", str(port + 1)]
        if tracker:
            cmd += ["--tracker", tracker, "--key", key]
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hwmpq-rpc-{port}.log"), "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                            start_new_session=True)
    try:
        if wait:
            wait_listening(port, proc, start_timeout_s)
        yield f"127.0.0.1:{port}", proc
    finally:
        stop(proc)
        log.close()


@contextlib.contextmanager
def rpc_tracker() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                             str(port), "--port-end", str(port + 1)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_listening(port, proc, 60)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)
