"""Whole-model QDQ export of a tensor-placed quantized torch model for ONNX Runtime, from its learned
scales (no re-calibration here).

Path: the quantized GraphModule (hwmpq/placement.py) goes through ``torch.onnx.export(dynamo=False)``
with each tensor quantizer written as a ``hwmpq::TQ`` marker and each quantized layer as its float
layer; then every marker becomes the quantizer's ``QuantizeLinear -> DequantizeLinear`` pair (a Clip
before it for widths without an ONNX type), every quantized Conv/Gemm (found by its weight initializer
``<fqn>.weight``) reads ``DQ(W codes)`` and int32 ``DQ(bias codes)``, a ReLU/ReLU6 that the next
quantizer's range absorbs exactly is dropped, and int4 weight-only Linear becomes MatMulNBits. This is
ORT's own QDQ convention (one Q/DQ pair per tensor), so ORT fuses integer stretches into QLinearConv,
QLinearAdd, QLinearGlobalAveragePool and QGemm end to end. The nodes come from the building blocks the
profiler's single-layer graphs use (targets/ort/qdq.py), so what the LUT measures is what this emits.

Writing the graph ourselves rather than through ``quantize_static`` with ``TensorQuantOverrides`` keeps
every scale the trained one by construction (weights, biases and activations), with no tensor-name
mapping between torch and ORT's calibrator, and gives the same fused graph.
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
from onnx import numpy_helper
from torch import nn

from hwmpq.placement import TensorQuantizer, float_ops_in_stream
from hwmpq.qmodules import QuantLayer, integer_bias, placement_of, quant_layers, set_submodule
from hwmpq.records import BitPlan, LayerSpec, Precision, atomic_write_text, to_jsonable

from ..base import ExportResult
from .layers import is_weight_only
from .qdq import IR_VERSION, OPSET, GraphParts, integer_max_pool, matmul_nbits

INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulNBits",
               "DynamicQuantizeMatMul")


class ExportError(ValueError):
    """The model or plan cannot be exported as asked; the message says what to change."""


@dataclass(frozen=True)
class TensorQuant:
    """One tensor quantizer's exported numbers."""

    scale: float
    bits: int
    signed: bool
    ceiling: float | None


@dataclass(frozen=True)
class LayerQuant:
    """One quantized layer's trained numbers, as float32 numpy arrays."""

    fqn: str
    precision: Precision
    weight: np.ndarray
    bias: np.ndarray | None
    w_scales: np.ndarray
    in_scale: float | None  # the input tensor's scale (None: float input, weight-only layer)


class _Marker(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: int) -> torch.Tensor:  # noqa: D401
        return x.clone()

    @staticmethod
    def symbolic(g, x, index: int):
        return g.op("hwmpq::TQ", x, index_i=index).setType(x.type())


