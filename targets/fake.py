"""A deterministic fake target for fast pipeline tests of the search (nn-Meter's DebugBackend idea).

Latency is derived from MACs and bits (seeded jitter, no clock): never the only test of a feature."""

from __future__ import annotations

import hashlib
import json

from hwmpq.records import FP32, BuildResult, LayerSpec, MeasureConfig, Precision, RunResult

from .base import Capabilities, DeviceInfo, TargetPrecisions

_PRECISIONS = (FP32, Precision(8, 8), Precision(4, 8), Precision(4, 4), Precision(2, 2))


class FakeTarget:
    id = "fake"
    precisions = TargetPrecisions(conv=_PRECISIONS, dwconv=_PRECISIONS, linear=_PRECISIONS)
    placement = "tensor"
    capabilities = Capabilities()  # layers only: no transitions, overhead, energy or whole models

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads  # accepted like a real target's; the fake latency does not depend on it

    def device(self) -> DeviceInfo:
        return DeviceInfo(fingerprint="fake-device-0", details={"kind": "fake"})

    def build_layer(self, spec: LayerSpec, precision: Precision) -> BuildResult:
        if precision not in self.precisions.for_layer(spec):
            return BuildResult(None, f"fake target cannot run {precision.label} for {spec.kind}")
        return BuildResult(json.dumps({"macs": spec.macs, "w": precision.w_bits, "a": precision.a_bits,
                                       "sig": spec.signature}))

    def run(self, build: BuildResult, config: MeasureConfig) -> RunResult:
        if build.artifact is None:
            return RunResult(None, build.error_msg or "nothing built")
        b = json.loads(build.artifact)
        ms = fake_latency_ms(b["macs"], b["w"], b["a"], b["sig"])
        return RunResult(tuple([ms] * config.repeat))


def fake_latency_ms(macs: int, w_bits: int, a_bits: int, salt: str = "") -> float:
    """0.01 ms launch cost + MACs at a speed that grows as bits shrink, with 0-5% seeded jitter."""
    speedup = {32: 1.0, 16: 1.3, 8: 2.5, 4: 3.5, 2: 4.5}.get(max(w_bits, a_bits) if a_bits < 32 else w_bits, 3.0)
    jitter = int(hashlib.sha256(f"{salt}{w_bits}{a_bits}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF * 0.05
    return 0.01 + macs / 2e9 * 1e3 / speedup * (1 + jitter)
