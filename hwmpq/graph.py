"""The layer graph: quantizable layers of a model with their shapes, and the data edges between them.

The model is traced with torch.fx. Every ``nn.Conv2d`` and ``nn.Linear`` (subclasses included) is a leaf
of the trace and a quantizable layer; every other op of the traced program (a module, a function or a
tensor method: padding, activations, pooling, reshapes, concats, products, ...) passes through as glue.
A layer's geometry is the one its kernel sees: the traced program runs once on the example input and
each layer's ``conv2d``/``linear`` call is recorded, so a Conv2d subclass that pads in its own forward
(TensorFlow "SAME" convs) is described by the padded input it convolves, string padding (``'same'``,
``'valid'``) becomes numbers, and a Linear on an (N, ..., C) input has batch N * ... .

Refused, each with the op and, where torch.fx recorded it, the line of the model's source: a model
torch.fx cannot trace, an op that fails on the example input, and a layer called more than once.
"""

from __future__ import annotations

import math
import operator
import os
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .records import Edge, LayerSpec

QUANTIZABLE = (nn.Conv2d, nn.Linear)

ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid",
                      nn.SiLU: "silu"}
ACTIVATION_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish",
                        torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.silu: "silu"}
ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid"}
_SHAPE_METHODS = {"size", "dim", "numel"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


class UnsupportedModelError(ValueError):
    """The model holds a layer or operation hwmpq cannot analyse; the message names it."""


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Tracer(fx.Tracer):
    """torch.fx's tracer with every Conv2d/Linear (and ``leaves``) a leaf (a subclass's own forward
    included, so the layer stays one module call) and stack traces recorded, so errors and warnings can
    name the model's source line."""

    def __init__(self, leaves: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaves = QUANTIZABLE + tuple(leaves)
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, leaves: tuple[type, ...] = ()) -> fx.GraphModule:
    """``model`` as a GraphModule sharing its modules, Conv2d/Linear (and ``leaves``, e.g. the quantized
    layer wrapper) as leaves."""
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types; the message is what helps
        raise UnsupportedModelError(_trace_failure(model, e)) from e
    return fx.GraphModule(model, graph, class_name=type(model).__name__)


def _model_frame(tb) -> str | None:
    """The innermost frame of a traceback in the model's own code (not torch's, not this module's), as
    ``File "...", line N, in f: <source>``."""
    frames = [f for f in traceback.extract_tb(tb)
              if not f.filename.startswith(_TORCH_DIR) and os.path.abspath(f.filename) != os.path.abspath(__file__)]
    if not frames:
        return None
    f = frames[-1]
    return f'File "{f.filename}", line {f.lineno}, in {f.name}: {(f.line or "").strip()}'


def _failing_proxy(tb) -> fx.Proxy | None:
    """The innermost traced value a failing trace was handling (e.g. the one used in an ``if``): found
    among the frame locals of the traceback."""
    found = None
    while tb is not None:
        for v in tb.tb_frame.f_locals.values():
            if isinstance(v, fx.Proxy):
                found = v
        tb = tb.tb_next
    return found


def _trace_failure(model: nn.Module, e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    msg = f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {first})"
    proxy = _failing_proxy(e.__traceback__)
    if proxy is not None:
        node = proxy.node
        msg += f"; the value it was handling is node {node.name!r} ({node.op} {_target_name(node)})"
    where = _model_frame(e.__traceback__)
    if where:
        msg += f", at {where}"
    return msg + (" -- hwmpq needs a model without data-dependent control flow (an if or loop on a tensor's "
                  "values) in its forward")


def _target_name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def source_line(node: fx.Node) -> str | None:
    """The model's source line that created ``node`` (from the stack trace torch.fx recorded), as
    ``File "...", line N, in f: <source>``, or None when none was recorded."""
    lines = (node.stack_trace or "").strip().splitlines()
    files = [i for i, line in enumerate(lines) if line.strip().startswith("File ") and _TORCH_DIR not in line]
    if not files:
        return None
    i = files[-1]
    code = lines[i + 1].strip() if i + 1 < len(lines) else ""
    return f"{lines[i].strip()}: {code}"


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """``node`` for an error message: the module (and its type) or function it runs, and its source line."""
    if node.op == "call_module":
        what = f"module {node.target!r} ({type(modules[node.target]).__name__})"
    else:
        what = f"{node.op.replace('call_', '')} {_target_name(node)!r} (node {node.name!r})"
    where = source_line(node)
    return f"{what} at {where}" if where else what


def layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The calls of quantizable layers in execution order; a layer called twice is refused (one
    precision per layer cannot serve two calls with their own inputs)."""
    modules = dict(gm.named_modules())
    seen: set[str] = set()
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], QUANTIZABLE):
            if node.target in seen:
                raise UnsupportedModelError(f"layer {node.target!r} is called more than once; shared layers "
                                            "cannot take one precision per call")
            seen.add(node.target)
            out.append(node)
    return out


@dataclass(frozen=True)
class KernelCall:
    """One ``conv2d``/``linear`` call as a layer made it: input and output shapes and, for a conv, the
    stride, padding (numbers or ``'same'``/``'valid'``), dilation and groups it passed."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _kernel_call(func, args: tuple, kwargs: dict, out: torch.Tensor) -> KernelCall:
    bound = {**_CONV_DEFAULTS, **dict(zip(_CONV_ARGS, args, strict=False)), **kwargs}
    in_shape, out_shape = tuple(bound["input"].shape), tuple(out.shape)
    if func is F.linear:
        return KernelCall(in_shape, out_shape)
    padding = bound["padding"] if isinstance(bound["padding"], str) else _pair(bound["padding"])
    return KernelCall(in_shape, out_shape, _pair(bound["stride"]), padding, _pair(bound["dilation"]),
                      int(bound["groups"]))


class _KernelRecorder(TorchFunctionMode):
    """Records the ``conv2d``/``linear`` calls made while one layer runs (a subclass may pad, reshape or
    reparametrize around its kernel: the call is what the hardware runs)."""

    def __init__(self, kernel) -> None:
        super().__init__()
        self.kernel = kernel
        self.calls: list[tuple[torch.Tensor, KernelCall]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is self.kernel:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            self.calls.append((weight, _kernel_call(func, args, kwargs, out)))
        return out


def _run_layer(mod: nn.Module, fqn: str, run) -> tuple[object, KernelCall | None]:
    """Run a layer (``run()``) recording its kernel call: the one made with its weight, else its only
    call; None when the layer made none (its module attributes then describe it)."""
    kernel = F.conv2d if isinstance(mod, nn.Conv2d) else F.linear
    with _KernelRecorder(kernel) as rec:
        out = run()
    mine = [c for w, c in rec.calls if w is mod.weight] or [c for _, c in rec.calls]
    if len(mine) > 1:
        raise UnsupportedModelError(f"layer {fqn!r} ({type(mod).__name__}) runs its {kernel.__name__} "
                                    f"{len(mine)} times per call; hwmpq needs one kernel per layer")
    return out, (mine[0] if mine else None)


class _Propagation(fx.Interpreter):
    """Runs the traced program once: each tensor-valued node's shape, each layer's kernel call, and an
    error naming the op (and its source line) when one fails."""

    def __init__(self, gm: fx.GraphModule, what: str) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # the error below names the op and its source line itself
        self.what = what
        self.modules = dict(gm.named_modules())
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.kernels: dict[str, KernelCall | None] = {}

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except UnsupportedModelError:
            raise
        except Exception as e:  # the op's own error, whatever its type, with where it happened
            first = (str(e).strip().splitlines() or [""])[0]
            raise UnsupportedModelError(f"{self.what} failed at {describe(n, self.modules)}: "
                                        f"{type(e).__name__}: {first}") from e
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        return result

    def call_module(self, target, args, kwargs):
        mod = self.modules[target]
        if not isinstance(mod, QUANTIZABLE):
            return super().call_module(target, args, kwargs)
        out, self.kernels[target] = _run_layer(mod, target, lambda: mod(*args, **kwargs))
        return out


def _propagate(gm: fx.GraphModule, model: nn.Module, example_input: torch.Tensor) -> _Propagation:
    what = f"running {type(model).__name__} on an input of shape {tuple(example_input.shape)}"
    prop = _Propagation(gm, what)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            prop.run(example_input)
    finally:
        model.train(was_training)
    return prop


def _same_padding(size: int, k: int, dilation: int) -> tuple[int, int]:
    """(padding, input size the kernel sees) of ``padding='same'`` along one axis: torch pads
    ``dilation * (k - 1)`` in total, the odd one at the end; an asymmetric pad is described as the padded
    input with no padding, which is the same kernel."""
    total = dilation * (k - 1)
    return (total // 2, size) if total % 2 == 0 else (0, size + total)


def _conv_geometry(mod: nn.Conv2d, call: KernelCall) -> tuple[tuple[int, int], tuple[int, int]]:
    """(input height/width, symmetric padding) of the kernel call, string padding resolved."""
    h, w = call.in_shape[2], call.in_shape[3]
    if call.padding == "valid":
        return (h, w), (0, 0)
    if call.padding == "same":
        kh, kw = mod.weight.shape[2], mod.weight.shape[3]
        (ph, h), (pw, w) = _same_padding(h, kh, call.dilation[0]), _same_padding(w, kw, call.dilation[1])
        return (h, w), (ph, pw)
    return (h, w), _pair(call.padding)


def _module_call(mod: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> KernelCall:
    """The kernel call a plain Conv2d/Linear makes, from its attributes (a layer whose own forward made no
    recorded call)."""
    if isinstance(mod, nn.Linear):
        return KernelCall(in_shape, out_shape)
    return KernelCall(in_shape, out_shape, _pair(mod.stride), mod.padding if isinstance(mod.padding, str)
                      else _pair(mod.padding), _pair(mod.dilation), mod.groups)


def _spec(fqn: str, mod: nn.Module, call: KernelCall) -> LayerSpec:
    params = sum(p.numel() for p in mod.parameters(recurse=False))
    has_bias = getattr(mod, "bias", None) is not None
    if isinstance(mod, nn.Linear):
        batch = math.prod(call.in_shape[:-1])  # an (N, T, C) input is N * T rows of one GEMM
        return LayerSpec(fqn=fqn, kind="linear", in_channels=mod.in_features, out_channels=mod.out_features,
                         batch=batch, bias=has_bias, macs=batch * mod.in_features * mod.out_features,
                         params=params)
    batch = int(call.in_shape[0])
    kh, kw = int(mod.weight.shape[2]), int(mod.weight.shape[3])
    in_hw, padding = _conv_geometry(mod, call)
    oh, ow = int(call.out_shape[2]), int(call.out_shape[3])
    groups = call.groups
    depthwise = groups > 1 and groups == mod.in_channels
    macs = batch * oh * ow * mod.out_channels * (mod.in_channels // groups) * kh * kw
    return LayerSpec(
        fqn=fqn, kind="dwconv" if depthwise else "conv", in_channels=mod.in_channels,
        out_channels=mod.out_channels, kernel=(kh, kw), stride=call.stride, padding=padding,
        dilation=call.dilation, groups=groups, in_hw=in_hw, out_hw=(oh, ow), batch=batch, bias=has_bias,
        macs=macs, params=params,
    )


def merge_kind(node: fx.Node) -> str:
    """``records.MERGES`` kind of a node joining several layers' outputs: "add" (residual add), "concat"
    (torch.cat), else "none"."""
    if node.target in (operator.add, operator.iadd, torch.add) or (node.op == "call_method" and node.target in ("add", "add_")):
        return "add"
    if node.target in (torch.cat, torch.concat) or (node.op == "call_method" and node.target == "cat"):
        return "concat"
    return "none"


def shape_valued(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computing sizes rather than tensors (``x.size(0)``, ``x.shape[2:]``, arithmetic on them):
    they read a tensor without carrying its data, so they are not a second input of ``x.view(n, -1)``."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if (node.op == "call_method" and node.target in _SHAPE_METHODS) \
                or (node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRIBUTES) \
                or (node.op == "call_function" and node.target is len) \
                or (node.op in ("call_function", "call_method") and inputs and all(a in out for a in inputs)):
            out.add(node)
    return out


def _tensor_inputs(node: fx.Node, sizes: set[fx.Node]) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.op != "get_attr" and a not in sizes]


def _activation_of(node: fx.Node, modules: dict) -> str | None:
    if node.op == "call_module":
        return ACTIVATION_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        if node.target in (operator.mul, torch.mul) and _is_silu(node, modules):
            return "silu"
        return ACTIVATION_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return ACTIVATION_METHODS.get(node.target)
    return None


def _is_silu(node: fx.Node, modules: dict) -> bool:
    """``x * sigmoid(x)`` (either order): SiLU written out, as Swish modules do."""
    a, b = (node.args + (None, None))[:2]
    return any(isinstance(s, fx.Node) and _activation_of(s, modules) == "sigmoid" and s.args[:1] == (x,)
               for s, x in ((a, b), (b, a)))


def input_activations(gm: fx.GraphModule) -> dict[str, str]:
    """Per quantizable layer, the activation applied to its input since the tensor was last computed by a
    layer or a merge (residual add, concat, a product of two tensors): ``records.ACTIVATIONS``; ``none``
    if there is none."""
    modules = dict(gm.named_modules())
    sizes = shape_valued(gm)
    act: dict[fx.Node, str] = {}
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        inputs = _tensor_inputs(node, sizes)
        if node.op == "call_module" and isinstance(modules[node.target], QUANTIZABLE):
            out[node.target] = act.get(inputs[0], "none") if inputs else "none"
            act[node] = "none"
        elif _activation_of(node, modules) is not None:
            act[node] = _activation_of(node, modules)
        elif len(inputs) == 1:
            act[node] = act.get(inputs[0], "none")
        else:  # a merge or a graph input
            act[node] = "none"
    return out


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def max_pool_of(node: fx.Node, modules: dict) -> tuple[int, ...] | None:
    """``Edge.pool`` of a 2-d max pool node ((kernel, stride, padding) per axis); () for a max pool an edge
    cannot describe (dilated, ceil mode, indices); None if ``node`` is no max pool."""
    if node.op == "call_module" and isinstance(modules[node.target], nn.MaxPool2d):
        m = modules[node.target]
        k, s, p, d, ceil, idx = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices
    elif node.op == "call_function" and node.target is F.max_pool2d:
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        a = dict(zip(names[:len(node.args) - 1], node.args[1:], strict=False)) | dict(node.kwargs)
        k = a.get("kernel_size")
        s, p, d = a.get("stride") or k, a.get("padding", 0), a.get("dilation", 1)
        ceil, idx = a.get("ceil_mode", False), a.get("return_indices", False)
    else:
        return None
    if any(isinstance(v, fx.Node) for v in (k, s, p, d, ceil, idx)) or _pair(d) != (1, 1) or ceil or idx:
        return ()
    return (*_pair(k), *_pair(s), *_pair(p))


def analyse(model: nn.Module, example_input: torch.Tensor) -> tuple[list[LayerSpec], list[Edge]]:
    """Layers in execution order and the edges between quantizable layers: through every op with one
    tensor input (or several computed from the same layers, like ``x * sigmoid(x)``), not through a
    merge of different layers' outputs (residual add, concat, squeeze-excite product)."""
    gm = trace(model)
    layers = set(layer_nodes(gm))
    prop = _propagate(gm, model, example_input)
    modules = dict(gm.named_modules())
    activation = input_activations(gm)
    sizes = shape_valued(gm)
    specs: list[LayerSpec] = []
    producers: dict[fx.Node, set[str]] = {}
    pools: dict[fx.Node, tuple[int, ...]] = {}  # the max pool since the producing layer (``Edge.pool``)
    edges: list[Edge] = []
    for node in gm.graph.nodes:
        inputs = _tensor_inputs(node, sizes)
        feeding = {frozenset(producers[a]) for a in inputs if producers.get(a)}
        upstream: set[str] = set(next(iter(feeding))) if len(feeding) == 1 else set()
        before = pools.get(inputs[0], ()) if len(inputs) == 1 else ()
        if node in layers:
            mod = modules[node.target]
            in_shape = prop.shapes[inputs[0]]
            call = prop.kernels.get(node.target) or _module_call(mod, in_shape, prop.shapes[node])
            spec = _spec(node.target, mod, call)
            specs.append(spec)
            shape = spec.input_shape if spec.kind == "linear" else in_shape
            edges.extend(Edge(src, spec.fqn, shape, activation[spec.fqn], pool=before) for src in sorted(upstream))
            producers[node] = {spec.fqn}
        else:
            producers[node] = upstream
            pool = max_pool_of(node, modules)
            pools[node] = before if pool is None else (pool if not before else ())  # two pools: not described
    return specs, edges


def layer_graph(model: nn.Module, example_input: torch.Tensor) -> list[LayerSpec]:
    """Quantizable layers (conv, depthwise conv, linear) of ``model`` in execution order."""
    return analyse(model, example_input)[0]


def fqns(specs: list[LayerSpec]) -> list[str]:
    return [s.fqn for s in specs]
