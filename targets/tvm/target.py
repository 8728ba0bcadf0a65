"""``tvm:PRESET``: build one layer with TVM (Relax, int8 / bitserial integer ops, optional MetaSchedule
tuning), link it for the board, and time it over RPC (or in this process for ``host`` without --rpc)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import numpy as np

from hwmpq.records import BuildResult, LayerSpec, MeasureConfig, Precision, RunResult

from ..base import Capabilities, DeviceInfo, TargetPrecisions
from . import rpc as rpcmod
from .presets import get_preset, tvm_target

DEFAULT_WORK_DIR = "hwmpq-tvm-work"


class TvmTarget:
    """A TVM backend for one preset. ``work_dir`` holds built layers and the tuning database (give the
    folder of the LUT so tuning is kept beside it). ``emulated``: None = detect (qemu-user), or force."""

    placement = "tensor"  # one quantizer per tensor: integer layers pass codes to each other (stream.py)
    # transitions are timed with stand-in layers (no pairs); no energy model; no per-kernel trace
    capabilities = Capabilities(transitions=True, overhead=True, export=True, measure_artifact=True)

    def __init__(self, preset: str = "host", *, rpc: str | None = None, tracker: str | None = None,
                 key: str | None = None, tune_trials: int = 0, work_dir: str | None = None,
                 timeout_s: float = 120.0, emulated: bool | None = None, threads: int = 1) -> None:
        self.preset = get_preset(preset)
        self.id = f"tvm:{self.preset.name}"
        self.precisions: TargetPrecisions = self.preset.precisions
        self.dot_intrin = self.preset.dot_intrin()  # int8 dense conv / linear instruction (None: Relax kernel)
        self.fp_kernel = self.preset.fp_kernel()  # fp32 dense conv / linear tiled kernel (None: Relax ops)
        self.remote = rpcmod.RemoteSpec(rpc, tracker, key, timeout_s)
        if tune_trials < 0:
            raise ValueError(f"tune_trials must be >= 0, got {tune_trials}")
        self.tune_trials = tune_trials
        self.threads = threads  # the profiler's default MeasureConfig.threads
        self.timeout_s = timeout_s
        self.work_dir = Path(work_dir or os.environ.get("HWMPQ_TVM_WORK_DIR", DEFAULT_WORK_DIR))
        self._emulated = emulated
        self._pool = rpcmod.SessionPool(self.remote) if self.remote.remote else None
        self._device: DeviceInfo | None = None
        self._target = None

    # ------------------------------------------------------------------ device
    def device(self) -> DeviceInfo:
        if self._device is None:
            details = self._remote_details() if self._pool else _host_details()
            details["preset"] = self.preset.name
            details["tvm_target"] = str(self.tvm_target)  # resolved (host: mcpu/mattr from cpuinfo)
            details["tvm_client"] = _tvm_version()
            if self.dot_intrin is not None:  # int8 rows measure that kernel: not comparable with others
                details["int8_kernel"] = self.dot_intrin.kernel_name
            if self.fp_kernel is not None:  # likewise the fp32 rows
                details["fp32_kernel"] = self.fp_kernel.name
            emulated = details.get("emulated_guess") == "True" if self._emulated is None else self._emulated
            details["emulated"] = str(emulated)
            stable = {k: v for k, v in details.items() if k != "emulated_guess"}
            fp = hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]
            self._device = DeviceInfo(fingerprint=f"{self.id}-{fp}", details=details, emulated=emulated)
        return self._device

    def _remote_details(self) -> dict[str, str]:
        sess = self._pool.get()
        try:
            return rpcmod.remote_fingerprint(sess, self.timeout_s)
        except Exception:
            self._pool.drop(sess)
            raise

    @property
    def tvm_target(self):
        if self._target is None:
            self._target = tvm_target(self.preset)
        return self._target

    # ------------------------------------------------------------------ build
    def build_layer(self, spec: LayerSpec, precision: Precision) -> BuildResult:
        if precision not in self.precisions.for_layer(spec):
            return BuildResult(None, f"{self.id} cannot run {precision.label} for a {spec.kind} layer; "
                                     f"allowed: {[p.label for p in self.precisions.for_layer(spec)]}")
        from .layers import single_layer_module

        intrin = self.dot_intrin
        return self._build(f"{spec.signature}-{precision.label}",
                           lambda: single_layer_module(spec, precision, intrin=intrin),
                           f"building {spec.fqn or spec.signature} at {precision.label}")

    def build_transition(self, shape: tuple[int, ...], src: Precision, dst: Precision) -> BuildResult:
        """The chain ``stand_in(src) -> glue -> stand_in(dst)`` on a tensor of ``shape`` (layers.py:
        ``transition_module``), the glue being what export emits between two layers."""
        from .layers import stand_in_spec, transition_module

        try:
            spec = stand_in_spec(shape)
        except ValueError as e:
            return BuildResult(None, f"{self.id}: transition on {tuple(shape)}: {e}")
        for p in (src, dst):
            if p not in self.precisions.for_layer(spec):
                return BuildResult(None, f"{self.id} cannot run {p.label} for the transition stand-in "
                                         f"({spec.kind}); allowed: {[q.label for q in self.precisions.for_layer(spec)]}")
        dims = "x".join(map(str, spec.input_shape))
        return self._build(f"transition-{dims}-{src.label}-{dst.label}",
                           lambda: transition_module(shape, src, dst, intrin=self.dot_intrin),
                           f"building the transition {dims} {src.label}->{dst.label}")

    def transition_stand_in(self, shape: tuple[int, ...]) -> LayerSpec:
        """The neighbour layer the transition chains use (a 1x1 conv, or linear); profile it as a layer too."""
        from .layers import stand_in_spec

        return stand_in_spec(tuple(shape))

    def _build(self, name: str, make, what: str) -> BuildResult:
        """Compile ``make() -> (IRModule, inputs)`` once into ``layers/PRESET/name/`` (reused if present)."""
        out = self.work_dir / "layers" / self.preset.name / name
        kernel = f"-{self.dot_intrin.kernel_name}" if self.dot_intrin else ""
        kernel += f"-{self.fp_kernel.name}" if self.fp_kernel else ""
        lib = out / f"t{self.tune_trials}{kernel}.so"  # another int8/fp32 kernel or budget: another file
        try:
            mod, inputs = make()
            if not lib.exists():
                self._compile_to(mod, lib)
            np.savez(out / "inputs.npz", *inputs)
        except Exception as e:  # noqa: BLE001 - any TVM failure is a recorded build result
            return BuildResult(None, f"{self.id}: {what} failed: {type(e).__name__}: {_first_lines(str(e))}")
        return BuildResult(json.dumps({"lib": str(lib), "inputs": str(out / "inputs.npz")}))

    def build_overhead(self) -> BuildResult:
        """The per-model constant: one VM call of an identity ``main`` (call + argument overhead)."""
        out = self.work_dir / "layers" / self.preset.name / "overhead"
        lib = out / "t0.so"
        try:
            from tvm import relax

            x = np.zeros(1, np.float32)
            bb = relax.BlockBuilder()
            v = relax.Var("x", relax.TensorType(x.shape, "float32"))
            with bb.function("main", [v]):
                bb.emit_func_output(v)
            if not lib.exists():
                from .tuning import compile_with_database

                export_library(compile_with_database(bb.get(), self.tvm_target, self.preset, None), lib, self.preset)
            np.savez(out / "inputs.npz", x)
        except Exception as e:  # noqa: BLE001
            return BuildResult(None, f"{self.id}: building the overhead probe failed: {_first_lines(str(e))}")
        return BuildResult(json.dumps({"lib": str(lib), "inputs": str(out / "inputs.npz")}))

    def _compile_to(self, mod, lib: Path) -> None:
        from .tuning import compile_with_database, tune

        if self.fp_kernel is not None:  # fp32 dense convs / linear: the tiled kernel (rows and exports alike)
            from .fp_lowering import lower_float_layers

            mod = lower_float_layers(mod, self.fp_kernel)
        if self.tune_trials:
            tune(mod, self.tvm_target, self.preset, self.work_dir, self.tune_trials, tracker=self.remote.tracker,
                 key=self.remote.key, timeout_s=self.timeout_s)
        ex = compile_with_database(mod, self.tvm_target, self.preset, self.work_dir)
        export_library(ex, lib, self.preset)

    # ------------------------------------------------------------------ run
    def run(self, build: BuildResult, config: MeasureConfig) -> RunResult:
        if build.artifact is None:
            return RunResult(None, build.error_msg or "nothing was built")
        art = json.loads(build.artifact)
        with np.load(art["inputs"]) as z:
            inputs = [z[k] for k in sorted(z.files, key=lambda n: int(n.split("_")[1]))]
        if self._pool is None:
            if not self.preset.is_host:
                return RunResult(None, f"{self.id} runs on a board: pass --rpc HOST:PORT or --tracker HOST:PORT "
                                       "--key K")
            return _guarded(lambda: rpcmod.time_local(art["lib"], inputs, config), "local run")
        return self._run_remote(art["lib"], inputs, config)

    def _run_remote(self, lib: str, inputs: list[np.ndarray], config: MeasureConfig) -> RunResult:
        try:
            sess = self._pool.get()
        except Exception as e:  # noqa: BLE001 - unreachable device: a result
            return RunResult(None, f"{self.id}: cannot reach {self.remote.label}: {_first_lines(str(e))}")
        budget_s = config.timeout_s if config.timeout_s > 0 else self.timeout_s
        try:
            ms = rpcmod.call_with_timeout(lambda: rpcmod.time_remote(sess, lib, inputs, config), budget_s,
                                          f"timing on {self.remote.label}")
        except rpcmod.RemoteTimeout as e:
            self._pool.drop(sess)
            return RunResult(None, f"{self.id}: timeout: {e}; session dropped")
        except Exception as e:  # noqa: BLE001 - a dead device or a remote error is a result
            self._pool.drop(sess)
            return RunResult(None, f"{self.id}: remote run on {self.remote.label} failed (device gone?): "
                                   f"{type(e).__name__}: {_first_lines(str(e))}")
        return RunResult(tuple(ms))

    def close(self) -> None:
        if self._pool:
            self._pool.close()

    # ------------------------------------------------------------------ export (see export.py)
    def export(self, model, plan, example_input, out_dir: str, **options):
        from .export import export_model

        return export_model(self, model, plan, example_input, out_dir, **options)

    def measure_artifact(self, export, config: MeasureConfig) -> RunResult:
        from .export import measure_export

        return measure_export(self, export, config)


def export_library(ex, lib: Path, preset) -> None:
    """Link ``ex`` for the preset's board (cross compiler for ARM), atomically."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp.so")
    if preset.cross_compiler:
        from tvm.support import cc

        ex.export_library(str(tmp), fcompile=cc.cross_compiler(preset.cross_compiler))
    else:
        ex.export_library(str(tmp))
    os.replace(tmp, lib)


def _guarded(fn, what: str) -> RunResult:
    try:
        return RunResult(tuple(fn()))
    except Exception as e:  # noqa: BLE001
        return RunResult(None, f"{what} failed: {type(e).__name__}: {_first_lines(str(e))}")


def _first_lines(text: str, n: int = 4) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[:n])[:600]


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def _host_details() -> dict[str, str]:
    import tvm

    model = "unknown"
    try:
        model = rpcmod._cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        pass
    return {"llvm_get_system_triple": str(tvm.get_global_func("target.llvm_get_system_triple")()),
            "llvm_get_system_cpu": str(tvm.get_global_func("target.llvm_get_system_cpu")()),
            "cpu_model": model, "uname": " ".join(platform.uname()), "cores": str(os.cpu_count())}
