"""Whole-model QDQ export of a ``quantize_``'d torch model for ONNX Runtime, from its learned scales.

Path: the folded float model (QuantLayers replaced by their float layers) goes through
``torch.onnx.export(dynamo=False)``; then every quantized Conv/Gemm (found by its weight initializer
``<fqn>.weight``) is replaced by the same QDQ group the profiler measures (targets/ort/layers.py):
``Q_in -> DQ -> layer(DQ(W), DQ(b)) -> Q_out -> DQ``, with the trained step sizes; fp32 layers stay float;
int4 weight-only Linear becomes MatMulNBits. No re-calibration happens here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from hwmpq.qmodules import QuantLayer, quant_layers, set_submodule
from hwmpq.records import BitPlan, LayerSpec, Precision, atomic_write_text, to_jsonable

from ..base import ExportResult
from .layers import emit_quant_layer, is_weight_only
from .qdq import IR_VERSION, OPSET, GraphParts, matmul_nbits

INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulNBits",
               "DynamicQuantizeMatMul")


class ExportError(ValueError):
    """The model or plan cannot be exported as asked; the message says what to change."""


@dataclass(frozen=True)
class LayerQuant:
    """One quantized layer's trained numbers, as float32 numpy arrays."""

    fqn: str
    precision: Precision
    weight: np.ndarray
    bias: np.ndarray | None
    w_scales: np.ndarray
    in_scale: float
    in_signed: bool
    out_scale: float


def collect_quant_params(model: nn.Module) -> dict[str, LayerQuant]:
    out = {}
    for fqn, q in quant_layers(model).items():
        if any(qz.enabled and not bool(qz.initialized) for qz in (q.w_quant, q.in_quant, q.out_quant)):
            raise ExportError(f"layer {fqn!r}: quantizers are not calibrated; load trained weights or calibrate first")
        b = q.layer.bias
        out[fqn] = LayerQuant(
            fqn, q.precision, q.layer.weight.detach().float().numpy().copy(),
            None if b is None else b.detach().float().numpy().copy(),
            q.w_quant.effective_scale().detach().float().numpy().copy(),
            float(q.in_quant.effective_scale().detach().float()), q.in_quant.signed,
            float(q.out_quant.effective_scale().detach().float()))
    return out


def float_onnx(model: nn.Module, example_input: torch.Tensor) -> onnx.ModelProto:
    """The folded float model (QuantLayers unwrapped) as ONNX at :data:`OPSET`."""
    plain = copy.deepcopy(model).eval()
    for fqn, q in quant_layers(plain).items():
        set_submodule(plain, fqn, q.layer)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "float.onnx")
        torch.onnx.export(plain, (example_input,), path, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], do_constant_folding=True)
        m = onnx.load(path)
    m = onnx.version_converter.convert_version(m, OPSET)
    m.ir_version = IR_VERSION
    return m


def _find_layer_nodes(graph: onnx.GraphProto, fqns: list[str]) -> dict[str, int]:
    """fqn -> index of the Conv/Gemm node reading ``<fqn>.weight``."""
    by_weight = {}
    for i, n in enumerate(graph.node):
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 1:
            by_weight[n.input[1]] = i
    missing = [f for f in fqns if f"{f}.weight" not in by_weight]
    if missing:
        raise ExportError(f"cannot find the ONNX nodes of layers {missing} (no Conv/Gemm reads '<fqn>.weight')")
    return {f: by_weight[f"{f}.weight"] for f in fqns}


def _emit(parts: GraphParts, spec: LayerSpec, lq: LayerQuant, src: str, dst: str) -> None:
    """The QDQ group of one quantized layer, float ``src`` in and float ``dst`` out."""
    p = lq.precision
    tag = lq.fqn.replace(".", "_")
    if is_weight_only(p):
        if spec.kind != "linear" or p.w_bits != 4:
            raise ExportError(f"layer {lq.fqn!r}: weight-only {p.label} exists for linear layers at 4 bits only")
        matmul_nbits(parts, src, dst, lq.weight, lq.w_scales, lq.bias, prefix=f"{tag}_nbits")
        return
    xq = parts.quantize_act(src, f"{tag}_xq", lq.in_scale, p.a_bits, lq.in_signed)
    yq = emit_quant_layer(parts, spec, p, xq, f"{tag}_yq", lq.weight, lq.bias, lq.w_scales, lq.in_scale,
                          lq.in_signed, lq.out_scale)
    parts.dequantize_act(yq, dst, lq.out_scale, p.a_bits, True, u8_carrier=not lq.in_signed)


