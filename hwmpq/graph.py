"""The layer graph: quantizable layers of a model with their shapes, and the data edges between them."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .records import Edge, LayerSpec

QUANTIZABLE = (nn.Conv2d, nn.Linear)
PASS_THROUGH_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Dropout,
)
PASS_THROUGH_FUNCTIONS = {
    operator.add, operator.iadd, operator.mul, torch.add, torch.mul, torch.flatten, torch.relu,
    torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.hardswish,
    torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.avg_pool2d, torch.nn.functional.max_pool2d,
    torch.mean, torch.cat, operator.getitem, getattr,
}
PASS_THROUGH_METHODS = {"flatten", "view", "reshape", "mean", "relu", "size", "add", "mul", "contiguous"}


ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid",
                      nn.SiLU: "silu"}
ACTIVATION_FUNCTIONS = {torch.relu: "relu", torch.nn.functional.relu: "relu", torch.nn.functional.relu6: "relu6",
                        torch.nn.functional.hardswish: "hardswish"}


class UnsupportedModelError(ValueError):
    """The model holds a layer or operation hwmpq cannot analyse; the message names it."""


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types; the message is what helps
        raise UnsupportedModelError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); hwmpq needs a model "
            "without data-dependent control flow"
        ) from e


def _check_supported(gm: fx.GraphModule) -> None:
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules[node.target]
            if not isinstance(mod, QUANTIZABLE + PASS_THROUGH_MODULES):
                raise UnsupportedModelError(
                    f"module {node.target!r} of type {type(mod).__name__} is not supported; supported: "
                    f"{sorted({t.__name__ for t in QUANTIZABLE + PASS_THROUGH_MODULES})}"
                )
        elif node.op == "call_function" and node.target not in PASS_THROUGH_FUNCTIONS:
            raise UnsupportedModelError(f"function {getattr(node.target, '__name__', node.target)!r} "
                                        f"(node {node.name!r}) is not supported")
        elif node.op == "call_method" and node.target not in PASS_THROUGH_METHODS:
            raise UnsupportedModelError(f"tensor method {node.target!r} (node {node.name!r}) is not supported")


def _spec(fqn: str, mod: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> LayerSpec:
    batch = int(in_shape[0])
    params = sum(p.numel() for p in mod.parameters(recurse=False))
    has_bias = getattr(mod, "bias", None) is not None
    if isinstance(mod, nn.Linear):
        if len(in_shape) != 2:
            raise UnsupportedModelError(f"linear layer {fqn!r} sees a {len(in_shape)}-d input; only 2-d is supported")
        return LayerSpec(fqn=fqn, kind="linear", in_channels=mod.in_features, out_channels=mod.out_features,
                         batch=batch, bias=has_bias, macs=batch * mod.in_features * mod.out_features,
                         params=params)
    kh, kw = _pair(mod.kernel_size)
    if isinstance(mod.padding, str):
        raise UnsupportedModelError(f"conv {fqn!r} uses padding={mod.padding!r}; give explicit padding")
    oh, ow = int(out_shape[2]), int(out_shape[3])
    depthwise = mod.groups > 1 and mod.groups == mod.in_channels
    macs = batch * oh * ow * mod.out_channels * (mod.in_channels // mod.groups) * kh * kw
    return LayerSpec(
        fqn=fqn, kind="dwconv" if depthwise else "conv", in_channels=mod.in_channels,
        out_channels=mod.out_channels, kernel=(kh, kw), stride=_pair(mod.stride), padding=_pair(mod.padding),
        dilation=_pair(mod.dilation), groups=mod.groups, in_hw=(int(in_shape[2]), int(in_shape[3])),
        out_hw=(oh, ow), batch=batch, bias=has_bias, macs=macs, params=params,
    )


def merge_kind(node: fx.Node) -> str:
    """``records.MERGES`` kind of a node joining several layers' outputs: "add" (residual add), "concat"
    (torch.cat), else "none"."""
    if node.target in (operator.add, operator.iadd, torch.add) or (node.op == "call_method" and node.target in ("add", "add_")):
        return "add"
    if node.target in (torch.cat, torch.concat) or (node.op == "call_method" and node.target == "cat"):
        return "concat"
    return "none"


def _activation_of(node: fx.Node, modules: dict) -> str | None:
    if node.op == "call_module":
        return ACTIVATION_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        return ACTIVATION_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    return None


def input_activations(gm: fx.GraphModule) -> dict[str, str]:
    """Per quantizable layer, the activation applied to its input since the tensor was last computed by a
    layer or a merge (residual add, concat): ``records.ACTIVATIONS``; ``none`` if there is none."""
    modules = dict(gm.named_modules())
    act: dict[fx.Node, str] = {}
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "call_module" and isinstance(modules[node.target], QUANTIZABLE):
            out[node.target] = act.get(node.args[0], "none")
            act[node] = "none"
        elif _activation_of(node, modules) is not None:
            act[node] = _activation_of(node, modules)
        elif len([a for a in inputs if a.op != "get_attr"]) == 1:
            act[node] = act.get(inputs[0], "none")
        else:  # a merge or a graph input
            act[node] = "none"
    return out


def analyse(model: nn.Module, example_input: torch.Tensor) -> tuple[list[LayerSpec], list[Edge]]:
    """Layers in execution order and the edges between quantizable layers (through pass-through ops)."""
    gm = trace(model)
    _check_supported(gm)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as e:
        raise UnsupportedModelError(f"running {type(model).__name__} on an input of shape "
                                    f"{tuple(example_input.shape)} failed: {e}") from e
    finally:
        model.train(was_training)
    modules = dict(gm.named_modules())
    activation = input_activations(gm)
    specs: list[LayerSpec] = []
    producers: dict[fx.Node, set[str]] = {}
    edges: list[Edge] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        feeding = [producers[a] for a in node.all_input_nodes if producers.get(a)]
        # a merge (residual add, concat) computes a new tensor in float: edges do not pass through it
        upstream: set[str] = feeding[0] if len(feeding) == 1 else set()
        if node.op == "call_module" and isinstance(modules[node.target], QUANTIZABLE):
            if node.target in seen:
                raise UnsupportedModelError(f"layer {node.target!r} is called more than once; shared layers "
                                            "cannot take one precision per call")
            seen.add(node.target)
            in_node = node.args[0]
            in_shape = in_node.meta["tensor_meta"].shape
            spec = _spec(node.target, modules[node.target], in_shape, node.meta["tensor_meta"].shape)
            specs.append(spec)
            edges.extend(Edge(src, spec.fqn, tuple(in_shape), activation[spec.fqn]) for src in sorted(upstream))
            producers[node] = {spec.fqn}
        else:
            producers[node] = upstream
    return specs, edges


def layer_graph(model: nn.Module, example_input: torch.Tensor) -> list[LayerSpec]:
    """Quantizable layers (conv, depthwise conv, linear) of ``model`` in execution order."""
    return analyse(model, example_input)[0]


def fqns(specs: list[LayerSpec]) -> list[str]:
    return [s.fqn for s in specs]