class _MarkerModule(nn.Module):
    """Stands for tensor quantizer ``index`` in the traced ONNX graph."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Marker.apply(x, self.index)


def _check_exportable(model: nn.Module) -> None:
    if placement_of(model) == "layer":
        raise ExportError("the model's quantizers are placed per layer (hwmpq.qmodules.quantize_, "
                          "the TVM targets' form); the ort-x86 exporter needs tensor placement: quantize_ "
                          "the float model with the default placement='tensor'")
    for fqn, q in quant_layers(model).items():
        qs = [q.w_quant] + ([q.input_quantizer] if q.input_quantizer is not None else [])
        if any(qz.enabled and not bool(qz.initialized) for qz in qs):
            raise ExportError(f"layer {fqn!r}: quantizers are not calibrated; load trained weights or calibrate first")


def collect_quant_params(model: nn.Module) -> tuple[dict[str, LayerQuant], dict[str, TensorQuant]]:
    """Per quantized layer its weights and scales, per tensor quantizer (``tensor_quant`` name) its scale."""
    _check_exportable(model)
    tensors = {}
    for name, q in getattr(model, "tensor_quant", {}).items():
        if not bool(q.initialized):
            raise ExportError(f"tensor quantizer {name!r} is not calibrated; load trained weights or calibrate first")
        tensors[name] = TensorQuant(float(q.effective_scale().detach().reshape(())), q.bits, q.signed,
                                    q.ceiling if isinstance(q, TensorQuantizer) else None)
    layers = {}
    for fqn, q in quant_layers(model).items():
        b = q.layer.bias
        iq = q.input_quantizer
        layers[fqn] = LayerQuant(
            fqn, q.precision, q.layer.weight.detach().float().numpy().copy(),
            None if b is None else b.detach().float().numpy().copy(),
            q.w_quant.effective_scale().detach().float().numpy().copy(),
            None if iq is None else float(iq.effective_scale().detach().reshape(())))
    return layers, tensors


def marked_onnx(model: nn.Module, example_input: torch.Tensor) -> onnx.ModelProto:
    """The quantized model as ONNX at :data:`OPSET`: float layers, and a ``hwmpq::TQ`` marker (attribute
    ``index`` = position in ``model.tensor_quant``) where each tensor quantizer sits."""
    plain = copy.deepcopy(model).eval()
    for fqn, q in quant_layers(plain).items():
        set_submodule(plain, fqn, q.layer)
    markers = list(getattr(plain, "tensor_quant", {}))  # none in a float model
    for i, name in enumerate(markers):
        plain.tensor_quant[name] = _MarkerModule(i)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "marked.onnx")
        torch.onnx.export(plain, (example_input,), path, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], do_constant_folding=True, custom_opsets={"hwmpq": 1} if markers else None)
        m = onnx.load(path)
    m = onnx.version_converter.convert_version(m, OPSET)
    m.ir_version = IR_VERSION
    return m


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


def _absorbed_activation(node, consts: dict[str, np.ndarray], tq: TensorQuant) -> bool:
    """Whether Relu/Clip ``node`` changes nothing before quantizer ``tq``: unsigned codes clamp at 0, and
    a ReLU6's 6 lies at or beyond the largest code (``qmax * scale <= 6``)."""
    if tq.signed:
        return False
    if node.op_type == "Relu":
        return True
    if node.op_type != "Clip" or len(node.input) != 3 or not all(i in consts for i in node.input[1:]):
        return False
    lo, hi = (float(consts[i]) for i in node.input[1:])
    qmax = 2**tq.bits - 1
    return lo == 0.0 and qmax * tq.scale <= hi * (1 + 1e-6)


