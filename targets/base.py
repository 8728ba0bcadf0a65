"""What every backend provides. Builder and runner are apart and pass plain records (TVM meta_schedule
style): ``build_layer(spec, precision) -> BuildResult``, ``run(build, config) -> RunResult``; failures
and timeouts are results (``error_msg``), never exceptions lost in a log."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from hwmpq.records import FP32, BitPlan, BuildResult, LayerSpec, MeasureConfig, Precision, RunResult


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

    def restricted(self, keep: Iterable[Precision]) -> TargetPrecisions:
        """Only the offered precisions in ``keep``, per op kind; fp32 always stays (every layer can fall
        back to it, and the LUT prices the fallback)."""
        keep = set(keep) | {FP32}
        return TargetPrecisions(conv=tuple(p for p in self.conv if p in keep),
                                dwconv=tuple(p for p in self.dwconv if p in keep),
                                linear=tuple(p for p in self.linear if p in keep),
                                emulated=tuple(p for p in self.emulated if p in keep))

    def select(self, spec: str | Iterable[str | Precision]) -> TargetPrecisions:
        """The precisions a user asked for: ``"native"`` (the real kernels: :attr:`native`), ``"all"``, or
        labels (``"fp32,w8a8"`` or a sequence). A label the target does not offer is a ValueError that
        lists what it offers."""
        if isinstance(spec, str) and spec.strip() in ("native", "all"):
            return self if spec.strip() == "all" else self.restricted(self.native)
        labels = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
        wanted = []
        for s in labels:
            if isinstance(s, Precision):
                wanted.append(s)
                continue
            try:
                wanted.append(Precision.parse(s))
            except ValueError:
                raise ValueError(f"precision {s!r} is not a label like fp32 or w8a8 (or 'native', 'all')") from None
        unknown = [p.label for p in wanted if p not in self.all]
        if unknown or not wanted:
            raise ValueError(f"precisions {unknown or labels} are not offered by this target; it offers "
                             f"{[p.label for p in self.all]} ('native': {[p.label for p in self.native]})")
        return self.restricted(wanted)


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


def with_precisions(target, precisions: TargetPrecisions):
    """``target`` offering only ``precisions`` (a shallow copy: it shares the original's sessions, work
    directory and RPC connection); what a profile or a LUT restricted to some precisions sees."""
    if precisions == target.precisions:
        return target
    view = copy.copy(target)
    view.precisions = precisions
    return view


@dataclass(frozen=True)
class Capabilities:
    """What a target can do beyond building and timing one layer: data its callers read (a switched-off
    capability is ``dataclasses.replace(target.capabilities, pairs=False)``). Each ``True`` promises the
    methods of the protocol beside it (:func:`check_capabilities`)."""

    transitions: bool = False  # TransitionBuilder: the cost of handing a tensor between two precisions
    pairs: bool = False  # PairBuilder: a transition timed with the edge's own two layers
    overhead: bool = False  # OverheadBuilder: the per-model constant
    energy: bool = False  # EnergyModel: energy per layer row (measured or modeled)
    kernel_trace: bool = False  # KernelTracer: per-kernel times inside a whole model (lut context rows)
    export: bool = False  # Exporter: a whole quantized model as a deployable artifact
    measure_artifact: bool = False  # ArtifactMeasurer: end-to-end latency of an exported artifact
    cleanup: bool = False  # Cleanup: built files to remove when a profile ends

    @property
    def exports_and_measures(self) -> bool:
        return self.export and self.measure_artifact


@runtime_checkable
class Target(Protocol):
    """A backend: what it runs, how to build and time one layer; ``capabilities`` says what else."""

    id: str  # e.g. "ort-x86", "tvm:arm-a72", "fake"
    precisions: TargetPrecisions
    placement: str  # where its exporter wants activation quantizers: "tensor" or "layer" (hwmpq/qmodules.py)
    capabilities: Capabilities
    threads: int  # the default MeasureConfig.threads of a profile on this target

    def device(self) -> DeviceInfo: ...

    def build_layer(self, spec: LayerSpec, precision: Precision) -> BuildResult: ...

    def run(self, build: BuildResult, config: MeasureConfig) -> RunResult: ...


@runtime_checkable
class TransitionBuilder(Protocol):
    def build_transition(self, shape: tuple[int, ...], src: Precision, dst: Precision) -> BuildResult:
        """What it costs to hand a tensor of ``shape`` from a layer at ``src`` to one at ``dst``."""

    def transition_stand_in(self, shape: tuple[int, ...]) -> LayerSpec:
        """The neighbour layer the transition chains use (profiled as a layer too)."""


@runtime_checkable
class PairBuilder(Protocol):
    def build_pair(self, src_spec: LayerSpec, src: Precision, dst_spec: LayerSpec, dst: Precision,
                   activation: str = "relu", merge: str = "none", pool: tuple[int, ...] = ()) -> BuildResult:
        """The edge's own two layers chained (``src_spec``'s output, through the max pool ``pool`` if
        any, is ``dst_spec``'s input)."""


@runtime_checkable
class OverheadBuilder(Protocol):
    def build_overhead(self) -> BuildResult:
        """The per-model constant (an empty session, I/O binding)."""


@runtime_checkable
class EnergyModel(Protocol):
    def energy(self, spec: LayerSpec, precision: Precision, latency_ms: float | None) -> tuple[float | None, str]:
        """(energy_mj, "measured" | "modeled") of one layer row."""


@runtime_checkable
class KernelTracer(Protocol):
    def kernel_samples(self, artifact: str, runs: int) -> list[tuple[str, tuple[int, ...], list[float]]]:
        """(op, first input's shape, ms per run) of each layer-computing kernel of ``artifact``."""

    def build_layer_with_activation(self, spec: LayerSpec, precision: Precision, activation: str,
                                    merge: str = "none") -> BuildResult:
        """The layer row's graph followed by its output edge's merge and activation."""


@runtime_checkable
class Exporter(Protocol):
    def export(self, model, plan: BitPlan, example_input, out_dir: str, **options) -> ExportResult:
        """``model`` (already quantized with ``plan``) as a deployable artifact in ``out_dir``."""


@runtime_checkable
class ArtifactMeasurer(Protocol):
    def measure_artifact(self, export: ExportResult, config: MeasureConfig) -> RunResult:
        """End-to-end latency of an exported artifact."""


@runtime_checkable
class Cleanup(Protocol):
    def cleanup(self) -> None:
        """Remove the files this target built."""


# capability -> the protocol a target declaring it implements
CAPABILITY_PROTOCOLS: dict[str, type] = {
    "transitions": TransitionBuilder, "pairs": PairBuilder, "overhead": OverheadBuilder, "energy": EnergyModel,
    "kernel_trace": KernelTracer, "export": Exporter, "measure_artifact": ArtifactMeasurer, "cleanup": Cleanup,
}


def check_capabilities(target: Target) -> None:
    """Raise TypeError if ``target`` declares a capability whose protocol it does not implement."""
    caps = target.capabilities
    if not isinstance(caps, Capabilities):
        raise TypeError(f"target {target.id!r}: capabilities must be a Capabilities, got {type(caps).__name__}")
    missing = [name for name, proto in CAPABILITY_PROTOCOLS.items()
               if getattr(caps, name) and not isinstance(target, proto)]
    if missing:
        raise TypeError(f"target {target.id!r} declares {missing} but lacks their methods "
                        f"({', '.join(CAPABILITY_PROTOCOLS[m].__name__ for m in missing)})")
