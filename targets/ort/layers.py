"""Single-layer ONNX graphs for one LayerSpec at one Precision, in the form the exporter emits.

A quantized layer is measured *in context*: its input arrives already as integer codes and its output
leaves as integer codes (``x_q -> DQ -> Conv(DQ(W), DQ(b)) -> Q -> y_q``), which ORT fuses into one
QLinearConv/QGemm for uint8 x int8. The float<->integer hand-over (Q, DQ, requantize) is measured apart,
per tensor shape and precision pair (:func:`transition_model`), so sum(layers) + sum(transitions) +
session overhead describes the exported whole model. A transition is timed as a two-layer chain
(:func:`chain_model`): the edge's own two layers where they chain, stand-ins otherwise. Weights are
random but seeded by the signature.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import TensorProto, helper

from hwmpq.records import LayerSpec, Precision, pooled_shape

from .qdq import IR_VERSION, OPSET, GraphParts, act_container, integer_max_pool, matmul_nbits, pool_attributes

# typical step sizes; the kernel's speed does not depend on their values
_IN_SCALE, _OUT_SCALE = 0.02, 0.05


def _rng(spec: LayerSpec) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha256(spec.signature.encode()).hexdigest()[:8], 16))


def weight_shape(spec: LayerSpec) -> tuple[int, ...]:
    if spec.kind == "linear":
        return (spec.out_channels, spec.in_channels)
    return (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel)


def is_weight_only(precision: Precision) -> bool:
    """int-weight, float-activation layers (MatMulNBits for Linear)."""
    return precision.w_bits < 32 and precision.a_bits == 32


def emit_layer(parts: GraphParts, spec: LayerSpec, src: str, out: str, w: np.ndarray, b: np.ndarray | None) -> str:
    """Append the float Conv/Gemm reading ``w`` and ``b`` (tensor names) from ``src`` to ``out``."""
    inputs = [src, w] + ([b] if b is not None else [])
    if spec.kind == "linear":
        parts.nodes.append(helper.make_node("Gemm", inputs, [out], name=f"{out}_Gemm", transB=1))
    else:
        parts.nodes.append(helper.make_node(
            "Conv", inputs, [out], name=f"{out}_Conv", kernel_shape=list(spec.kernel), strides=list(spec.stride),
            pads=[*spec.padding, *spec.padding], dilations=list(spec.dilation), group=spec.groups))
    return out


def emit_quant_layer(parts: GraphParts, spec: LayerSpec, precision: Precision, src_q: str, out_q: str,
                     w: np.ndarray, bias: np.ndarray | None, w_scales: np.ndarray, in_scale: float,
                     in_signed: bool, out_scale: float) -> str:
    """Integer codes in, integer codes out: DQ(x) -> layer(DQ(W), DQ(b)) -> Q (signed output, as
    hwmpq's out_quant, in the input's element type: see qdq.py). Returns the output codes' name."""
    a = precision.a_bits
    x = parts.dequantize_act(src_q, f"{out_q}_in", in_scale, a, in_signed)
    wq = parts.dequantized_weight(f"{out_q}_w", w, w_scales, precision.w_bits)
    bq = None
    if bias is not None:
        if precision.w_bits <= 8 and a <= 8 and precision.w_bits != 4:
            bq = parts.dequantized_bias(f"{out_q}_b", bias, in_scale, w_scales)
        else:
            bq = parts.const(f"{out_q}_b", bias.astype(np.float32))
    y = emit_layer(parts, spec, x, f"{out_q}_float", wq, bq)
    return parts.quantize_act(y, out_q, out_scale, a, True, u8_carrier=not in_signed)


def _value_info(name: str, elem: int, shape: tuple[int, ...]):
    return helper.make_tensor_value_info(name, elem, list(shape))