def insert_qdq(m: onnx.ModelProto, layers: dict[str, LayerQuant], tensors: dict[str, TensorQuant]) -> onnx.ModelProto:
    """Markers -> Q/DQ pairs, quantized layers -> integer weights and biases (module docstring)."""
    graph = m.graph
    tq_by_index = list(tensors.values())
    tq_names = list(tensors)
    consts = _constant_values(graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    dropped = set()
    for n in graph.node:  # absorbed activations: the marker reads the activation's input instead
        if n.domain == "hwmpq" and n.op_type == "TQ":
            tq = tq_by_index[n.attribute[0].i]
            act = producer.get(n.input[0])
            alone = len(consumers[act.output[0]]) == 1 and act.output[0] not in outputs if act is not None else False
            if alone and act.op_type in ("Relu", "Clip") and _absorbed_activation(act, consts, tq):
                n.input[0] = act.input[0]
                dropped.add(id(act))
    by_weight = {n.input[1]: n for n in graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1}
    missing = [f for f in layers if f"{f}.weight" not in by_weight]
    if missing:
        raise ExportError(f"cannot find the ONNX nodes of layers {missing} (no Conv/Gemm reads '<fqn>.weight')")
    layer_of = {id(by_weight[f"{f}.weight"]): f for f in layers}
    parts = GraphParts()
    new_nodes, replaced_inits = [], set()
    applied = Counter()  # a quantizer re-applied after a grid op gets a Q/DQ pair per application
    codes_of: dict[str, str] = {}  # marker output -> the integer codes it dequantizes
    pooled: dict[str, str] = {}  # marker output -> codes an integer max pool computed for it
    for n in graph.node:
        if id(n) in dropped:
            continue
        start = len(parts.nodes)
        if n.domain == "hwmpq" and n.op_type == "TQ":
            i = n.attribute[0].i
            tq, tag = tq_by_index[i], f"tq_{tq_names[i]}_{applied[i]}"
            applied[i] += 1
            codes = pooled.get(n.output[0])
            if codes is None:
                codes = parts.quantize_act(n.input[0], f"{tag}_codes", tq.scale, tq.bits, tq.signed)
            codes_of[n.output[0]] = codes
            parts.dequantize_act(codes, n.output[0], tq.scale, tq.bits, tq.signed)
        elif n.op_type == "MaxPool" and (after := _integer_max_pool(n, codes_of, consumers, tq_by_index)):
            pooled[after] = _nhwc_max_pool(parts, n, codes_of[n.input[0]])
        elif id(n) in layer_of:
            lq = layers[layer_of[id(n)]]
            replaced_inits.update(n.input[1:])
            _emit_layer(parts, n, lq)
        else:
            new_nodes.append(n)
            continue
        new_nodes.extend(parts.nodes[start:])
    new_nodes = _without_dead_nodes(new_nodes, outputs)
    used = {i for n in new_nodes for i in n.input}
    keep = [t for t in graph.initializer if t.name not in replaced_inits or t.name in used]
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep + parts.inits)
    for op in list(m.opset_import):
        if op.domain == "hwmpq":
            m.opset_import.remove(op)
    if any(n.domain == "com.microsoft" for n in new_nodes):
        m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(m)
    return m


def _without_dead_nodes(nodes: list, outputs: set[str]) -> list:
    """``nodes`` without those whose outputs nothing reads (the DQ a rewritten max pool leaves without a reader)."""
    while True:
        read = {i for n in nodes for i in n.input} | outputs
        alive = [n for n in nodes if any(o in read for o in n.output)]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive


def _integer_max_pool(node, codes_of: dict[str, str], consumers: dict[str, list], tq_by_index) -> str | None:
    """The marker output a MaxPool on integer codes feeds (its input a marker's output, its only consumer
    a marker of the same quantizer, 8 bits or fewer), else None."""
    users = consumers.get(node.output[0], [])
    if node.input[0] not in codes_of or len(users) != 1 or users[0].domain != "hwmpq":
        return None
    attrs = {a.name for a in node.attribute}
    if "storage_order" in attrs or tq_by_index[users[0].attribute[0].i].bits > 8:
        return None
    return users[0].output[0]


