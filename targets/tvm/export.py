"""Whole mixed-precision model -> Relax module with real integer layers per plan -> ``model.so`` (cross
linked for the board) + ``params``-free manifest; verified against the torch fake-quant model.

Each quantized layer is emitted as: float input -> quantize to codes (round half even, saturate) ->
NCHW->NHWC -> int8 (or bitserial) integer kernel with int32 accumulation and requantization -> NHWC->NCHW
-> dequantize. Glue between layers (ReLU, residual add, pooling, flatten, and through TVM's own torch.fx
importer any other op it knows: padding, concat, products, sigmoid, SiLU, ...) stays float32, i.e. Q/DQ at
every layer boundary, the same graph ONNX QDQ describes. Weights are constants inside the library.
"""

from __future__ import annotations

import json
import operator
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from hwmpq.graph import describe
from hwmpq.qmodules import QuantLayer, placement_of, quantize_, runs_own_forward
from hwmpq.records import W8A8, BitPlan, MeasureConfig, RunResult, atomic_write_text, to_jsonable

from ..base import ExportResult
from .int_params import int_params
from .layers import (
    emit_bitserial_layer,
    emit_dequantize,
    emit_float_layer,
    emit_int8_layer,
    emit_quantize,
    is_bitserial,
    uses_dot_kernel,
)


class ExportError(ValueError):
    """The model or plan cannot be exported to this TVM preset; the message names the layer."""


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, (QuantLayer, nn.Conv2d, nn.Linear)) or super().is_leaf_module(m, name)


def _quant_params(q: QuantLayer):
    """(IntLayerParams, s_in, s_out, in_signed, (qmin, qmax) of the input) from the learned quantizers."""
    s_in = float(q.in_quant.effective_scale().detach().reshape(-1)[0])
    s_out = float(q.out_quant.effective_scale().detach().reshape(-1)[0])
    s_w = q.w_quant.effective_scale().detach().float().numpy()
    wmin, wmax = q.w_quant.range
    shape = [-1] + [1] * (q.weight.dim() - 1)
    w_q = torch.clamp(torch.round(q.weight.detach() / torch.from_numpy(s_w).reshape(shape)), wmin, wmax)
    bias = None if q.bias is None else q.bias.detach().float().numpy()
    p = int_params(w_q.numpy().astype(np.int8), bias, s_in, s_w, s_out, q.in_quant.signed, q.precision)
    return p, s_in, s_out, q.in_quant.range


def _emit_quant_layer(bb, x, fqn: str, q: QuantLayer, spec, intrin):
    p, s_in, s_out, (qmin, qmax) = _quant_params(q)
    if q.precision != W8A8 and not is_bitserial(q.precision):
        raise ExportError(f"layer {fqn!r}: {q.precision.label} has no TVM integer kernel; use w8a8 or bitserial")
    conv = spec.kind != "linear"
    xq = emit_quantize(bb, x, s_in, (qmin, qmax), p.in_dtype, conv)
    try:
        yq = emit_int8_layer(bb, xq, spec, p, intrin) if q.precision == W8A8 else emit_bitserial_layer(bb, xq, spec, p)
    except ValueError as e:
        raise ExportError(f"layer {fqn!r} at {q.precision.label}: {e}") from None
    return emit_dequantize(bb, yq, s_out, conv)


