"""Tensor placement of activation quantizers: one quantizer per tensor, shared by its producer and all
its consumers, placed the way ONNX Runtime's QDQ format fuses into integer kernels end to end.

The model is traced with torch.fx (quantized layers as leaves) and rewritten into a GraphModule that
shares the model's modules. Rules, per tensor of the traced program:

- An **integer layer** (a ``QuantLayer`` with integer activations) reads its input quantized at its
  ``a_bits``: the producer's quantizer when the tensor already is at that width, else a quantizer on the
  tensor (one per tensor and width, shared by every consumer at that width). Its output always gets a
  quantizer of its own (what makes ORT fuse ``DQ -> Conv -> Q`` into QLinearConv); when its only user is
  a ReLU or ReLU6, the quantizer sits after the activation, unsigned (ReLU6 also caps the step size at
  6 / qmax), so the activation is exactly absorbed into the quantized range and the exporter drops it.
  Every user of the output, float layers included, reads the quantized tensor: a float island starts
  with a DQ.
- An **integer op** (residual add, mul, concat, average pooling) with a tensor input quantized at 8 bits
  or fewer (and none wider) gets an output quantizer of its own (QLinearAdd/QLinearMul/QLinearConcat/
  QLinearAveragePool each requantize), again after an absorbed ReLU/ReLU6; a float input (the output of
  a float island, e.g. a float shortcut conv) is quantized where it joins, so one float layer does not
  turn the rest of a residual stream float. Inputs keep their own scales: ORT's QLinear ops take one
  scale per input, so no scale has to be shared.
- A **grid op** (max pool, padding, flatten, reshape, permute, slicing, ReLU on a quantized tensor,
  identity) keeps its input's
  grid: a consumer that needs the tensor quantized re-applies the same quantizer (an identity in torch,
  a Q/DQ pair that ORT drops when it runs the op on integer codes). When a float tensor reaches an
  integer consumer through data movements (a float stem's max pool), the quantizer goes before them,
  so they run on integer codes.
- Anything else is float: its output is float, and an integer consumer quantizes it.

Layer placement (``QuantLayer`` with its own input and output quantizers, hwmpq/qmodules.py) remains for
targets whose exporter requantizes per layer (TVM).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import describe, trace
from .quantizers import LSQQuantizer

INTEGER_OP_BITS = 8  # widest activation codes ORT's QLinear ops (Add, Mul, Concat, pools) take

_RELU_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_RELU_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", F.relu6: "relu6"}
# padding: zero is code 0 of every grid, reflection and replication copy codes (a non-zero F.pad constant
# would be rounded onto the input's grid by the consumer's re-applied quantizer)
_GRID_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout, nn.ReLU, nn.ZeroPad2d, nn.ReflectionPad2d,
                 nn.ReplicationPad2d, nn.Unflatten)
_GRID_FUNCTIONS = {torch.flatten, F.max_pool2d, torch.relu, F.relu, F.dropout, F.pad, torch.reshape, torch.squeeze,
                   torch.unsqueeze, torch.permute, torch.transpose}
_GRID_METHODS = {"flatten", "view", "reshape", "contiguous", "relu", "squeeze", "unsqueeze", "permute", "transpose",
                 "expand", "expand_as"}
_INTEGER_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_BINARY_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.mul, torch.mul}
_INTEGER_FUNCTIONS = _BINARY_FUNCTIONS | {torch.cat, torch.concat, F.avg_pool2d, F.adaptive_avg_pool2d}
_INTEGER_METHODS = {"add", "mul"}


class TensorQuantizer(LSQQuantizer):
    """The per-tensor activation quantizer of one tensor. ``ceiling`` (ReLU6: 6.0) caps the largest
    code's value, ``qmax * scale <= ceiling``, so a ReLU6 before it is exactly absorbed."""

    def __init__(self, bits: int, signed: bool | None, ceiling: float | None = None) -> None:
        super().__init__(bits, signed=signed)
        self.ceiling = ceiling

    def effective_scale(self) -> torch.Tensor:
        s = super().effective_scale()
        if self.ceiling is None:
            return s
        return s.clamp_max(self.ceiling / self.range[1])

    def extra_repr(self) -> str:
        cap = "" if self.ceiling is None else f", ceiling={self.ceiling}"
        return super().extra_repr() + cap


