"""Whole mixed-precision model -> Relax module with real integer layers per plan -> ``model.so`` (cross
linked for the board) + ``params``-free manifest; verified against the torch fake-quant model.

The model is quantized in tensor placement (hwmpq/placement.py: one activation quantizer per tensor, the
quantizers the ort-x86 exporter writes, so one torch fake-quant model is the reference of both). Integer
layers pass codes to each other NHWC, residual adds and global pools compute on codes, float layers
(fp32 in the plan) are islands with a dequantize where they start and a quantize where they end
(stream.py). Weights are constants inside the library.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from hwmpq.qmodules import QuantLayer, placement_of, quantize, runs_own_forward
from hwmpq.records import W8A8, BitPlan, MeasureConfig, RunResult, atomic_write_text, to_jsonable

from ..base import ExportResult
from .float_ops import FloatOpError
from .layers import uses_dot_kernel
from .stream import QUANT_PREFIX, StreamError, build_stream, grid_of


class ExportError(ValueError):
    """The model or plan cannot be exported to this TVM preset; the message names the layer."""


def build_relax(qmodel: fx.GraphModule, example: torch.Tensor, specs, intrin=None) -> object:
    """The tensor-placed quantized model (after ``quantize`` and calibration) as a Relax IRModule
    (``intrin``: the target's dot-product instruction; w8a8 dense conv / linear layers then use the kernel
    the profiler builds for it, dotconv.py)."""
    return build_with_glue(qmodel, example, specs, intrin)[0]


def build_with_glue(qmodel: fx.GraphModule, example: torch.Tensor, specs, intrin=None) -> tuple[object, dict]:
    """(:func:`build_relax`'s IRModule, the conversions it holds: quantize, dequantize, requantize and
    transpose counts)."""
    try:
        return build_stream(qmodel, example, specs, intrin)
    except (StreamError, FloatOpError) as e:
        raise ExportError(str(e)) from None


def _spec_of(fqn: str, mod: nn.Module):
    """The layer as the Relax builders emit it: from its attributes (so a subclass whose own forward does
    more than its kernel, e.g. pads first, is refused)."""
    from hwmpq.records import LayerSpec

    if runs_own_forward(mod):
        raise ExportError(f"layer {fqn!r} ({type(mod).__name__}) runs a forward of its own around its kernel; "
                          "the TVM exporter emits a layer from its attributes only and would drop what that "
                          "forward does: write the model with a plain Conv2d/Linear (and e.g. nn.ZeroPad2d "
                          "before it)")
    if isinstance(mod, nn.Linear):
        return LayerSpec(fqn, "linear", mod.in_features, mod.out_features, bias=mod.bias is not None)
    kind = "dwconv" if mod.groups > 1 and mod.groups == mod.in_channels else "conv"
    return LayerSpec(fqn, kind, mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                     _explicit_padding(fqn, mod), mod.dilation, mod.groups, bias=mod.bias is not None)


def _explicit_padding(fqn: str, mod: nn.Conv2d) -> tuple[int, int]:
    """``mod.padding`` as numbers: ``'valid'`` is 0, ``'same'`` half the dilated kernel where that is
    symmetric (torch pads an odd total more at the end, which one padding per axis cannot say)."""
    if not isinstance(mod.padding, str):
        return tuple(mod.padding)
    if mod.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size, strict=True)]
    if any(t % 2 for t in totals):
        raise ExportError(f"layer {fqn!r}: padding='same' with kernel {tuple(mod.kernel_size)} pads "
                          "asymmetrically; give explicit padding (or nn.ZeroPad2d before the conv)")
    return tuple(t // 2 for t in totals)


def prepare_model(model: nn.Module, plan: BitPlan, example: torch.Tensor) -> tuple[fx.GraphModule, list[str]]:
    """The model with quantizers: used as given when it is quantized in tensor placement (learned scales),
    else a copy is quantized per plan and calibrated on ``example`` (said in the returned warnings)."""
    import copy

    warnings = []
    found = placement_of(model)
    if found == "layer":
        raise ExportError("the model's quantizers are placed per layer (hwmpq.qmodules.quantize_); the TVM "
                          "exporter keeps one integer stream and needs tensor placement: quantize the float "
                          "model with hwmpq.quantize(model, plan) (placement='tensor', the default)")
    if found is None:
        model = quantize(copy.deepcopy(model), plan, placement="tensor")
        warnings.append("model had no trained quantizers: scales calibrated from the example input")
    model.eval()
    with torch.no_grad():
        model(example)
    return model, warnings


def export_model(target, model: nn.Module, plan: BitPlan, example_input: torch.Tensor, out_dir: str,
                 **options) -> ExportResult:
    """Compile ``model`` per ``plan`` for ``target`` (a TvmTarget), write model.so + manifest.json, and
    verify its output against the torch fake-quant model: in this process for ``host``, over RPC for a
    board; a board preset without a remote writes both files with ``"verified": false`` and the reason."""
    qmodel, warnings = prepare_model(model, plan, example_input)
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, (QuantLayer, nn.Conv2d, nn.Linear))
              and not any(n.startswith(q + ".") for q in _quant_names(qmodel))}
    specs = {n: _spec_of(n, m.layer if isinstance(m, QuantLayer) else m) for n, m in layers.items()}
    allowed = {n: target.precisions.for_layer(s) for n, s in specs.items()}
    try:
        plan.validate_against(list(specs), allowed)
    except ValueError as e:
        raise ExportError(f"plan does not fit {target.id}: {e}") from None
    intrin = target.dot_intrin
    mod, glue = build_with_glue(qmodel, example_input, specs, intrin)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    target._compile_to(mod, out / "model.so")
    build_s = time.time() - t0
    unverified = no_device_reason(target)
    if unverified is None:
        with torch.no_grad():
            ref = qmodel(example_input).numpy()
        got = run_artifact(target, str(out / "model.so"), [example_input.numpy().astype(np.float32)])
        check = agreement(ref, got, _output_scale(qmodel))
        verified = bool(check["ok"])
    else:  # a cross-compile on a build server: the artifact, and the manifest says it is unchecked
        check, verified = unverified, False
        warnings.append(f"model.so NOT verified: {unverified}")
    device = target.device() if unverified is None else None
    integer = tuple(n for n, m in layers.items() if isinstance(m, QuantLayer))
    floats = tuple(n for n in layers if n not in integer)
    manifest = {
        "target": target.id, "preset_target": dict(target.preset.target),
        "device": None if device is None else device.fingerprint,
        "emulated": None if device is None else device.emulated,
        "verified": verified, "plan": to_jsonable(plan), "placement": "tensor", "integer_layers": list(integer),
        "float_layers": list(floats),
        "int8_kernel": intrin.kernel_name if intrin else "relax",
        "dot_layers": [n for n in integer if layers[n].precision == W8A8 and uses_dot_kernel(specs[n], intrin)],
        "glue": glue, "scales": _scales(qmodel), "tensor_scales": _tensor_scales(qmodel),
        "verification": check, "build_s": build_s,
        "tune_trials": target.tune_trials, "input_shape": list(example_input.shape),
        "versions": {"tvm": _tvm_version(), "torch": torch.__version__},
        "time_unix": time.time(), **{k: v for k, v in options.items() if isinstance(v, (int, float, str))},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1, default=str))
    np.save(out / "example_input.npy", example_input.numpy())
    if unverified is None and not verified:
        warnings.append(f"verification failed: {check}")
    return ExportResult(str(out), str(out / "model.so"), str(out / "manifest.json"), integer, floats,
                        tuple(warnings))


def _quant_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def _output_scale(model: fx.GraphModule) -> float | None:
    """The step of the model's output codes when a quantizer produces it (None: a float output)."""
    out = next(n for n in model.graph.nodes if n.op == "output").args[0]
    if isinstance(out, fx.Node) and out.op == "call_module" and out.target.startswith(QUANT_PREFIX):
        return grid_of(model.get_submodule(out.target)).scale
    return None


