"""The ``ort-x86`` target: ONNX Runtime on the local x86 CPU.

Precisions are data (:data:`ORT_PRECISIONS`). Only w8a8 becomes integer kernels (uint8 activations,
int8 per-channel weights, QDQ -> QLinearConv/QGemm). w4a8 (native int4 weights) and w16a16 (int16) are
accepted by ORT but run as float compute between Q/DQ; linear w4a32 is int4 weight-only MatMulNBits.
They are all offered so that the measured LUT shows what is slow, instead of this file guessing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import onnx

from hwmpq.records import FP32, BitPlan, BuildResult, LayerSpec, MeasureConfig, Precision, RunResult

from ..base import Capabilities, DeviceInfo, ExportResult, TargetPrecisions
from . import layers
from .timing import DISABLED_OPTIMIZERS, fast_int8_is_exact, time_model

W8A8, W4A8, W16A16, W4A32 = Precision(8, 8), Precision(4, 8), Precision(16, 16), Precision(4, 32)
ORT_PRECISIONS = TargetPrecisions(
    conv=(FP32, W8A8, W4A8, W16A16),
    dwconv=(FP32, W8A8, W4A8, W16A16),
    linear=(FP32, W8A8, W4A8, W16A16, W4A32),
    emulated=(W4A8, W16A16),  # float compute between Q/DQ; linear W4A32 is a real MatMulNBits kernel
)


def cpu_details() -> dict[str, str]:
    """CPU model and the ISA flags that matter for integer kernels (hwmpq/device.py)."""
    from hwmpq.device import local_cpu_details

    return {str(k): str(v) for k, v in local_cpu_details().items()}


class OrtTarget:
    """ONNX Runtime CPU execution provider; ``threads`` is ``intra_op_num_threads`` for every session;
    ``exact_u8s8`` selects ORT's exact int8 path (targets/ort/timing.py); ``None`` (the default) decides by
    :func:`fast_int8_is_exact`: on a CPU with VNNI the fast path is already exact and ~2.4x faster, on
    AVX2 alone it saturates;
    ``clock`` is how a run is timed (targets/ort/timing.py: ``auto`` = thread CPU time at 1 thread, wall
    time otherwise); it is part of the device fingerprint, so LUTs timed differently never mix."""

    id = "ort-x86"
    precisions = ORT_PRECISIONS
    placement = "tensor"  # one quantizer per tensor: ORT's QDQ convention (targets/ort/export.py)
    # whole models export and run in seconds, so a profile also traces kernels in them (kernel_trace)
    capabilities = Capabilities(transitions=True, pairs=True, overhead=True, energy=True, kernel_trace=True,
                                export=True, measure_artifact=True, cleanup=True)

    def __init__(self, threads: int = 1, workdir: str | None = None, clock: str = "auto",
                 exact_u8s8: bool | None = None, **_: object) -> None:
        from .timing import resolve_clock

        if int(threads) < 1:
            raise ValueError(f"OrtTarget: threads must be >= 1, got {threads}")
        self.threads = int(threads)
        self.clock = resolve_clock(clock, self.threads)
        self.exact_u8s8 = (not fast_int8_is_exact()) if exact_u8s8 is None else bool(exact_u8s8)
        self._workdir = workdir
        self._counter = 0

    # ------------------------------------------------------------ identity
    def device(self) -> DeviceInfo:
        import onnxruntime as ort

        from ..energy import powercap_counter

        details = {**cpu_details(), "onnxruntime": ort.__version__, "threads": str(self.threads),
                   "clock": self.clock, "exact_u8s8": str(self.exact_u8s8)}
        fp = hashlib.sha256(json.dumps(details, sort_keys=True).encode()).hexdigest()[:16]
        return DeviceInfo(fingerprint=fp, details=details, energy_counter=powercap_counter())

    # ------------------------------------------------------------ building
    def _dir(self) -> Path:
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="hwmpq-ort-")
        Path(self._workdir).mkdir(parents=True, exist_ok=True)
        return Path(self._workdir)

    def _save(self, model: onnx.ModelProto, stem: str) -> BuildResult:
        self._counter += 1
        path = self._dir() / f"{stem}_{self._counter}.onnx"
        try:
            onnx.checker.check_model(model)
            onnx.save(model, path)
        except Exception as e:  # onnx raises ValidationError and others
            return BuildResult(None, f"building {stem} failed: {type(e).__name__}: {e}")
        return BuildResult(str(path))

    def build_layer(self, spec: LayerSpec, precision: Precision) -> BuildResult:
        if precision not in self.precisions.for_layer(spec):
            return BuildResult(None, f"ort-x86 cannot run {precision.label} for a {spec.kind} layer; "
                                     f"allowed: {[p.label for p in self.precisions.for_layer(spec)]}")
        try:
            model = layers.layer_model(spec, precision)
        except ValueError as e:
            return BuildResult(None, str(e))
        return self._save(model, f"{spec.kind}_{spec.signature}_{precision.label}")

    def build_pair(self, src_spec: LayerSpec, src: Precision, dst_spec: LayerSpec, dst: Precision,
                   activation: str = "relu", merge: str = "none", pool: tuple[int, ...] = ()) -> BuildResult:
        """The edge's own two layers chained, ``src_spec`` at ``src`` into ``dst_spec`` at ``dst``, joined by
        ``activation`` (records.ACTIVATIONS), after a residual add if ``merge`` is "add", through the max
        pool ``pool`` (``Edge.pool``) if any."""
        for spec, p in ((src_spec, src), (dst_spec, dst)):
            if p not in self.precisions.for_layer(spec):
                return BuildResult(None, f"ort-x86 cannot run {p.label} for a {spec.kind} layer ({spec.fqn})")
        try:
            model = layers.chain_model(src_spec, src, dst_spec, dst, activation, merge, pool)
        except ValueError as e:
            return BuildResult(None, str(e))
        return self._save(model, f"pair_{src.label}_{dst.label}")

    def build_transition(self, shape: tuple[int, ...], src: Precision, dst: Precision) -> BuildResult:
        return self._save(layers.transition_model(tuple(shape), src, dst), f"transition_{src.label}_{dst.label}")

    def transition_stand_in(self, shape: tuple[int, ...]) -> LayerSpec:
        """The neighbour layer the transition chains use; profile it as a layer too."""
        return layers.stand_in_spec(tuple(shape))

    def kernel_samples(self, artifact: str, runs: int) -> list[tuple[str, tuple[int, ...], list[float]]]:
        """(op, first input's shape, ms per run) of each layer-computing kernel of ``artifact``, in execution
        order (ORT's node profiler; profilers/context.py compares a layer's kernel in the whole model and alone)."""
        from .timing import kernel_samples

        return kernel_samples(artifact, self.threads, runs, str(self._dir()), self.exact_u8s8)

    def build_layer_with_activation(self, spec: LayerSpec, precision: Precision, activation: str,
                                    merge: str = "none") -> BuildResult:
        """The layer row's graph followed, on a float output, by the residual add (``merge`` "add") and
        ``activation`` of its output edge (targets/ort/layers.py: ``layer_model``)."""
        try:
            model = layers.layer_model(spec, precision, activation, merge)
        except ValueError as e:
            return BuildResult(None, str(e))
        return self._save(model, f"{spec.kind}_{spec.signature}_{precision.label}_{merge}_{activation}")

    def build_overhead(self) -> BuildResult:
        return self._save(layers.overhead_model(), "overhead")

    # ------------------------------------------------------------ timing
    def run(self, build: BuildResult, config: MeasureConfig) -> RunResult:
        if build.artifact is None:
            return RunResult(None, build.error_msg or "nothing was built")
        if config.threads != self.threads:
            return RunResult(None, f"MeasureConfig.threads={config.threads} but this target was made with "
                                   f"threads={self.threads}; make OrtTarget(threads={config.threads})")
        return time_model(build.artifact, config, clock=self.clock, exact_u8s8=self.exact_u8s8)

    def energy(self, spec: LayerSpec, precision: Precision, latency_ms: float | None) -> tuple[float | None, str]:
        from ..energy import layer_energy

        return layer_energy(spec, precision, latency_ms)

    # ------------------------------------------------------------ whole models
    def export(self, model, plan: BitPlan, example_input, out_dir: str, **options) -> ExportResult:
        """``model`` is already ``quantize_``'d with ``plan`` and trained/calibrated (see targets/cli.py)."""
        from hwmpq.graph import analyse
        from hwmpq.qmodules import float_view

        from .export import write_export

        specs, _ = analyse(float_view(model), example_input)
        allowed = {s.fqn: self.precisions.for_layer(s) for s in specs}
        plan.validate_against([s.fqn for s in specs], allowed)
        extra = {"session_config": {"session.qdqisint8allowed": "1",
                                    "session.x64quantprecision": "1" if self.exact_u8s8 else "0"},
                 "disabled_optimizers": list(DISABLED_OPTIMIZERS),
                 **(options.get("manifest_extra") or {})}
        return write_export(model, plan, specs, example_input, out_dir, self.threads, manifest_extra=extra,
                            exact_u8s8=self.exact_u8s8)

    def measure_artifact(self, export: ExportResult, config: MeasureConfig) -> RunResult:
        """End-to-end latency of an exported model.onnx (input from the manifest's input shape)."""
        return self.run(BuildResult(export.artifact), config)

    def cleanup(self) -> None:
        if self._workdir and Path(self._workdir).name.startswith("hwmpq-ort-"):
            shutil.rmtree(self._workdir, ignore_errors=True)