def _emit_module(bb, x, mod: nn.Module, name: str, specs, intrin):
    from tvm import relax

    op = relax.op
    if isinstance(mod, QuantLayer):
        return _emit_quant_layer(bb, x, name, mod, specs[name], intrin)
    if isinstance(mod, (nn.Conv2d, nn.Linear)):
        b = None if mod.bias is None else mod.bias.detach().numpy()
        return emit_float_layer(bb, x, specs[name], mod.weight.detach().numpy(), b)
    if isinstance(mod, nn.ReLU):
        return bb.emit(op.nn.relu(x))
    if isinstance(mod, nn.ReLU6):
        return bb.emit(op.clip(x, 0, 6))
    if isinstance(mod, (nn.Identity, nn.Dropout)):
        return x
    if isinstance(mod, nn.Flatten):
        return bb.emit(op.reshape(x, (specs["__batch__"], -1)))
    if isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in (1, (1, 1)):
        return bb.emit(op.mean(x, axis=[2, 3], keepdims=True))
    if isinstance(mod, nn.BatchNorm2d):
        inv = (mod.weight / torch.sqrt(mod.running_var + mod.eps)).detach().numpy().reshape(1, -1, 1, 1)
        shift = (mod.bias.detach().numpy().reshape(1, -1, 1, 1) - mod.running_mean.numpy().reshape(1, -1, 1, 1) * inv)
        return bb.emit(op.add(op.multiply(x, relax.const(inv.astype(np.float32))),
                              relax.const(shift.astype(np.float32))))
    if isinstance(mod, nn.ConstantPad2d):  # ZeroPad2d too; TVM's importer has the function, not the module
        left, right, top, bottom = mod.padding
        return bb.emit(op.nn.pad(x, [0, 0, 0, 0, top, bottom, left, right], "constant", float(mod.value)))
    return None


_FUNCS = {operator.add: "add", torch.add: "add", operator.iadd: "add", F.relu: "relu", torch.relu: "relu",
          torch.flatten: "flatten", F.adaptive_avg_pool2d: "gap"}


def _emit_call(bb, node: fx.Node, args, batch: int):
    from tvm import relax

    kind = _FUNCS.get(node.target) if node.op == "call_function" else node.target
    if kind == "add":
        return bb.emit(relax.op.add(args[0], args[1]))
    if kind == "relu":
        return bb.emit(relax.op.nn.relu(args[0]))
    if kind == "gap" and args[1] in (1, (1, 1)):
        return bb.emit(relax.op.mean(args[0], axis=[2, 3], keepdims=True))
    if (kind == "flatten" and tuple(args[1:2]) == (1,) and not node.kwargs) or \
            (kind in ("view", "reshape") and len(args) == 3 and args[2] == -1):
        return bb.emit(relax.op.reshape(args[0], (batch, -1)))  # flatten(x, 1) / x.view(N, -1)
    return None


class _FloatOps:
    """Ops without a rule here, emitted in float by TVM's own torch.fx importer (what
    ``relax.frontend.torch.from_fx`` uses), on this export's block builder and values: padding,
    concat, products, sigmoid, SiLU, Hardswish, means, slicing, reshapes, ..."""

    def __init__(self, bb, model: nn.Module, env: dict) -> None:
        from tvm.relax.frontend.torch.fx_translator import TorchFXImporter

        self.model = model
        self.importer = TorchFXImporter()
        self.importer.block_builder = bb
        self.importer.named_modules = dict(model.named_modules())
        self.importer.env = env

    def _key(self, node: fx.Node):
        if node.op == "call_module":
            return type(self.importer.named_modules[node.target])
        return node.target.__name__ if node.op == "call_function" else node.target

    def emit(self, node: fx.Node):
        from tvm import relax

        imp = self.importer
        if node.op == "get_attr":
            return imp._fetch_attr(self.model, node.target)
        key = self._key(node)
        if key not in imp.convert_map:
            raise ExportError(f"{describe(node, imp.named_modules)} has no TVM export rule")
        if node.op == "call_module":  # the converters look parameters up by tensor
            for p in imp.named_modules[node.target].parameters():
                imp.params.setdefault(p, relax.const(p.detach().float().numpy()))
        try:
            return imp.convert_map[key](node)
        except Exception as e:  # noqa: BLE001 - any importer failure names the op
            raise ExportError(f"{describe(node, imp.named_modules)}: TVM's importer failed "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e


def build_relax(qmodel: nn.Module, example: torch.Tensor, specs, intrin=None) -> object:
    """The quantized model (after ``quantize_`` and calibration) as a Relax IRModule (``intrin``: the
    target's dot-product instruction; w8a8 dense conv / linear layers then use the kernel the profiler
    builds for it, dotconv.py)."""
    from tvm import relax

    graph = _Tracer().trace(qmodel)
    specs = {**specs, "__batch__": int(example.shape[0])}
    modules = dict(qmodel.named_modules())
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(tuple(example.shape), "float32"))
    env: dict[fx.Node, object] = {}
    floats = _FloatOps(bb, qmodel, env)
    with bb.function("main", [x]):
        with bb.dataflow():
            for node in graph.nodes:
                args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
                if node.op == "placeholder":
                    env[node] = x
                elif node.op == "output":
                    out = bb.emit_output(args[0])
                    continue
                elif node.op == "call_module":
                    env[node] = _emit_module(bb, args[0], modules[node.target], node.target, specs, intrin)
                elif node.op in ("call_function", "call_method"):
                    env[node] = _emit_call(bb, node, args, int(example.shape[0]))
                if env.get(node) is None:
                    env[node] = floats.emit(node)
        bb.emit_func_output(out)
    return bb.get()


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


