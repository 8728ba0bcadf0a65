"""A tensor-placed quantized model (hwmpq/placement.py, the quantizers ORT's exporter writes) as one Relax
function whose integer layers pass integer codes to each other, NHWC, with no quantize, dequantize or
transpose between them.

Every tensor of the traced program is held either as codes on its quantizer's grid (:class:`Codes`,
4-d codes always NHWC) or as float32 (:class:`Float`, torch's NCHW, or NHWC inside the stream). Per node:

- an integer layer reads its input codes and writes its output quantizer's codes directly (its requantize
  is that quantizer; a lone ReLU/ReLU6 after it is absorbed into the unsigned range, or applied to the
  codes where the range does not absorb it);
- an integer op on codes (residual add, product, global average pool) computes in float32 NHWC from its
  inputs' dequantized codes, each at its own scale, and the quantizer after it quantizes: the chain
  dequantize -> op -> (ReLU) -> quantize is elementwise and TVM fuses it into one loop; these are the
  same float32 operations torch's fake-quant model runs, so the codes agree with it (ORT's QLinearAdd
  computes the same quantity);
- a grid op (max pool, ReLU, flatten, identity) runs on the codes;
- a quantizer re-applied to codes of its own grid is nothing, to codes of another grid a requantize;
- a float layer or any other op (through TVM's own torch.fx importer) reads float32 NCHW: codes are
  dequantized and transposed where a float island starts, and quantized (and transposed) where the
  quantizer after it sits.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from hwmpq.graph import describe
from hwmpq.qmodules import QuantLayer, integer_bias
from hwmpq.records import W8A8

from . import codes as C
from .codes import Grid
from .float_ops import FloatOps, float_rule
from .int_params import IntLayerParams, int_params
from .layers import emit_bitserial_layer, emit_float_layer, emit_int8_layer, is_bitserial

QUANT_PREFIX = "tensor_quant."


class StreamError(ValueError):
    """The tensor-placed model cannot be emitted as asked; the message names the node."""


@dataclass(frozen=True)
class Codes:
    """A tensor as integer codes on ``grid`` (4-d: NHWC)."""

    expr: object
    grid: Grid


@dataclass(frozen=True)
class Float:
    """A float32 tensor; ``nhwc``: a 4-d tensor laid out NHWC (inside the integer stream)."""

    expr: object
    nhwc: bool = False


def grid_of(quantizer) -> Grid:
    lo, hi = quantizer.range
    return Grid("", float(quantizer.effective_scale().detach().reshape(())), lo, hi)


def layer_int_params(q: QuantLayer, in_grid: Grid, out_grid: Grid) -> IntLayerParams:
    """The integer form of ``q`` reading codes on ``in_grid`` and writing codes on ``out_grid``."""
    s_w = q.w_quant.effective_scale().detach().float().numpy()
    wmin, wmax = q.w_quant.range
    shape = [-1] + [1] * (q.weight.dim() - 1)
    w_q = torch.clamp(torch.round(q.weight.detach() / torch.from_numpy(s_w).reshape(shape)), wmin, wmax)
    bias = None if q.bias is None else q.bias.detach().float().numpy()
    return int_params(w_q.numpy().astype(np.int8), bias, in_grid.scale, s_w, out_grid.scale, in_grid.signed,
                      q.precision, out_signed=out_grid.signed, integer_bias=integer_bias(q.precision))


def _ndim(expr) -> int | None:
    """The rank of a Relax tensor expression, None for anything else (a shape, a tuple, a number)."""
    from tvm import relax

    ty = getattr(expr, "ty", None)
    return ty.ndim if isinstance(ty, relax.TensorType) else None


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape.values]


_PASS = (nn.Identity, nn.Dropout)
_BINARY = {operator.add: "add", operator.iadd: "add", torch.add: "add", "add": "add", operator.mul: "multiply",
           operator.imul: "multiply", torch.mul: "multiply", "mul": "multiply", operator.sub: "subtract",
           torch.sub: "subtract", "sub": "subtract"}
_FLATTEN_METHODS = ("flatten", "view", "reshape")


class StreamBuilder:
    """One pass over the tensor-placed GraphModule emitting Relax (module docstring). ``glue`` counts the
    conversions it wrote (quantize, dequantize, requantize, transpose): where the stream is broken."""

    def __init__(self, bb, gm: fx.GraphModule, specs, intrin, batch: int) -> None:
        self.bb, self.gm, self.specs, self.intrin, self.batch = bb, gm, specs, intrin, batch
        self.modules = dict(gm.named_modules())
        self.vals: dict[fx.Node, object] = {}
        self.float_env: dict[fx.Node, object] = {}  # what TVM's importer reads: torch-layout floats
        self.fused: set[fx.Node] = set()  # nodes an integer layer before them already computed
        self.glue: Counter = Counter()
        self.floats = FloatOps(bb, gm, self.float_env)

    # ------------------------------------------------------------------ conversions
    def grid(self, node: fx.Node) -> Grid:
        name = node.target[len(QUANT_PREFIX):]
        g = grid_of(self.modules[node.target])
        return Grid(name, g.scale, g.lo, g.hi)

    def _transpose(self, x, perm):
        self.glue["transpose"] += 1
        return C.transpose(self.bb, x, perm)

    def torch_float(self, v):
        """``v`` as torch would hold it: float32, NCHW (anything not a tensor value passes through)."""
        if isinstance(v, Codes):
            self.glue["dequantize"] += 1
            x = C.dequantize(self.bb, v.expr, v.grid)
            return self._transpose(x, C.TO_NCHW) if _ndim(x) == 4 else x
        if isinstance(v, Float):
            return self._transpose(v.expr, C.TO_NCHW) if v.nhwc else v.expr
        return v

    def stream_float(self, v):
        """A 4-d ``v`` as float32 NHWC (codes dequantized in place)."""
        if isinstance(v, Codes):
            return C.dequantize(self.bb, v.expr, v.grid)
        return v.expr if v.nhwc else self._transpose(v.expr, C.TO_NHWC)

    def to_codes(self, v, grid: Grid) -> Codes:
        if isinstance(v, Codes):
            if v.grid == grid:
                return v
            self.glue["requantize"] += 1
            return Codes(C.requantize(self.bb, v.expr, v.grid, grid), grid)
        if not isinstance(v, Float):
            raise StreamError(f"a quantizer reads {type(v).__name__}, not a tensor")
        self.glue["quantize"] += 1
        q = C.quantize(self.bb, v.expr, grid)
        return Codes(self._transpose(q, C.TO_NHWC) if _ndim(q) == 4 and not v.nhwc else q, grid)

    def in_stream(self, v) -> bool:
        return isinstance(v, Codes) or (isinstance(v, Float) and v.nhwc)

    # ------------------------------------------------------------------ nodes
    def emit(self, node: fx.Node) -> None:
        if node in self.fused:
            return
        key = self._key(node)
        if node.op == "call_module" and node.target.startswith(QUANT_PREFIX):
            self.vals[node] = self.to_codes(self.vals[node.args[0]], self.grid(node))
            return
        if node.op == "call_module" and isinstance(self.modules[node.target], QuantLayer):
            self._emit_integer_layer(node)
            return
        if node.op == "call_module" and isinstance(self.modules[node.target], (nn.Conv2d, nn.Linear)):
            mod = self.modules[node.target]
            b = None if mod.bias is None else mod.bias.detach().numpy()
            x = self.torch_float(self.vals[node.args[0]])
            self.vals[node] = Float(emit_float_layer(self.bb, x, self.specs[node.target], mod.weight.detach().numpy(), b))
            return
        out = self._emit_on_stream(node, key)
        self.vals[node] = out if out is not None else self._emit_float(node)

    def _key(self, node: fx.Node):
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "call_module":
            return type(self.modules[node.target])
        return node.target

    def _arg(self, node: fx.Node, i: int = 0):
        a = node.args[i] if len(node.args) > i else None
        return self.vals[a] if isinstance(a, fx.Node) else None

    def _emit_on_stream(self, node: fx.Node, key):
        """The node computed on codes / NHWC floats when its input is in the stream, else None."""
        from tvm import relax

        op = relax.op
        x = self._arg(node)
        if not self.in_stream(x) or node.kwargs.get("inplace") not in (None, False):
            return None
        cap = self._relu_cap(node)
        if cap is not False:
            if isinstance(x, Codes):
                return Codes(C.relu(self.bb, x.expr, x.grid, cap), x.grid)
            y = op.nn.relu(x.expr) if cap is None else op.clip(x.expr, 0, cap)
            return Float(self.bb.emit(y), True)
        if key in _PASS or key in (F.dropout, "contiguous"):
            return x
        if (key is nn.MaxPool2d or key is F.max_pool2d) and isinstance(x, Codes):
            return self._max_pool(node, x)
        if self._is_flatten(node, key):
            return self._flatten(x)
        if key in _BINARY and len(node.args) == 2 and not node.kwargs:
            return self._binary(node, _BINARY[key])
        keep = self._global_mean_keepdim(node, key)
        if keep is not None:
            y = self.bb.emit(op.mean(self.stream_float(x), axis=[1, 2], keepdims=keep))
            return Float(y, keep)
        return None

    def _emit_integer_layer(self, node: fx.Node) -> None:
        q: QuantLayer = self.modules[node.target]
        quant, act = self._output_quantizer(node)
        x = self.vals[node.args[0]]
        if not isinstance(x, Codes):
            raise StreamError(f"layer {node.target!r} reads a float tensor: tensor placement quantizes every "
                              "integer layer's input")
        out_grid = self.grid(quant)
        if q.precision != W8A8 and not is_bitserial(q.precision):
            raise StreamError(f"layer {node.target!r}: {q.precision.label} has no TVM integer kernel; use w8a8 "
                              "or bitserial")
        if out_grid.hi - out_grid.lo + 1 != 2**q.precision.a_bits:
            raise StreamError(f"layer {node.target!r}: its output quantizer is not {q.precision.a_bits} bits wide")
        p = layer_int_params(q, x.grid, out_grid)
        spec = self.specs[node.target]
        try:
            y = emit_int8_layer(self.bb, x.expr, spec, p, self.intrin) if q.precision == W8A8 else \
                emit_bitserial_layer(self.bb, x.expr, spec, p)
        except ValueError as e:
            raise StreamError(f"layer {node.target!r} at {q.precision.label}: {e}") from None
        if act is not None:  # absorbed by an unsigned range (nothing emitted), else clamped on the codes
            y = C.relu(self.bb, y, out_grid, self._relu_cap(act))
            self.fused.add(act)
        self.fused.add(quant)
        self.vals[quant] = Codes(y, out_grid)

    def _output_quantizer(self, node: fx.Node) -> tuple[fx.Node, fx.Node | None]:
        """(the quantizer call after an integer layer, the lone ReLU/ReLU6 between them or None)."""
        users = list(node.users)
        if len(users) == 1 and self._is_quant(users[0]):
            return users[0], None
        if len(users) == 1 and self._relu_cap(users[0]) is not False and len(users[0].users) == 1:
            after = next(iter(users[0].users))
            if self._is_quant(after):
                return after, users[0]
        raise StreamError(f"layer {node.target!r}: its output has no quantizer of its own (tensor placement "
                          "gives every integer layer one)")

    def _is_quant(self, node: fx.Node) -> bool:
        return node.op == "call_module" and node.target.startswith(QUANT_PREFIX)

    def _relu_cap(self, node: fx.Node):
        """None for a ReLU, 6.0 for a ReLU6, False for anything else."""
        if node.op == "call_module":
            m = self.modules[node.target]
            return 6.0 if isinstance(m, nn.ReLU6) else None if isinstance(m, nn.ReLU) else False
        if node.op == "call_function" and node.target in (torch.relu, F.relu, F.relu6):
            return 6.0 if node.target is F.relu6 else None
        return None if node.op == "call_method" and node.target == "relu" else False

    def _max_pool(self, node: fx.Node, x: Codes) -> Codes | None:
        if node.op == "call_module":
            m = self.modules[node.target]
            k, s, p, d, ceil, idx = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices
        else:
            a = dict(zip(("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                         node.args, strict=False)) | dict(node.kwargs)
            k, s, p = a["kernel_size"], a.get("stride") or a["kernel_size"], a.get("padding", 0)
            d, ceil, idx = a.get("dilation", 1), a.get("ceil_mode", False), a.get("return_indices", False)
        if idx:
            return None

        def pair(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        return Codes(C.max_pool(self.bb, x.expr, pair(k), pair(s), pair(p), pair(d), bool(ceil)), x.grid)

    def _is_flatten(self, node: fx.Node, key) -> bool:
        if key is nn.Flatten:
            m = self.modules[node.target]
            return m.start_dim == 1 and m.end_dim == -1
        if key is torch.flatten or (node.op == "call_method" and key == "flatten"):
            return tuple(node.args[1:]) == (1,) and not node.kwargs
        return node.op == "call_method" and key in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1

    def _flatten(self, x):
        """torch's flatten(x, 1) of a 4-d NHWC tensor: channel-major order, so NCHW first unless H = W = 1."""
        from tvm import relax

        e = x.expr
        if _ndim(e) != 4:
            return None
        n, h, w, c = _shape(e)
        if h * w != 1:
            e = self._transpose(e, C.TO_NCHW)
        y = self.bb.emit(relax.op.reshape(e, (n, h * w * c)))
        return Codes(y, x.grid) if isinstance(x, Codes) else Float(y)

    def _binary(self, node: fx.Node, name: str):
        from tvm import relax

        a, b = (self.vals.get(v) if isinstance(v, fx.Node) else None for v in node.args)
        vals = [v for v in (a, b) if isinstance(v, (Codes, Float))]
        if len(vals) != 2 or any(_ndim(v.expr) != 4 for v in vals):
            return None  # a scalar or lower-rank operand broadcasts in NCHW: the float path
        y = getattr(relax.op, name)(self.stream_float(a), self.stream_float(b))
        return Float(self.bb.emit(y), True)

    def _global_mean_keepdim(self, node: fx.Node, key) -> bool | None:
        """keepdim when the node averages a 4-d tensor over H and W (global average pool), else None."""
        if key is nn.AdaptiveAvgPool2d:
            return True if self.modules[node.target].output_size in (1, (1, 1)) else None
        if key is F.adaptive_avg_pool2d:
            return True if tuple(node.args[1:2]) in ((1,), ((1, 1),)) else None
        if key == "mean" or key is torch.mean:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            if isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]:
                return bool(keep)
        return None

    def _emit_float(self, node: fx.Node):
        """Any other node in float32, torch's layout: the float rules here, else TVM's importer."""
        for a in node.all_input_nodes:
            self.float_env[a] = self._torch_float_of(a)
        args = [self.float_env[a] if isinstance(a, fx.Node) else a for a in node.args]
        out = float_rule(self.bb, node, args, self.modules, self.batch)
        if out is None:
            out = self.floats.emit(node)
        return Float(out) if _ndim(out) is not None else out

    def _torch_float_of(self, node: fx.Node):
        if node in self.float_env:
            return self.float_env[node]
        if node not in self.vals:
            raise StreamError(f"{describe(node, self.modules)}: its value was folded into an integer layer")
        return self.torch_float(self.vals[node])


def build_stream(gm: fx.GraphModule, example: torch.Tensor, specs, intrin=None):
    """(IRModule with ``main``, glue counts) of the tensor-placed ``gm`` (module docstring)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(tuple(example.shape), "float32"))
    sb = StreamBuilder(bb, gm, specs, intrin, int(example.shape[0]))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = None
            for node in gm.graph.nodes:
                if node.op == "placeholder":
                    sb.vals[node] = Float(x)
                elif node.op == "output":
                    out = bb.emit_output(sb.torch_float(sb.vals[node.args[0]]))
                else:
                    sb.emit(node)
        bb.emit_func_output(out)
    return bb.get(), dict(sb.glue)