def insert_qdq(m: onnx.ModelProto, specs: list[LayerSpec], params: dict[str, LayerQuant]) -> onnx.ModelProto:
    graph = m.graph
    index = _find_layer_nodes(graph, list(params))
    spec_by = {s.fqn: s for s in specs}
    replaced = {i: f for f, i in index.items()}
    new_nodes, used_inits = [], set()
    parts = GraphParts()
    for i, node in enumerate(graph.node):
        if i not in replaced:
            new_nodes.append(node)
            continue
        fqn = replaced[i]
        used_inits.update(node.input[1:])
        start = len(parts.nodes)
        _emit(parts, spec_by[fqn], params[fqn], node.input[0], node.output[0])
        new_nodes.extend(parts.nodes[start:])
    keep = [t for t in graph.initializer if t.name not in used_inits or _still_used(t.name, new_nodes)]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep + parts.inits)
    if any(n.domain == "com.microsoft" for n in new_nodes):
        m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(m)
    return m


def _still_used(name: str, nodes) -> bool:
    return any(name in n.input for n in nodes)


def verify_integer_kernels(opt_model: onnx.ModelProto, params: dict[str, LayerQuant]) -> tuple[list[str], list[str]]:
    """Which quantized layers run as integer kernels in ORT's optimized graph: a layer counts when an
    integer op consumes its weight codes (``<fqn>_yq_w_q``) or its MatMulNBits node is present."""
    integer, other = [], []
    for fqn, lq in params.items():
        tag = fqn.replace(".", "_")
        names = {f"{tag}_yq_w_q", f"{tag}_yq_w_q_quantized"}
        hit = any(n.op_type in INTEGER_OPS and (set(n.input) & names or n.name.startswith(tag))
                  for n in opt_model.graph.node)
        if is_weight_only(lq.precision):
            hit = any(n.op_type == "MatMulNBits" and f"{tag}_nbits_B" in n.input for n in opt_model.graph.node)
        (integer if hit else other).append(fqn)
    return integer, other


def op_histogram(m: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in m.graph.node))


def write_export(model: nn.Module, plan: BitPlan, specs: list[LayerSpec], example_input: torch.Tensor,
                 out_dir: str | os.PathLike, threads: int, manifest_extra: dict | None = None,
                 exact_u8s8: bool | None = None) -> ExportResult:
    """Write model.onnx, model.opt.onnx (ORT's optimized graph) and manifest.json into ``out_dir``."""
    from .timing import make_session

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = collect_quant_params(model)
    m = insert_qdq(float_onnx(model, example_input), specs, params)
    tmp_model = out / ".model.onnx.tmp"
    onnx.save(m, tmp_model)
    os.replace(tmp_model, out / "model.onnx")
    tmp_opt = out / ".model.opt.onnx.tmp"
    make_session(str(out / "model.onnx"), threads, optimized_path=str(tmp_opt), exact_u8s8=exact_u8s8)
    os.replace(tmp_opt, out / "model.opt.onnx")
    opt = onnx.load(out / "model.opt.onnx")
    integer, not_integer = verify_integer_kernels(opt, params)
    warns = []
    for fqn in not_integer:
        msg = (f"layer {fqn} at {params[fqn].precision.label}: ONNX Runtime did not turn it into an integer "
               "kernel; it runs as float compute between Q/DQ (correct numerics, no integer speed-up)")
        warnings.warn(msg, stacklevel=2)
        warns.append(msg)
    float_layers = [s.fqn for s in specs if s.fqn not in params]
    manifest = {
        "format": "hwmpq-ort-export", "version": 1, "plan": to_jsonable(plan),
        "integer_layers": integer, "float_layers": float_layers, "quantized_not_integer": not_integer,
        "optimized_ops": op_histogram(opt), "warnings": warns, "threads": threads,
        "input_shape": list(example_input.shape), "versions": tool_versions(),
        "scales": {f: {"in": p.in_scale, "in_signed": p.in_signed, "out": p.out_scale,
                       "w": [float(v) for v in p.w_scales]} for f, p in params.items()},
        **(manifest_extra or {}),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1, default=_json_default) + "\n")
    return ExportResult(str(out), str(out / "model.onnx"), str(out / "manifest.json"), tuple(integer),
                        tuple(float_layers + not_integer), tuple(warns))


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return to_jsonable(o)
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def tool_versions() -> dict[str, str]:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__}


__all__ = ["ExportError", "LayerQuant", "QuantLayer", "collect_quant_params", "float_onnx", "insert_qdq",
           "verify_integer_kernels", "write_export"]