def _nhwc_max_pool(parts: GraphParts, node, codes: str) -> str:
    """``node`` (a MaxPool) on ``codes``, channels-last (qdq.py: :func:`integer_max_pool`)."""
    from onnx import helper

    tag = node.name.strip("/").replace("/", "_") or node.output[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return integer_max_pool(parts, codes, tag, attrs)


def _emit_layer(parts: GraphParts, node, lq: LayerQuant) -> None:
    """``node`` (a Conv/Gemm of a quantized layer) reading integer weight and bias codes."""
    p = lq.precision
    tag = lq.fqn.replace(".", "_")
    if is_weight_only(p):
        if node.op_type != "Gemm" or p.w_bits != 4:
            raise ExportError(f"layer {lq.fqn!r}: weight-only {p.label} exists for linear layers at 4 bits only")
        matmul_nbits(parts, node.input[0], node.output[0], lq.weight, lq.w_scales, lq.bias, prefix=f"{tag}_nbits")
        return
    inputs = [node.input[0], parts.dequantized_weight(f"{tag}_w", lq.weight, lq.w_scales, p.w_bits)]
    if lq.bias is not None:
        if integer_bias(p):
            inputs.append(parts.dequantized_bias(f"{tag}_b", lq.bias, lq.in_scale, lq.w_scales))
        else:
            inputs.append(parts.const(f"{tag}_b", lq.bias.astype(np.float32)))
    new = onnx.NodeProto()
    new.CopyFrom(node)
    del new.input[:]
    new.input.extend(inputs)
    parts.nodes.append(new)


def verify_integer_kernels(opt_model: onnx.ModelProto, layers: dict[str, LayerQuant]) -> tuple[list[str], list[str]]:
    """Which quantized layers run as integer kernels in ORT's optimized graph: a layer counts when an
    integer op consumes its weight codes (``<tag>_w_q``) or its MatMulNBits node is present."""
    integer, other = [], []
    for fqn, lq in layers.items():
        tag = fqn.replace(".", "_")
        if is_weight_only(lq.precision):
            names = {f"{tag}_nbits_B"}
        else:
            names = {f"{tag}_w_q", f"{tag}_w_q_quantized"}
        hit = any(n.op_type in INTEGER_OPS and set(n.input) & names for n in opt_model.graph.node)
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
    layers, tensors = collect_quant_params(model)
    m = insert_qdq(marked_onnx(model, example_input), layers, tensors)
    tmp_model = out / ".model.onnx.tmp"
    onnx.save(m, tmp_model)
    os.replace(tmp_model, out / "model.onnx")
    tmp_opt = out / ".model.opt.onnx.tmp"
    make_session(str(out / "model.onnx"), threads, optimized_path=str(tmp_opt), exact_u8s8=exact_u8s8)
    os.replace(tmp_opt, out / "model.opt.onnx")
    opt = onnx.load(out / "model.opt.onnx")
    integer, not_integer = verify_integer_kernels(opt, layers)
    warns = []
    for fqn in not_integer:
        warns.append(f"layer {fqn} at {layers[fqn].precision.label}: ONNX Runtime did not turn it into an integer "
                     "kernel; it runs as float compute between Q/DQ (correct numerics, no integer speed-up)")
    float_ops = float_ops_in_stream(model)
    for op in float_ops:
        warns.append(f"{op}: no integer kernel for it here; it computes in float between a DQ and a Q, "
                     "splitting the integer stream")
    for msg in warns:
        warnings.warn(msg, stacklevel=2)
    float_layers = [s.fqn for s in specs if s.fqn not in layers]
    manifest = {
        "format": "hwmpq-ort-export", "version": 2, "placement": "tensor", "plan": to_jsonable(plan),
        "integer_layers": integer, "float_layers": float_layers, "quantized_not_integer": not_integer,
        "float_ops_in_stream": float_ops, "dequantized_tensors": _dequantized_tensors(opt),
        "optimized_ops": op_histogram(opt), "warnings": warns, "threads": threads,
        "input_shape": list(example_input.shape), "versions": tool_versions(),
        "layer_scales": {f: {"in": p.in_scale, "w": [float(v) for v in p.w_scales]} for f, p in layers.items()},
        "tensor_scales": {n: dataclasses.asdict(t) for n, t in tensors.items()},
        **(manifest_extra or {}),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1, default=_json_default) + "\n")
    return ExportResult(str(out), str(out / "model.onnx"), str(out / "manifest.json"), tuple(integer),
                        tuple(float_layers + not_integer), tuple(warns))


def _dequantized_tensors(opt_model: onnx.ModelProto) -> list[str]:
    """Tensors that leave the integer stream in ORT's optimized graph (DequantizeLinear outputs): where
    float islands and the float output begin."""
    return [n.output[0] for n in opt_model.graph.node if n.op_type == "DequantizeLinear"]


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return to_jsonable(o)
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def tool_versions() -> dict[str, str]:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__}


__all__ = ["ExportError", "LayerQuant", "QuantLayer", "TensorQuant", "collect_quant_params", "insert_qdq",
           "marked_onnx", "verify_integer_kernels", "write_export"]