def prepare_model(model: nn.Module, plan: BitPlan, example: torch.Tensor) -> tuple[nn.Module, list[str]]:
    """The model with quantizers: used as given when it already holds QuantLayers (learned scales), else
    a copy is quantized per plan and calibrated on ``example`` (said in the returned warnings)."""
    import copy

    warnings = []
    if placement_of(model) == "tensor":
        raise ExportError("the model's quantizers are placed per tensor (the ort-x86 form); TVM targets "
                          "requantize per layer: quantize the float model with placement='layer' "
                          "(hwmpq train --qat --placement layer, or let hwmpq search/export do it for the target)")
    if not any(isinstance(m, QuantLayer) for m in model.modules()):
        model = quantize_(copy.deepcopy(model), plan)
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
    mod = build_relax(qmodel, example_input, specs, intrin)
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
        check = agreement(ref, got, _last_out_scale(qmodel))
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
        "verified": verified, "plan": to_jsonable(plan), "integer_layers": list(integer),
        "float_layers": list(floats),
        "int8_kernel": intrin.kernel_name if intrin else "relax",
        "dot_layers": [n for n in integer if layers[n].precision == W8A8 and uses_dot_kernel(specs[n], intrin)],
        "scales": _scales(qmodel), "verification": check, "build_s": build_s,
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


def _last_out_scale(model: nn.Module) -> float | None:
    qs = [m for m in model.modules() if isinstance(m, QuantLayer)]
    return float(qs[-1].out_quant.effective_scale().detach().reshape(-1)[0]) if qs else None


def _scales(model: nn.Module) -> dict[str, dict[str, object]]:
    return {n: {"s_in": float(m.in_quant.effective_scale().detach()[0]), "s_out": float(m.out_quant.effective_scale().detach()[0]),
                "in_signed": m.in_quant.signed, "s_w": m.w_quant.effective_scale().detach().tolist()}
            for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def agreement(ref: np.ndarray, got: np.ndarray, lsb: float | None) -> dict[str, object]:
    """Output agreement: max |diff|, in units of the last layer's output step when it is quantized, and
    the fraction of outputs that are exactly equal; ok = within 2 LSB everywhere (float: 1e-4 rel)."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    res = {"max_abs": float(diff.max()), "frac_equal": float(np.mean(diff <= 1e-6 * (1 + np.abs(ref)))),
           "argmax_equal": float(np.mean(ref.argmax(-1) == got.argmax(-1))) if ref.ndim == 2 else None}
    if lsb:
        res["max_lsb"] = float(diff.max() / lsb)
        res["ok"] = bool(res["max_lsb"] <= 2.0 + 1e-6)
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
