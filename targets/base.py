"""What every backend provides. Builder and runner are apart and pass plain records (TVM meta_schedule
style): ``build_layer(spec, precision) -> BuildResult``, ``run(build, config) -> RunResult``; failures
and timeouts are results (``error_msg``), never exceptions lost in a log."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from hwmpq.records import FP32, BuildResult, LayerSpec, MeasureConfig, Precision, RunResult


@dataclass(frozen=True)
class TargetPrecisions:
    """The precisions a target can run, per op kind (NNCF hardware-setup style: data, not code).

    ``emulated`` lists the offered precisions the target only emulates (float compute between
    quantize/dequantize, no integer kernel) for every op kind: they run, but are not faster than float,
    so a profile can leave them out by default."""

    conv: tuple[Precision, ...] = (FP32,)
    dwconv: tuple[Precision, ...] = (FP32,)
    linear: tuple[Precision, ...] = (FP32,)
    emulated: tuple[Precision, ...] = ()

    def __post_init__(self) -> None:
        offered = set(self.conv) | set(self.dwconv) | set(self.linear)
        unknown = [p.label for p in self.emulated if p not in offered]
        if unknown:
            raise ValueError(f"emulated precisions {unknown} are not offered for any op kind")

    def for_kind(self, kind: str) -> tuple[Precision, ...]:
        if kind not in ("conv", "dwconv", "linear"):
            raise ValueError(f"unknown op kind {kind!r}")
        return getattr(self, kind)

    def for_layer(self, spec: LayerSpec) -> tuple[Precision, ...]:
        return self.for_kind(spec.kind)

    @property
    def all(self) -> tuple[Precision, ...]:
        return tuple(sorted(set(self.conv) | set(self.dwconv) | set(self.linear)))

    @property
    def native(self) -> tuple[Precision, ...]:
        """Every offered precision that runs as a real kernel (``all`` minus ``emulated``)."""
        return tuple(p for p in self.all if p not in self.emulated)


@dataclass(frozen=True)
class DeviceInfo:
    """Who measured: ``fingerprint`` is a stable hash of ``details`` (CPU model and flags, ISA, runtime
    versions, thread count); a LUT keyed by another fingerprint is refused."""

    fingerprint: str
    details: Mapping[str, str] = field(default_factory=dict)
    emulated: bool = False
    energy_counter: str | None = None  # e.g. a powercap path, when energy can be measured


@dataclass(frozen=True)
class ExportResult:
    out_dir: str
    artifact: str  # the file a deployment loads (model.onnx, model.so)
    manifest: str  # manifest.json path
    integer_layers: tuple[str, ...] = ()  # layers verified to run as integer kernels
    float_layers: tuple[str, ...] = ()  # layers left float (by plan, or because the target could not)
    warnings: tuple[str, ...] = ()


@runtime_checkable
class Target(Protocol):
    """A backend: what it runs, how to build and time one layer, how to build and time a whole model."""

    id: str  # e.g. "ort-x86", "tvm:arm-a72", "fake"
    precisions: TargetPrecisions
    placement: str  # where its exporter wants activation quantizers: "tensor" or "layer" (hwmpq/qmodules.py)

    def device(self) -> DeviceInfo: ...

    def build_layer(self, spec: LayerSpec, precision: Precision) -> BuildResult: ...

    def run(self, build: BuildResult, config: MeasureConfig) -> RunResult: ...


# Optional methods a real backend adds (the profiler and the search check with hasattr):
#   build_transition(shape: tuple[int, ...], src: Precision, dst: Precision) -> BuildResult
#       what it costs to hand a tensor of ``shape`` from a layer at ``src`` to one at ``dst``
#   build_pair(src_spec, src: Precision, dst_spec, dst: Precision, activation: str, merge: str) -> BuildResult
#       the same, timed with the edge's own two layers and activation (src_spec's output is dst_spec's input)
#   build_overhead() -> BuildResult        the per-model constant (an empty session, I/O binding)
#   energy(spec, precision, latency_ms) -> tuple[float | None, str]   (energy_mj, "measured"|"modeled")
#   export(model, plan, example_input, out_dir, **options) -> ExportResult
#   measure_artifact(export: ExportResult, config: MeasureConfig) -> RunResult