def _scales(model: nn.Module) -> dict[str, dict[str, object]]:
    """Per integer layer its input step and weight steps."""
    return {n: {"s_in": float(m.input_quantizer.effective_scale().detach().reshape(())),
                "in_signed": m.input_quantizer.signed, "s_w": m.w_quant.effective_scale().detach().tolist()}
            for n, m in model.named_modules() if isinstance(m, QuantLayer) and m.input_quantizer is not None}


def _tensor_scales(model: nn.Module) -> dict[str, dict[str, object]]:
    """Per tensor quantizer its step and code range."""
    return {n: {"scale": g.scale, "lo": g.lo, "hi": g.hi}
            for n, g in ((n, grid_of(q)) for n, q in getattr(model, "tensor_quant", {}).items())}


def agreement(ref: np.ndarray, got: np.ndarray, lsb: float | None) -> dict[str, object]:
    """Output agreement: max |diff|, in units of the last layer's output step when it is quantized, and
    the fraction of outputs that are exactly equal; ok = within 2 LSB everywhere (float: 1e-4 rel)."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    res = {"max_abs": float(diff.max()), "frac_equal": float(np.mean(diff <= 1e-6 * (1 + np.abs(ref)))),
           "argmax_equal": float(np.mean(ref.argmax(-1) == got.argmax(-1))) if ref.ndim == 2 else None}
    if lsb:
        res["max_lsb"] = float(diff.max() / lsb)
        # float32 values of whole codes: 2 steps apart reads as 2.000003 steps
        res["ok"] = bool(res["max_lsb"] <= 2.0 + 1e-3)
    else:
        res["ok"] = bool(diff.max() <= 1e-4 * (1 + np.abs(ref).max()))
    return res


def no_device_reason(target) -> str | None:
    """Why the artifact cannot be run here (a board preset without --rpc/--tracker), or None."""
    if target._pool is not None or target.preset.is_host:
        return None
    return (f"no --rpc/--tracker given: {target.id} runs on a board, so model.so was cross-compiled but not run "
            "against the torch fake-quant model; export again with --rpc HOST:PORT or --tracker HOST:PORT "
            "--key K to verify it on the device")


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


def run_artifact(target, lib: str, inputs: list[np.ndarray]) -> np.ndarray:
    """Run the library once: on the target's device over RPC, or in this process for ``host``."""
    from . import rpc as rpcmod

    if target._pool is not None:
        sess = target._pool.get()
        return rpcmod.call_with_timeout(lambda: rpcmod.outputs_remote(sess, lib, inputs), target.timeout_s,
                                        "verification run")
    if not target.preset.is_host:
        raise ExportError(f"{target.id}: verification needs the board: pass --rpc or --tracker")
    import tvm
    from tvm import relax, runtime

    vm = relax.VirtualMachine(runtime.load_module(lib), tvm.cpu())
    return vm["main"](*[runtime.tensor(x) for x in inputs]).numpy()


def measure_export(target, export: ExportResult, config: MeasureConfig) -> RunResult:
    """Time the whole exported model on the target's device (same protocol as single layers)."""
    from hwmpq.records import BuildResult

    inputs = Path(export.out_dir) / "inputs.npz"
    np.savez(inputs, np.load(Path(export.out_dir) / "example_input.npy").astype(np.float32))
    return target.run(BuildResult(json.dumps({"lib": export.artifact, "inputs": str(inputs)})), config)