def make_model(parts: GraphParts, inputs: list, outputs: list, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(parts.nodes, name, inputs, outputs, initializer=parts.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, producer_name="hwmpq")


def io_elem(precision: Precision, signed: bool) -> int:
    """ONNX element type a layer at ``precision`` reads (unsigned codes) or writes (signed codes, in the
    uint8 carrier its unsigned input implies)."""
    if precision.a_bits == 32:
        return TensorProto.FLOAT
    return act_container(precision.a_bits, signed, u8_carrier=True)[0]


def emit_random_layer(parts: GraphParts, spec: LayerSpec, precision: Precision, src: str, out: str,
                      rng: np.random.Generator) -> str:
    """Append ``spec`` at ``precision`` with seeded random weights: float in/out for fp32 and weight-only,
    unsigned codes in and signed codes out for quantized activations."""
    fan_in = int(np.prod(weight_shape(spec)[1:]))
    w = (rng.standard_normal(weight_shape(spec)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    b = (rng.standard_normal(spec.out_channels) * 0.1).astype(np.float32) if spec.bias or precision.a_bits < 32 else None
    if precision.is_float:
        wn = parts.const(f"{out}_w", w)
        bn = parts.const(f"{out}_b", b) if b is not None else None
        return emit_layer(parts, spec, src, out, wn, bn)
    w_scales = np.maximum(np.abs(w).reshape(len(w), -1).max(axis=1), 1e-8) / (2 ** (precision.w_bits - 1) - 1)
    if is_weight_only(precision):
        if spec.kind != "linear" or precision.w_bits != 4:
            raise ValueError(f"weight-only {precision.label} is only built for linear layers at 4 bits")
        return matmul_nbits(parts, src, out, w, w_scales.astype(np.float32), b)
    return emit_quant_layer(parts, spec, precision, src, out, w, b, w_scales.astype(np.float32), _IN_SCALE, False,
                            _OUT_SCALE)


def emit_activation(parts: GraphParts, src: str, out: str, activation: str) -> str:
    """``activation`` (records.ACTIVATIONS) as torch.onnx.export writes it: ReLU6 is a Clip to [0, 6], SiLU
    is x * Sigmoid(x)."""
    if activation == "none":
        return src
    y = f"{out}_{activation}"
    if activation == "relu":
        parts.nodes.append(helper.make_node("Relu", [src], [y], name=f"{y}_Relu"))
    elif activation == "relu6":
        lo = parts.const(f"{y}_lo", np.array(0.0, np.float32))
        hi = parts.const(f"{y}_hi", np.array(6.0, np.float32))
        parts.nodes.append(helper.make_node("Clip", [src, lo, hi], [y], name=f"{y}_Clip"))
    elif activation == "hardswish":
        parts.nodes.append(helper.make_node("HardSwish", [src], [y], name=f"{y}_HardSwish"))
    elif activation in ("sigmoid", "silu"):
        sig = y if activation == "sigmoid" else f"{y}_sigmoid"
        parts.nodes.append(helper.make_node("Sigmoid", [src], [sig], name=f"{sig}_Sigmoid"))
        if activation == "silu":
            parts.nodes.append(helper.make_node("Mul", [src, sig], [y], name=f"{y}_Mul"))
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return y


# activations the tensor quantizer after them absorbs exactly (hwmpq/placement.py)
ABSORBED = ("none", "relu", "relu6")


def integer_stream(src: Precision, dst: Precision) -> bool:
    """Whether the exporter hands ``src``'s output codes to ``dst`` as they are (one tensor quantizer,
    shared): both integer at one width of 8 bits or fewer."""
    return src.a_bits == dst.a_bits <= 8


def residual_is_integer(src: Precision) -> bool:
    """Whether a residual add after a layer at ``src`` runs as QLinearAdd (its other input taken to be in
    the same stream: quantized at the same width)."""
    return src.a_bits <= 8


def emit_glue(parts: GraphParts, src_q: str, out: str, src: Precision, dst: Precision,
              activation: str = "relu", residual: str | None = None, pool: tuple[int, ...] = ()) -> str:
    """What the tensor-placement exporter (targets/ort/export.py) puts between two layers:

    - an integer stream (:func:`integer_stream`) with an absorbed activation: nothing, the codes flow on
      (through the max pool ``pool`` on codes, :func:`integer_max_pool`); with a residual add:
      ``DQ, DQ -> Add -> Q`` (QLinearAdd, ``residual`` holding integer codes);
    - otherwise: DQ of the producer's codes (if integer), the add of ``residual`` (float, or DQ of its
      codes when :func:`residual_is_integer`) and then Q when the add is integer, the activation unless
      that quantizer absorbs it (the exporter drops it), the max pool, and Q to the consumer's codes (if
      integer). A float producer's max pool before an integer consumer runs on the consumer's codes:
      the exporter quantizes before data movements (hwmpq/placement.py)."""
    int_add = residual is not None and residual_is_integer(src)
    absorbed = activation in ABSORBED and (int_add or (residual is None and src.a_bits < 32))
    if integer_stream(src, dst) and activation in ABSORBED:
        if residual is None:
            return integer_max_pool(parts, src_q, f"{out}_pool", pool_attributes(pool)) if pool else src_q
        a = parts.dequantize_act(src_q, f"{out}_dq", _OUT_SCALE, src.a_bits, True)
        r = parts.dequantize_act(residual, f"{out}_rdq", _IN_SCALE, src.a_bits, False)
        parts.nodes.append(helper.make_node("Add", [a, r], [f"{out}_sum"], name=f"{out}_Add"))
        return parts.quantize_act(f"{out}_sum", f"{out}_q", _IN_SCALE, dst.a_bits, False)
    cur = src_q
    if src.a_bits < 32:
        cur = parts.dequantize_act(cur, f"{out}_dq", _OUT_SCALE, src.a_bits, True)
    if residual is not None:
        r = parts.dequantize_act(residual, f"{out}_rdq", _IN_SCALE, src.a_bits, False) if int_add else residual
        parts.nodes.append(helper.make_node("Add", [cur, r], [f"{out}_sum"], name=f"{out}_Add"))
        cur = f"{out}_sum"
        if int_add:  # the add's own output quantizer, then the float stretch from its codes
            cur = parts.quantize_act(cur, f"{out}_sq", _IN_SCALE, src.a_bits, False)
            cur = parts.dequantize_act(cur, f"{out}_sdq", _IN_SCALE, src.a_bits, False)
    if not absorbed:
        cur = emit_activation(parts, cur, out, activation)
    if pool and src.a_bits == 32 and dst.a_bits < 32 and residual is None:
        codes = parts.quantize_act(cur, f"{out}_q", _IN_SCALE, dst.a_bits, False)
        return integer_max_pool(parts, codes, f"{out}_pool", pool_attributes(pool))
    if pool:
        parts.nodes.append(helper.make_node("MaxPool", [cur], [f"{out}_pooled"], name=f"{out}_MaxPool",
                                            **pool_attributes(pool)))
        cur = f"{out}_pooled"
    if dst.a_bits < 32:
        cur = parts.quantize_act(cur, f"{out}_q", _IN_SCALE, dst.a_bits, False)
    return cur


def layer_model(spec: LayerSpec, precision: Precision, activation: str = "none",
                merge: str = "none") -> onnx.ModelProto:
    """The single-layer graph for ``spec`` at ``precision`` (see :func:`emit_random_layer` for I/O). On a
    float output, optionally what follows the layer in a model: the residual add of a second float input
    "r" (``merge`` "add") and ``activation``, which ORT fuses into a float conv; an integer layer's add and
    activation sit in the glue after its DQ (the pair chains hold them), so they are not added to it."""
    if merge not in ("none", "add"):
        raise ValueError(f"a layer row cannot hold a {merge!r} merge (only a residual add)")
    parts = GraphParts()
    inputs = [_value_info("x", io_elem(precision, False), spec.input_shape)]
    y = emit_random_layer(parts, spec, precision, "x", "y", _rng(spec))
    if precision.a_bits == 32:
        if merge == "add":
            inputs.append(_value_info("r", TensorProto.FLOAT, spec.output_shape))
            parts.nodes.append(helper.make_node("Add", [y, "r"], ["y_sum"], name="y_Add"))
            y = "y_sum"
        y = emit_activation(parts, y, "y", activation)
    return make_model(parts, inputs, [_value_info(y, io_elem(precision, True), spec.output_shape)],
                      f"{spec.kind}_{spec.signature}_{precision.label}")


def stand_in_spec(shape: tuple[int, ...]) -> LayerSpec:
    """The neighbours in a transition chain: a depthwise 1x1 conv keeping ``shape`` (the cheapest conv
    with the layouts and integer kernels of real convs, so chain differences are not drowned in the
    noise of big kernels), or a linear layer for 2-d tensors."""
    if len(shape) == 2:
        return LayerSpec(f"stand_in{list(shape)}", "linear", shape[1], shape[1], batch=shape[0], bias=True,
                         macs=shape[0] * shape[1] ** 2, params=shape[1] ** 2)
    n, c, h, w = shape
    return LayerSpec(f"stand_in{list(shape)}", "dwconv", c, c, groups=c, in_hw=(h, w), out_hw=(h, w), batch=n,
                     bias=False, macs=n * c * h * w, params=c)


def chain_model(src_spec: LayerSpec, src: Precision, dst_spec: LayerSpec, dst: Precision,
                activation: str = "relu", merge: str = "none", pool: tuple[int, ...] = ()) -> onnx.ModelProto:
    """A chain ``src_spec(src) -> glue -> dst_spec(dst)``: two layers as the exporter joins them
    (:func:`emit_glue`: the edge's ``activation``, absorbed into an integer stream or fused by ORT into a
    float producer, for ``merge`` "add" a residual add of a second graph input "r", integer codes
    where the add is integer, and the edge's max pool ``pool``), each with the seeded weights of its own
    layer row (``src_spec``'s output, pooled, must be ``dst_spec``'s input).

    Its time C includes what the boundary costs in context (Q/DQ, ORT's layout changes between NHWC
    integer kernels and NCHWc float kernels, lost fusions, the cache state the producer leaves);
    lut/model.py uses C - R(src) - R(dst) + overhead as the edge's transition cost, R being the two
    layer rows."""
    if pooled_shape(src_spec.output_shape, pool) != dst_spec.input_shape:
        raise ValueError(f"cannot chain {src_spec.fqn} (output {list(src_spec.output_shape)}"
                         f"{', max pool ' + str(list(pool)) if pool else ''}) into {dst_spec.fqn} "
                         f"(input {list(dst_spec.input_shape)})")
    if merge not in ("none", "add") or (pool and merge != "none"):
        raise ValueError(f"a pair chain cannot hold a {merge!r} merge{' after a max pool' if pool else ''} "
                         "(only a residual add, without a pool)")
    parts = GraphParts()
    inputs = [_value_info("x", io_elem(src, False), src_spec.input_shape)]
    if merge == "add":
        r_elem = io_elem(src, False) if residual_is_integer(src) else TensorProto.FLOAT
        inputs.append(_value_info("r", r_elem, src_spec.output_shape))
    a = emit_random_layer(parts, src_spec, src, "x", "a", _rng(src_spec))
    g = emit_glue(parts, a, "g", src, dst, activation, residual="r" if merge == "add" else None, pool=pool)
    emit_random_layer(parts, dst_spec, dst, g, "y", _rng(dst_spec))
    return make_model(parts, inputs, [_value_info("y", io_elem(dst, True), dst_spec.output_shape)],
                      f"chain_{src.label}_{dst.label}")


def transition_model(shape: tuple[int, ...], src: Precision, dst: Precision) -> onnx.ModelProto:
    """:func:`chain_model` of two stand-ins on a tensor of ``shape``, joined by a ReLU: the transition of an
    edge whose two layers do not chain as they stand (pooling or a reshape between). lut/model.py uses
    C(src, dst) - S(src) - S(dst) + overhead, S being the stand-in measured alone as a layer (profile
    :func:`stand_in_spec` of every such edge shape, see ``hwmpq.profilers.probes.profiling_specs``)."""
    spec = stand_in_spec(tuple(shape))
    return chain_model(spec, src, spec, dst)


def overhead_model(shape: tuple[int, ...] = (1, 1)) -> onnx.ModelProto:
    """An Identity session: the fixed cost of one ``InferenceSession.run`` call."""
    parts = GraphParts()
    parts.nodes.append(helper.make_node("Identity", ["x"], ["y"], name="identity"))
    return make_model(parts, [_value_info("x", TensorProto.FLOAT, shape)],
                      [_value_info("y", TensorProto.FLOAT, shape)], "overhead")