@dataclass(frozen=True)
class _Quantized:
    """A tensor's place on a quantization grid: its quantizer (a submodule path) and width; ``node`` is
    the quantizer's own output node, or None when the grid was inherited through a grid op."""

    quantizer: str
    bits: int
    node: fx.Node | None


def _relu_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return _RELU_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        return _RELU_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    return None


def _is_grid_op(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _GRID_MODULES)
    if node.op == "call_function":
        return node.target in _GRID_FUNCTIONS
    return node.op == "call_method" and node.target in _GRID_METHODS


def _is_move(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A grid op that only moves or selects values (not a ReLU): quantizing its input or its output is the same."""
    return _is_grid_op(node, modules) and _relu_kind(node, modules) is None and len(_tensor_inputs(node)) == 1


def _is_integer_op(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _INTEGER_MODULES)
    binary = (node.op == "call_function" and node.target in _BINARY_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _INTEGER_METHODS)
    if binary:  # QLinearAdd/QLinearMul take two tensors; a scalar operand (x + 1) stays a float op
        return all(isinstance(a, fx.Node) for a in node.args[:2])
    return node.op == "call_function" and node.target in _INTEGER_FUNCTIONS


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


class _Placer:
    """One pass over the traced graph, inserting quantizer calls (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, is_integer_layer) -> None:
        self.graph = gm.graph
        self.modules = dict(gm.named_modules())
        self.is_integer_layer = is_integer_layer
        self.state: dict[fx.Node, _Quantized] = {}
        self.memo: dict[tuple[fx.Node, int], fx.Node] = {}
        self.absorbed: set[fx.Node] = set()
        self.quantizers: nn.ModuleDict = gm.tensor_quant
        self.layer_inputs: dict[str, str] = {}  # integer layer fqn -> its input quantizer's name

    def new_quantizer(self, bits: int, signed: bool | None, ceiling: float | None = None) -> str:
        name = f"q{len(self.quantizers)}"
        self.quantizers[name] = TensorQuantizer(bits, signed, ceiling)
        return name

    def call_after(self, node: fx.Node, quantizer: str) -> fx.Node:
        with self.graph.inserting_after(node):
            return self.graph.call_module(f"tensor_quant.{quantizer}", (node,))

    def materialize(self, node: fx.Node, bits: int) -> fx.Node:
        """The node holding ``node``'s value quantized at ``bits`` (inserting a quantizer call if needed)."""
        st = self.state.get(node)
        if st is not None and st.bits == bits and st.node is not None:
            return st.node
        if st is None and _is_move(node, self.modules):
            # quantize before a pure data movement (max pool, flatten, ...): it then runs on integer codes
            # (ORT's uint8 NHWC max pool instead of a float NCHW one) and gives the same values
            src = node.args[0]
            node.replace_input_with(src, self.materialize(src, bits))
            st = self.state[node] = _Quantized(self.state[node.args[0]].quantizer, bits, None)
        key = (node, bits)
        if key not in self.memo:
            if st is not None and st.bits == bits:  # on the grid already: re-apply the same quantizer
                name = st.quantizer
            else:
                # a re-quantization of codes known to be unsigned (after a ReLU) stays unsigned
                unsigned = st is not None and int(self.quantizers[st.quantizer].signed_flag) == 0
                name = self.new_quantizer(bits, False if unsigned else None)
            q = self.call_after(node, name)
            self.state[q] = _Quantized(name, bits, q)
            self.memo[key] = q
        return self.memo[key]

    def quantize_output(self, node: fx.Node, bits: int, signed: bool = True) -> None:
        """Give ``node``'s output (after a lone ReLU/ReLU6 user, absorbed) a quantizer of its own, and make
        every user read the quantized tensor."""
        out, kind = node, None
        users = list(node.users)
        if len(users) == 1 and _relu_kind(users[0], self.modules) is not None:
            out, kind = users[0], _relu_kind(users[0], self.modules)
            self.absorbed.add(out)
        ceiling = 6.0 if kind == "relu6" else None
        name = self.new_quantizer(bits, signed if kind is None else False, ceiling)
        q = self.call_after(out, name)
        out.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
        st = _Quantized(name, bits, q)
        self.state[out] = self.state[q] = st

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op in ("placeholder", "output", "get_attr") or node in self.absorbed or node in self.state:
                continue
            precision = self.is_integer_layer(node)
            if precision is not None:
                x = node.args[0]
                qx = self.materialize(x, precision.a_bits)
                node.args = (qx, *node.args[1:])
                self.layer_inputs[node.target] = self.state[qx].quantizer
                self.quantize_output(node, precision.a_bits)
            elif _is_integer_op(node, self.modules):
                inputs = _tensor_inputs(node)
                widths = [self.state[a].bits for a in inputs if a in self.state]
                if widths and max(widths) <= INTEGER_OP_BITS and len(inputs) == len(node.all_input_nodes):
                    bits = max(widths)
                    for a in inputs:  # a float input (a float island's output) is quantized as it leaves
                        st = self.state.get(a)
                        node.replace_input_with(a, self.materialize(a, st.bits if st is not None else bits))
                    self.quantize_output(node, bits)
            elif _is_grid_op(node, self.modules):
                inputs = _tensor_inputs(node)
                if len(inputs) == 1 and inputs[0] in self.state:
                    st = self.state[inputs[0]]
                    self.state[node] = _Quantized(st.quantizer, st.bits, None)


def float_ops_in_stream(gm: fx.GraphModule) -> list[str]:
    """The ops of a tensor-placed model that compute in float on a quantized tensor, other than float
    layers: ops with no integer kernel (SiLU, Hardswish, sigmoid, a 16-bit add, ...) that split an
    integer stretch. Each is named with its module or function and, where torch.fx recorded it, the
    line of the model's source."""
    if not isinstance(gm, fx.GraphModule):
        return []  # a float model
    modules = dict(gm.named_modules())
    quantized = {n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("tensor_quant.")}
    found = []
    for node in gm.graph.nodes:
        if node in quantized or node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear, LSQQuantizer)):
            continue
        if node.op == "call_module" and type(modules[node.target]).__name__ == "QuantLayer":
            continue
        if _is_grid_op(node, modules) or not any(a in quantized for a in node.all_input_nodes):
            continue
        out = node
        if len(node.users) == 1 and _relu_kind(next(iter(node.users)), modules) is not None:
            out = next(iter(node.users))  # an absorbed activation: the quantizer follows it
        if _is_integer_op(node, modules) and any(u in quantized for u in out.users):
            continue
        if _relu_kind(node, modules) is not None and any(u in quantized for u in node.users):
            continue
        found.append(describe(node, modules))
    return found


def place_tensor_quantizers(model: nn.Module, is_integer_layer,
                            leaves: tuple[type, ...] = ()) -> tuple[fx.GraphModule, dict[str, str]]:
    """``model`` (layers already wrapped) as a GraphModule sharing its modules, with tensor quantizers
    inserted as ``tensor_quant.q<i>`` (numbered in execution order, so state dicts are stable).
    ``is_integer_layer(node)`` returns the node's Precision when it is an integer layer, else None.
    Conv2d/Linear and ``leaves`` (the quantized layer wrapper) stay module calls (hwmpq.graph.trace).
    Returns the GraphModule and, per integer layer, the name of its input quantizer."""
    gm = trace(model, leaves)
    for node in list(gm.graph.nodes):  # folded BatchNorms are Identity: drop them so activations are adjacent
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.tensor_quant = nn.ModuleDict()
    placer = _Placer(gm, is_integer_layer)
    placer.run()
    gm.graph.lint()
    gm.recompile()
    return gm, placer.layer_inputs
